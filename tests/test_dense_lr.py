"""``dense_lr`` / ``dense_weight_decay``: the AdamW-routed tensors (embeddings, norms, biases) step as torch's AdamW
with their own lr and weight decay, an LR scheduler drives both lrs in proportion, the factors step as without
them, the settings survive a state_dict round trip (an older state_dict without them loads), and bad values are
refused with an error that names them."""
import pytest
import torch
from torch import nn

import geomopt
from geomopt.optim.routing import is_factorized

f64 = torch.float64
MAKERS = {
    "poet": lambda m, **k: geomopt.POET(m, block_size=4, merge_every=2, **k),
    "poet-lean": lambda m, **k: geomopt.POET(m, block_size=4, merge_every=2, store_base=False, **k),
    "relora": lambda m, **k: geomopt.ReLoRAReset(m, rank=2, reset_every=2, **k),
    "dlra": lambda m, **k: geomopt.DLRAMomentum(m, rank=2, method="adam", **k),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(12, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)).to(f64)


def _run(make, steps=4, **kw):
    """Steps ``make``'s optimizer on fixed gradients (the same for every run) under a scheduler that halves the lr
    each step; returns (model, optimizer, the dense parameters)."""
    model = _model()
    opt = make(model, lr=1e-2, weight_decay=0.1, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=f64)
        opt.step()
        sched.step()
    dense = [p for g in opt.param_groups for p in g["params"] if not is_factorized(p, g)]
    return model, opt, dense


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_dense_tensors_step_as_adamw_with_their_own_lr_under_a_scheduler(name):
    model, opt, dense = _run(MAKERS[name], dense_lr=3e-2, dense_weight_decay=0.0)
    ref_model = _model()
    names = ["0.weight", "1.weight", "1.bias", "2.bias", "3.bias"]  # the embedding, the norm, the biases
    assert [id(p) for p in dense] == [id(dict(model.named_parameters())[n]) for n in names]
    ref_params = [dict(ref_model.named_parameters())[n] for n in names]
    ref = torch.optim.AdamW(ref_params, lr=3e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 0.5 ** s)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p in ref_model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=f64)
        ref.step()
        sched.step()
    for got, want in zip(dense, ref_params):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 4)  # the scheduler set lr; dense follows


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_the_factors_step_as_without_dense_settings(name):
    plain, _, _ = _run(MAKERS[name])
    own, _, _ = _run(MAKERS[name], dense_lr=5e-2, dense_weight_decay=0.0)
    for layer in (2, 3):
        assert torch.equal(plain[layer].weight, own[layer].weight)
    assert not torch.equal(plain[0].weight, own[0].weight)  # the dense lr did change the embedding's step


def test_default_is_the_groups_lr_and_weight_decay():
    model = _model()
    opt = geomopt.POET(model, lr=1e-2, block_size=4)
    assert opt.param_groups[0]["dense_lr_scale"] == 1.0 and opt.param_groups[0]["dense_weight_decay"] is None
    a, _, _ = _run(MAKERS["poet"])
    b, _, _ = _run(MAKERS["poet"], dense_lr=1e-2, dense_weight_decay=0.1)  # the same values, spelled out
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_settings_survive_a_state_dict_round_trip_and_older_state_dicts_load():
    _, opt, _ = _run(MAKERS["poet"], steps=2, dense_lr=3e-2, dense_weight_decay=0.0)
    sd = opt.state_dict()
    fresh = MAKERS["poet"](_model(), lr=1e-2)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["dense_lr_scale"] == pytest.approx(3.0)
    assert fresh.param_groups[0]["dense_weight_decay"] == 0.0
    old = {**sd, "param_groups": [{k: v for k, v in g.items() if not k.startswith("dense_")}
                                  for g in sd["param_groups"]]}
    older = MAKERS["poet"](_model(), lr=1e-2)
    older.load_state_dict(old)  # saved before the settings existed: they take their defaults
    assert older.param_groups[0]["dense_lr_scale"] == 1.0 and older.param_groups[0]["dense_weight_decay"] is None


@pytest.mark.parametrize("kw,err,words", [
    (dict(dense_lr=-1e-3), ValueError, "dense_lr must be >= 0"),
    (dict(dense_lr="1e-3"), TypeError, "dense_lr must be a number"),
    (dict(lr=0.0, dense_lr=1e-3), ValueError, "lr, which must then be > 0"),
    (dict(dense_weight_decay=-0.1), ValueError, "dense_weight_decay must be >= 0"),
])
def test_bad_values_are_refused_by_name(kw, err, words):
    with pytest.raises(err, match=words):
        geomopt.POET(_model(), **{"lr": 1e-3, **kw})


def test_a_param_group_may_set_its_scale_and_a_bad_one_is_refused():
    model = _model()
    with pytest.warns(UserWarning, match="without names"):  # the Linear's weight, given as a plain tensor
        opt = geomopt.POET([{"params": [model[0].weight], "factorize": False, "dense_lr_scale": 2.0},
                            {"params": list(model[2].parameters())}], lr=1e-3, block_size=4)
    assert opt.param_groups[0]["dense_lr_scale"] == 2.0 and opt.param_groups[1]["dense_lr_scale"] == 1.0
    with pytest.raises(ValueError, match="dense_lr_scale must be >= 0"):
        opt.add_param_group({"params": [model[1].weight], "factorize": False, "dense_lr_scale": -1.0})


def test_make_optimizers_spec_takes_dense_lr():
    from geomopt.integrations import make_optimizer

    opt, _ = make_optimizer(_model(), "poet:lr=1e-3,dense_lr=4e-3,dense_weight_decay=0,block_size=4", total_steps=10)
    assert opt.param_groups[0]["dense_lr_scale"] == pytest.approx(4.0)
    assert opt.param_groups[0]["dense_weight_decay"] == 0
