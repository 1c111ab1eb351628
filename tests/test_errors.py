"""Bad input raises ValueError/TypeError naming the argument and the value; nothing is corrupted."""
import pytest
import torch
from torch import nn

import geomopt


def model():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(lr=-1e-3), ValueError, r"lr must be >= 0.0, got -0.001"),
    (dict(lr=float("nan")), ValueError, r"lr must be finite, got nan"),
    (dict(lr="0.1"), TypeError, r"lr must be a number, got '0.1'"),
    (dict(block_size=0), ValueError, r"block_size must be >= 2, got 0"),
    (dict(block_size=64), ValueError, r"block_size=64 is larger than every routed weight \(largest dimension 32\)"),
    (dict(block_size=2.5), TypeError, r"block_size must be an int in 'bs' mode, got 2.5"),
    (dict(block_size=1.5, mode="fs"), ValueError, r"block_size as a fraction must be in \(0, 1\], got 1.5"),
    (dict(block_size="8"), TypeError, r"block_size must be an int .*got '8'"),
    (dict(neumann_terms=0), ValueError, r"neumann_terms must be >= 1, got 0"),
    (dict(neumann_terms=2.0), TypeError, r"neumann_terms must be an int, got 2.0"),
    (dict(merge_every=0), ValueError, r"merge_every must be >= 1, got 0"),
    (dict(mode="bss"), ValueError, r"mode must be one of \('bs', 'fs'\), got 'bss'"),
    (dict(max_q_norm=0.0), ValueError, r"max_q_norm must be > 0.0, got 0.0"),
    (dict(store_base=1), TypeError, r"store_base must be a bool, got 1"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in \[0, 1\), got 1.0"),
    (dict(inner=torch.nn.Linear), TypeError, r"inner must be a torch.optim.Optimizer subclass"),
    (dict(inner_kwargs={"lr": 1.0}), ValueError, r"inner_kwargs must not set 'lr'"),
    (dict(nonfinite="ignore"), ValueError, r"nonfinite must be one of \('skip', 'raise'\), got 'ignore'"),
    (dict(seed=1.5), TypeError, r"seed must be an int, got 1.5"),
])
def test_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        geomopt.POET(model(), **kwargs)


def test_bad_params():
    with pytest.raises(TypeError, match="got a single Tensor of shape"):
        geomopt.POET(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="expected Tensors, got an item of type str"):
        geomopt.POET(["a"])
    with pytest.raises(ValueError, match="empty parameter list"):
        geomopt.POET([])
    with pytest.raises(TypeError, match=r"a torch.int64 tensor of shape \(5, 5\) cannot be optimized"):
        geomopt.POET([{"params": [torch.zeros(5, 5, dtype=torch.long)]}])
    opt = geomopt.POET(model())
    with pytest.raises(ValueError, match="block_size must be >= 2, got 1"):
        opt.add_param_group({"params": [nn.Linear(4, 4).weight], "block_size": 1})
    assert len(opt.param_groups) == 2  # the bad group was not added


def test_unnamed_params_warn_once_how_to_exclude_embeddings():
    with pytest.warns(UserWarning, match="factorize=False"):
        geomopt.POET(list(model().parameters()))


def test_sparse_gradients_raise_before_anything_changes_and_complex_parameters_at_construction():
    emb = nn.Embedding(10, 4, sparse=True)
    other = nn.Linear(4, 4)
    opt = geomopt.POET([{"params": [other.weight], "factorize": False}, {"params": [emb.weight], "factorize": False}])
    other(torch.randn(2, 4)).sum().backward()
    emb(torch.tensor([1, 2])).sum().backward()
    before = [emb.weight.detach().clone(), other.weight.detach().clone()]
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before[0]) and torch.equal(other.weight, before[1])  # the first group too
    assert not opt.state
    z = nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"complex64 tensor of shape \(4, 4\) cannot be optimized"):
        geomopt.POET([{"params": [z], "factorize": False}])
    with pytest.raises(TypeError, match="cannot be optimized"):
        opt.add_param_group({"params": [z], "factorize": False})


def test_state_dict_of_another_model_is_rejected_whole():
    a, b = model(), nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    oa, ob = geomopt.POET(a, block_size=8), geomopt.POET(b, block_size=8)
    for m, o in ((a, oa), (b, ob)):
        m(torch.randn(4, 16)).sum().backward()
        o.step()
    before = {k: {kk: vv for kk, vv in v.items()} for k, v in ob.state.items()}
    with pytest.raises(ValueError, match=r"\(24, 16\) weight .*'perm_row' must have 24 entries"):
        ob.load_state_dict(oa.state_dict())
    assert all(ob.state[k]["step"] == v["step"] for k, v in before.items() if "step" in v)
    with pytest.raises(ValueError, match="state_dict must be a dict with 'state' and 'param_groups'"):
        ob.load_state_dict({"state": {}})


def test_state_dict_of_another_optimizer_is_rejected():
    m = model()
    adamw = torch.optim.AdamW([p for p in m.parameters()])
    m(torch.randn(4, 16)).sum().backward()
    adamw.step()
    poet = geomopt.POET([{"params": list(m.parameters())}])
    with pytest.raises(ValueError, match=r"lacks \['block_size'.*another optimizer than POETOptimizer"):
        poet.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("cls,kwargs", [(geomopt.POET, dict(block_size=4)), (geomopt.ReLoRAReset, dict(rank=1)),
                                        (geomopt.DLRAMomentum, dict(rank=1))], ids=["poet", "relora", "dlra"])
def test_empty_and_tiny_weights_are_handled(cls, kwargs):
    empty, tiny, other = (nn.Parameter(torch.randn(*shape)) for shape in ((0, 5), (1, 1), (6, 4)))
    opt = cls([("a", empty), ("b", tiny), ("c", other)], **kwargs)
    for p in (empty, tiny, other):
        p.grad = torch.randn_like(p)
    opt.step()
    assert "exp_avg" in opt.state[empty] and torch.isfinite(tiny).all() and torch.isfinite(other).all()


@pytest.mark.parametrize("cls", [geomopt.POET, geomopt.ReLoRAReset, geomopt.DLRAMomentum])
def test_a_model_with_nothing_to_route_warns_that_it_gets_adamw(cls):
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten())
    with pytest.warns(UserWarning, match=f"{cls.__name__} routes none of its 4 parameters") as seen:
        cls(conv, lr=1e-3)
    assert seen[0].filename == __file__  # points at the caller's line
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(model(), lr=1e-3, **({"rank": 4} if cls is not geomopt.POET else {}))  # Linear weights: no warning
