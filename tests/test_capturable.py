"""POET's capturable step (``capturable=True``, both modes): its decisions are taken on the device, so a step that
merges nothing reads no device value (counted with the step-cost meter); it equals the host-decided step in
float64 where both decide alike, and where they differ by design (the safeguard keeps the permutations, a
non-finite gradient skips the whole step, an edited weight is re-based without a step) it keeps the invariants:
orthogonal rotations, bit-identical skips, the user's edit kept."""
import copy
import os
import sys

import pytest
import torch
from chain_model import chain_forward, make_chain, train_chain

import geomopt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import step_cost  # noqa: E402

SHAPES = [(20, 13), (20, 20), (20, 20), (20, 20), (12, 20), (12, 12)]  # ragged blocks of 8, groups of one shape
LEAN = dict(lr=2e-2, block_size=8, merge_every=5, store_base=False, lr_ref_block=8)  # lr is the factors' lr at b = 8
MODES = {"lean": {}, "paper": dict(store_base=True)}
SYNC_OPS = ("_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item", "Tensor.tolist")


def _state_tensors(opt):
    out = []
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                out.append(v.clone())
            elif isinstance(v, list):
                for x in v:
                    out += [t.clone() for t in (x.values() if isinstance(x, dict) else [x])
                            if isinstance(t, torch.Tensor)]
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(exact_cayley=True),
                                   dict(neumann_terms=4, foreach=True)])
def test_capturable_step_equals_the_host_step(flags, mode, float64):
    flags = {**flags, **MODES[mode]}
    host, ref = train_chain(lambda ps: geomopt.POET(ps, **{**LEAN, **flags}), SHAPES, steps=12)
    dev, opt = train_chain(lambda ps: geomopt.POET(ps, **{**LEAN, **flags}, capturable=True), SHAPES, steps=12)
    assert ref.stats["merges"] > 0 and opt.stats == ref.stats
    for a, b in zip(dev, host):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        mine, theirs = opt.state[p], ref.state[q]
        if "q_row" not in mine:
            continue
        assert torch.equal(mine["perm_row"], theirs["perm_row"]) and torch.equal(mine["perm_col"], theirs["perm_col"])
        for key in ("q_row", "q_col"):
            for a, b in zip(mine[key], theirs[key]):
                assert (a - b).abs().max() <= 1e-10 * (1 + b.abs().max())
        for a, b in zip(mine["inner_row"] + mine["inner_col"], theirs["inner_row"] + theirs["inner_col"]):
            assert float(a["step"]) == float(b["step"])
            assert (a["exp_avg"] - b["exp_avg"]).abs().max() <= 1e-10 * (1 + b["exp_avg"].abs().max())


def _meter_steps(opt, layers, scale, steps):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        x = torch.randn(16, SHAPES[0][1], generator=g)
        opt.zero_grad()
        h = x * scale
        for layer in layers:
            h = torch.tanh(layer(h))
        h.pow(2).mean().backward()
        with step_cost.StepCost() as meter:
            opt.step()
        out.append(meter)
    return out


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(exact_cayley=True),
                                   dict(store_base=True, foreach=True), dict(store_base=True, foreach=False)])
def test_a_step_that_merges_nothing_reads_no_device_value(flags):
    layers, scale = make_chain(SHAPES)
    groups = [{"params": list(layers.named_parameters())}, {"params": [("scale", scale)], "factorize": False}]
    opt = geomopt.POET(groups, **{**LEAN, "merge_every": 4, **flags}, capturable=True)
    meters = _meter_steps(opt, layers, scale, 8)
    for i, m in enumerate(meters):
        syncs = {k: v for k, v in m.by_op.items() if k in SYNC_OPS}
        if (i + 1) % 4:  # no merge in this step
            assert m.syncs == 0, syncs
    host = geomopt.POET(groups, **{**LEAN, "merge_every": 4, **flags})
    assert all(m.syncs > 0 for m in _meter_steps(host, layers, scale, 2))  # the host step reads: the meter sees it


