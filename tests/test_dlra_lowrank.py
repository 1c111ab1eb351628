"""DLRAMomentum steps ``geomopt.nn.LowRankLinear`` layers from their factored gradients and lands where it lands on the
equivalent ``nn.Linear`` (whose weight it keeps as U S V^T), rank changes included; the other methods refuse such a
layer; the layer's state round-trips."""
import copy

import pytest
import torch
from conftest import rel_err
from torch import nn

import geomopt
from geomopt.nn import LowRankLinear


def nets(rank, seed=0):
    """(dense net, factored net) computing the same function: the dense weights hold rank-``rank`` matrices."""
    torch.manual_seed(seed)
    f64 = dict(dtype=torch.float64)  # factors orthonormal to float64's rounding from the start
    factored = nn.Sequential(LowRankLinear(24, 20, rank, **f64), nn.Tanh(), LowRankLinear(20, 16, rank, **f64),
                             nn.Tanh(), nn.Linear(16, 3, **f64))
    dense = nn.Sequential(factored[0].to_linear(), nn.Tanh(), factored[2].to_linear(), nn.Tanh(),
                          copy.deepcopy(factored[4])).double()
    return dense, factored


def run(net, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 24, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g,
                                                                                  dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def weights(net):
    return [m.weight_matrix() if isinstance(m, LowRankLinear) else m.weight for m in net if hasattr(m, "in_features")]


CASES = {
    "heavy-ball": dict(lr=5e-2, rank=4, method="heavy_ball"),
    "adam": dict(lr=1e-2, rank=4, method="adam", stabilize_every=5),
    "adaptive-rank": dict(lr=2e-1, rank=4, method="heavy_ball", rank_tol=0.5, min_rank=1, max_rank=8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_factored_layer_steps_as_the_dense_weight_does(case):
    kw = CASES[case]
    dense, factored = nets(kw["rank"])
    opt_d, opt_f = (geomopt.DLRAMomentum(net, exclude="4", **kw) for net in (dense, factored))  # the head: AdamW
    run(dense, opt_d, 20)
    run(factored, opt_f, 20)
    for a, b in zip(weights(factored), weights(dense)):
        assert rel_err(a.detach(), b.detach()) < 1e-10
    assert opt_f.ranks == opt_d.ranks
    if case == "adaptive-rank":
        assert opt_f.ranks != [kw["rank"]] * 2  # the rank moved, and the layers follow it
        assert [m.rank for m in factored if isinstance(m, LowRankLinear)] == opt_f.ranks
    for m in factored:
        if isinstance(m, LowRankLinear):  # the factors stay on the manifold
            eye = torch.eye(m.rank, dtype=torch.float64)
            assert rel_err(m.U.T @ m.U, eye) < 1e-10 and rel_err(m.V.T @ m.V, eye) < 1e-10


def test_the_factors_are_routed_to_the_method_and_their_state_round_trips():
    _, factored = nets(3)
    opt = geomopt.DLRAMomentum(factored, lr=1e-2, rank=3, method="adam", exclude="4")
    routes = {r.name: r.route for r in opt.routing()}
    assert routes["0.U"] == routes["0.S"] == routes["0.V"] == "DLRAMomentum" and routes["0.bias"] == "AdamW"
    run(factored, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    twin_net = copy.deepcopy(factored)
    twin = geomopt.DLRAMomentum(twin_net, lr=1e-2, rank=3, method="adam", exclude="4")
    twin.load_state_dict(saved)
    run(factored, opt, 4, seed=7)
    run(twin_net, twin, 4, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(factored.parameters(), twin_net.parameters()))
    clone = copy.deepcopy(opt)  # the group knows its layers without the layer objects
    assert clone.param_groups[0]["lowrank"] == opt.param_groups[0]["lowrank"]


@pytest.mark.parametrize("cls", [geomopt.POET, geomopt.ReLoRAReset])
def test_the_dense_methods_refuse_a_factored_layer(cls):
    _, factored = nets(3)
    with pytest.raises(TypeError, match="only DLRAMomentum steps its factors"):
        cls(factored, lr=1e-2)
    cls([{"params": list(factored[0].parameters()), "factorize": False}], lr=1e-2)  # as AdamW: the user's choice


def test_a_layer_split_over_groups_is_refused():
    layer = LowRankLinear(8, 6, 2)
    with pytest.raises(ValueError, match=r"factors go together: its \['S', 'V'\] are not in the group"):
        geomopt.DLRAMomentum([{"params": [layer.U]}, {"params": [layer.S, layer.V]}], rank=2)


@pytest.mark.parametrize("method", ["heavy_ball", "adam"])
def test_layers_of_one_shape_stepped_together_equal_one_by_one(method, monkeypatch):
    from geomopt.optim.dlra_layers import FactoredLayers

    sizes = []
    real = FactoredLayers._step_layer_run
    monkeypatch.setattr(FactoredLayers, "_step_layer_run",
                        lambda self, triples, *a: sizes.append(len(triples)) or real(self, triples, *a))
    torch.manual_seed(6)
    f64 = dict(dtype=torch.float64)
    base = nn.Sequential(LowRankLinear(16, 16, 4, **f64), nn.Tanh(), LowRankLinear(16, 16, 4, **f64), nn.Tanh(),
                         LowRankLinear(16, 24, 4, **f64), nn.Tanh(), nn.Linear(24, 3, **f64))
    runs = []
    for foreach in (False, True):
        net = copy.deepcopy(base)
        opt = geomopt.DLRAMomentum(net, lr=1e-2, rank=4, method=method, foreach=foreach, exclude="6",
                                   stabilize_every=3)
        g = torch.Generator().manual_seed(1)
        for _ in range(8):
            x, y = torch.randn(16, 16, generator=g, **f64), torch.randn(16, 3, generator=g, **f64)
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*runs):
        assert rel_err(a, b) < 1e-12
    assert sizes[:2] == [1, 1] and 2 in sizes  # one by one, then the two 16 x 16 layers in one run
