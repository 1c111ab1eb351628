"""Hostile inputs, generated (hypothesis, 300 + 100 cases): odd shapes (1 x 1 to ragged), empty tensors,
non-contiguous and transposed views as weights, integer tensors, requires_grad=False, duplicate parameters
across groups, state_dicts of another optimizer or another model. Each is handled (the step runs and every
value stays finite and in place) or rejected with ValueError/TypeError naming the cause; nothing raises
anything else, and a rejected state_dict leaves the optimizer as it was."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import geomopt

CLASSES = {
    "poet": lambda ps, **kw: geomopt.POET(ps, lr=1e-2, block_size=4, merge_every=2, **kw),
    "poet-fs": lambda ps, **kw: geomopt.POET(ps, lr=1e-2, block_size=0.5, mode="fs", merge_every=2, **kw),
    "relora": lambda ps, **kw: geomopt.ReLoRAReset(ps, lr=1e-2, rank=2, reset_every=2, **kw),
    "dlra": lambda ps, **kw: geomopt.DLRAMomentum(ps, lr=1e-2, rank=2, **kw),
}

SHAPE = st.one_of(st.tuples(st.integers(0, 9), st.integers(0, 9)), st.tuples(st.integers(1, 40)),
                  st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 3)), st.just(()))
KIND = st.sampled_from(["plain", "transposed", "strided", "int", "frozen"])


def make_tensor(shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "int":
        return nn.Parameter(torch.randint(0, 5, shape, generator=g), requires_grad=False)
    if kind == "transposed" and len(shape) == 2:
        return nn.Parameter(torch.randn(shape[1], shape[0], generator=g).T)
    if kind == "strided" and len(shape) >= 1:
        big = torch.randn(*shape[:-1], shape[-1] * 2, generator=g)
        return nn.Parameter(big[..., ::2])
    return nn.Parameter(torch.randn(shape, generator=g), requires_grad=kind != "frozen")


def finite_and_shaped(params, shapes):
    return all(tuple(p.shape) == s and (not p.is_floating_point() or bool(torch.isfinite(p).all()))
               for p, s in zip(params, shapes))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(list(CLASSES)), specs=st.lists(st.tuples(SHAPE, KIND), min_size=0, max_size=4),
       duplicate=st.booleans(), grouped=st.booleans(), seed=st.integers(0, 2**16))
def test_generated_parameters_are_handled_or_rejected_cleanly(name, specs, duplicate, grouped, seed):
    params = [make_tensor(shape, kind, seed + i) for i, (shape, kind) in enumerate(specs)]
    arg = params
    if grouped or duplicate:
        arg = [{"params": params}] + ([{"params": params[:1]}] if duplicate and params else [])
    try:
        opt = CLASSES[name](arg)
    except (ValueError, TypeError) as err:
        msg = str(err)
        causes = {"empty parameter list": not params, "more than one parameter group": duplicate,
                  "cannot be optimized": any(p.dtype == torch.long for p in params),
                  "rank=": "relora" in name or "dlra" in name, "block_size=": "poet" in name}
        assert any(text in msg and possible for text, possible in causes.items()), msg
        return
    assert not (duplicate and params) and all(p.is_floating_point() for p in params)
    shapes = [tuple(p.shape) for p in params]
    for step in range(3):  # crosses a merge / reset
        for i, p in enumerate(params):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7 * step + i))
        opt.step()
        assert finite_and_shaped(params, shapes)
    frozen = [p for p in params if not p.requires_grad]
    assert all(not opt.state.get(p) for p in frozen)


def trained(name, shapes, seed=0, steps=3):
    params = [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(seed + i)))
              for i, s in enumerate(shapes)]
    opt = CLASSES[name]([("w%d" % i, p) for i, p in enumerate(params)])
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        opt.step()
    return params, opt


def snapshot(opt):
    out = []
    for st_ in opt.state.values():
        for v in st_.values():
            out += [v.clone()] if isinstance(v, torch.Tensor) else [repr(v)]
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(a, b))


@settings(max_examples=100, deadline=None)
@given(source=st.sampled_from(list(CLASSES)), target=st.sampled_from(list(CLASSES)),
       src_shapes=st.lists(st.sampled_from([(8, 6), (6, 8), (5, 5), (7,), (9, 4)]), min_size=1, max_size=3),
       dst_shapes=st.lists(st.sampled_from([(8, 6), (6, 8), (5, 5), (7,), (9, 4)]), min_size=1, max_size=3))
def test_foreign_state_dicts_load_only_when_they_fit(source, target, src_shapes, dst_shapes):
    _, src = trained(source, src_shapes)
    dst_params, dst = trained(target, dst_shapes, seed=1)
    before = snapshot(dst)
    sd = src.state_dict()
    # a state_dict carries its groups' settings (torch semantics), so POET block-stochastic state fits a POET
    # built fully stochastic for the same shapes: it becomes block-stochastic
    layout = [[tuple(p.shape) for p in g["params"]] for g in src.param_groups]  # what the state maps onto
    fits = source.split("-")[0] == target.split("-")[0] and layout == [[tuple(p.shape) for p in g["params"]]
                                                                      for g in dst.param_groups]
    try:
        dst.load_state_dict(sd)
    except (ValueError, TypeError) as err:
        assert str(err)
        assert same(before, snapshot(dst))  # nothing half-loaded
        return
    assert fits, f"a {source} state for {src_shapes} loaded into {target} for {dst_shapes}"
    for p in dst_params:
        p.grad = torch.ones_like(p)
    dst.step()
    assert all(bool(torch.isfinite(p).all()) for p in dst_params)


def test_a_torch_adamw_state_dict_is_rejected_by_name():
    params, opt = trained("poet", [(8, 6)])
    adam = torch.optim.AdamW(params)
    params[0].grad = torch.ones_like(params[0])
    adam.step()
    with pytest.raises(ValueError, match=r"param group 0 of the state_dict lacks .*another optimizer than POET"):
        opt.load_state_dict(adam.state_dict())