@pytest.mark.parametrize("mode", list(MODES))
def test_the_safeguard_rotates_exactly_and_merges_on_the_device(mode, float64):
    kw = dict(LEAN, lr=0.3, max_q_norm=0.5, merge_every=100, **MODES[mode])
    layers, scale = make_chain(SHAPES)
    before = [layer.weight.detach().clone() for layer in layers]
    _, ref = train_chain(lambda ps: geomopt.POET(ps, **kw, foreach=True), SHAPES, steps=1)
    host = [w.detach().clone() for w in _[:-1]]
    after, opt = train_chain(lambda ps: geomopt.POET(ps, **kw, foreach=True, capturable=True), SHAPES, steps=1)
    assert ref.stats["early_merges"] == len(SHAPES) and opt.stats == ref.stats
    for w0, a, b in zip(before, after, host):  # the same exact Cayley step; singular values kept
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
        sv0, sv = torch.linalg.svdvals(w0), torch.linalg.svdvals(a)
        assert (sv - sv0).abs().max() <= 1e-12 * sv0.max()
    for st in opt.state.values():
        if "q_row" not in st:
            continue
        assert all(torch.equal(q, torch.zeros_like(q)) for q in st["q_row"] + st["q_col"])
        for inner in st["inner_row"] + st["inner_col"]:
            assert float(inner["step"]) == 0 and not inner["exp_avg"].any() and not inner["exp_avg_sq"].any()
        assert isinstance(st["early_merges"], torch.Tensor) and int(st["early_merges"]) == 1
        if mode == "paper":  # merged: W0 is the new weight
            assert torch.equal(st["w0"], next(p for p in opt.state if opt.state[p] is st).detach())


@pytest.mark.parametrize("mode", list(MODES))
def test_a_non_finite_gradient_skips_the_whole_step_on_the_device(mode, float64):
    kw = dict(LEAN, merge_every=100, **MODES[mode])
    layers, scale = make_chain(SHAPES)
    params = [(f"layers.{i}.weight", layer.weight) for i, layer in enumerate(layers)] + [("scale", scale)]
    opt = geomopt.POET(params, **kw, capturable=True, foreach=True)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(32, SHAPES[0][1], generator=g), torch.randn(32, SHAPES[-1][0], generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(chain_forward([layer.weight for layer in layers], scale, x), y).backward()
        if step != 3:
            opt.step()
            continue
        layers[2].weight.grad[1, 2] = float("nan")
        weights, state = [p.detach().clone() for p in opt.param_groups[0]["params"]], _state_tensors(opt)
        opt.step()  # every weight, factor and moment as it was, to the bit
        assert all(torch.equal(a, b) for a, b in zip(weights, opt.param_groups[0]["params"]))
        assert all(torch.equal(a, b) for a, b in zip(state, _state_tensors(opt)) if a.is_floating_point())
    assert opt.stats["nonfinite_skips"] == 1
    after = [p.detach().clone() for p in opt.param_groups[0]["params"]]

    def poison_all(step, layers_):  # the host step skips each tensor with a non-finite gradient
        if step == 3:
            for p in list(layers_.parameters()) + [ref_scale[0]]:
                p.grad.fill_(float("nan"))

    ref_scale = []

    def make_ref(ps):
        ref_scale.append(dict(ps)["scale"])
        return geomopt.POET(ps, **kw, foreach=True)

    host, ref = train_chain(make_ref, SHAPES, steps=6, edit=poison_all)
    assert ref.stats["nonfinite_skips"] == len(SHAPES) + 1
    for a, b in zip(after, host):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_state_dict_and_deepcopy_round_trip(float64):
    def make(ps):
        return geomopt.POET(ps, **{**LEAN, "lr": 0.3}, max_q_norm=0.5, capturable=True, foreach=True)

    layers, scale = make_chain(SHAPES)
    opt = make(list(layers.named_parameters()))
    def step(o, ls):
        x = torch.randn(8, SHAPES[0][1], generator=torch.Generator().manual_seed(len(ls)))
        o.zero_grad()
        h = x
        for layer in ls:
            h = torch.tanh(layer(h))
        h.sum().backward()
        o.step()

    for _ in range(3):
        step(opt, layers)
    twin_layers = copy.deepcopy(layers)
    twin = make(list(twin_layers.named_parameters()))
    twin.load_state_dict(opt.state_dict())
    clone_layers, clone = copy.deepcopy((layers, opt))  # the optimizer's copy steps the copied layers
    assert clone.stats == twin.stats == opt.stats and opt.stats["early_merges"] > 0
    for _ in range(3):
        step(opt, layers)
        step(twin, twin_layers)
        step(clone, clone_layers)
    assert all(torch.equal(a, b) for a, b in zip(layers.parameters(), twin_layers.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(layers.parameters(), clone_layers.parameters()))


@pytest.mark.parametrize("kwargs,why", [
    (dict(external_edits="raise"), "external_edits='raise'"),
    (dict(store_base=False, max_q_norm=None), "max_q_norm=None"),
    (dict(store_base=False, nonfinite="raise"), "nonfinite='raise'"),
    (dict(store_base=False, inner=torch.optim.SGD), "an inner rule other than torch Adam"),
    (dict(store_base=False, inner_kwargs=dict(fused=False)), "an inner rule other than torch Adam"),
])
def test_what_capturable_cannot_do_is_refused_up_front(kwargs, why):
    w = ("w", torch.nn.Parameter(torch.randn(8, 8)))
    with pytest.raises(ValueError, match=f"capturable=True is not supported with {why}"):
        geomopt.POET([w], capturable=True, block_size=4, **kwargs)
    for cls in (geomopt.ReLoRAReset, geomopt.DLRAMomentum):
        with pytest.raises(ValueError, match="capturable=True is not supported"):
            cls([w], capturable=True)


def test_a_strided_adamw_routed_tensor_is_refused_before_anything_changes():
    base = torch.randn(10, 3)
    w, v = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(base[:, 1])
    groups = [{"params": [("w", w)]}, {"params": [("v", v)], "factorize": False}]
    opt = geomopt.POET(groups, store_base=False, block_size=4, capturable=True)
    w.grad, v.grad = torch.randn(8, 8), torch.randn(10)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"AdamW-routed parameter of shape \(10,\) must be a contiguous"):
        opt.step()
    assert torch.equal(w, before) and not opt.state


def test_paper_mode_re_bases_an_edited_weight_on_the_device_and_keeps_the_edit(float64):
    edits = {}

    def edit(step, layers):
        if step == 4:
            with torch.no_grad():
                layers[1].weight.mul_(1.5)
            edits["after"] = layers[1].weight.detach().clone()

    kw = dict(LEAN, store_base=True, merge_every=100)
    seen = {}

    def make(ps):
        seen["opt"] = opt = geomopt.POET(ps, **kw, capturable=True, foreach=True)
        opt.register_step_post_hook(lambda o, a, k: seen.setdefault(len(seen), [
            p.detach().clone() for p in o.param_groups[0]["params"]]))
        return opt

    train_chain(make, SHAPES, steps=5, edit=edit)
    opt, after_edit_step = seen["opt"], seen[5]
    p = opt.param_groups[0]["params"][1]
    assert torch.equal(after_edit_step[1], edits["after"])  # the user's edit stands, the step did not move it
    st = opt.state[p]
    assert torch.equal(st["w0"], edits["after"]) and all(not q.any() for q in st["q_row"] + st["q_col"])
    assert opt.stats["rebases"] == 1 and opt.stats["early_merges"] == 0
    others = [i for i in range(len(SHAPES)) if i != 1]
    assert all(not torch.equal(after_edit_step[i], seen[4][i]) for i in others)  # the others stepped
    # and the next step trains it again from there, as the plain step would from its re-based factors
    x = torch.randn(8, SHAPES[0][1])
    opt.zero_grad()
    h = x
    for w in [q for q in opt.param_groups[0]["params"] if q.dim() == 2]:
        h = torch.tanh(h @ w.T)
    h.sum().backward()
    opt.step()
    assert not torch.equal(p.detach(), edits["after"]) and opt.stats["rebases"] == 1
