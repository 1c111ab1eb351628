"""torch.optim's generic contract, for every configuration in the table (the properties of PyTorch's own
test/test_optim.py, TestOptimRenewed): right direction on contiguous and non-contiguous tensors in float32 and
float64 (and with maximize), tensor lr, deepcopy and pickle, deterministic state_dicts that round-trip through
``weights_only`` loads, older state_dicts, named parameters, zero-gradient steps, parameters without gradients,
empty groups, hooks once per step, the implementation flags, and errors for bad input."""
import copy
import io
import pickle

import pytest
import torch
from contract_tools import Problem, build, clone_pair, flat_state, lockstep, run, same
from optim_table import CONFIGS, IDS
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import geomopt

FLAGS = ("maximize", "foreach", "fused", "capturable", "differentiable")
# group settings added after the first state_dicts were saved: each must load from a state_dict that lacks it
NEWER_SETTINGS = ("row_shards", "lr_ref_block", "neumann_form", "exact_merge", "compensate", "reset_offset")


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("layout", ["contiguous", "non-contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", IDS)
def test_goes_right_direction(name, dtype, layout, maximize):
    problem = Problem(dtype, layout == "non-contiguous")
    first = problem.loss().item()
    _, losses = run(name, problem, 12, maximize=maximize)
    last = problem.loss().item()
    assert (last > first) if maximize else (last < first), (first, last)
    if layout == "non-contiguous":  # the same values as on contiguous tensors
        plain = Problem(dtype)
        run(name, plain, 12, maximize=maximize)
        for a, b in zip(problem.params(), plain.params()):
            assert not a.is_contiguous() and torch.allclose(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                                            atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("name", IDS)
def test_maximize_set_in_the_groups_is_honoured_by_the_factor_steps(name):
    problem = Problem(torch.float64)
    opt = build(name, problem)
    for g in opt.param_groups:
        g["maximize"] = True
    first = problem.loss().item()
    for _ in range(12):
        opt.zero_grad()
        problem.loss().backward()
        opt.step()
    assert problem.loss().item() > first


@pytest.mark.parametrize("name", IDS)
def test_tensor_lr_equals_float_lr_and_follows_a_scheduler(name):
    lr = CONFIGS[name].kwargs["lr"]
    runs = []
    for value in (lr, torch.tensor(lr, dtype=torch.float64)):
        problem = Problem(torch.float64)
        opt = build(name, problem, lr=value)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        for _ in range(8):
            opt.zero_grad()
            problem.loss().backward()
            opt.step()
            sched.step()
        runs.append(problem.params())
        assert isinstance(opt.param_groups[0]["lr"], type(value))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="lr as a tensor must have one floating-point element"):
        build(name, Problem(), lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="lr must be >= 0.0"):
        build(name, Problem(), lr=torch.tensor(-1.0))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", IDS)
def test_deepcopy_and_pickle_give_an_optimizer_that_steps_the_same(name, how):
    problem = Problem(torch.float64)
    opt, _ = run(name, problem, 5, nonfinite="raise", seed=3)
    twin_problem, twin = clone_pair(problem, opt) if how == "deepcopy" else pickle.loads(pickle.dumps((problem, opt)))
    public = sorted(k for k in vars(opt) if not k.startswith("_"))
    assert public == sorted(k for k in vars(twin) if not k.startswith("_"))
    assert twin.nonfinite == "raise" and twin._seed == 3
    lockstep([(problem, opt), (twin_problem, twin)], 6)  # crosses merges / resets
    for a, b in zip(problem.params(), twin_problem.params()):
        assert torch.equal(a, b)
    assert opt.stats == twin.stats and type(twin).__name__ in repr(twin)


@pytest.mark.parametrize("name", IDS)
def test_state_dict_is_deterministic_and_round_trips_weights_only(name):
    problem = Problem(torch.float64)
    opt, _ = run(name, problem, 9)
    sd = opt.state_dict()
    assert same(flat_state(opt), flat_state(opt))  # reading it changes nothing
    again = opt.state_dict()
    assert sd["param_groups"] == again["param_groups"]
    twin_problem = copy.deepcopy(problem)
    twin = build(name, twin_problem)
    twin.load_state_dict(roundtrip(sd))
    assert same(flat_state(opt), flat_state(twin))
    lockstep([(problem, opt), (twin_problem, twin)], 5)
    for a, b in zip(problem.params(), twin_problem.params()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", IDS)
def test_an_older_state_dict_loads_and_missing_settings_take_their_defaults(name):
    """A state_dict saved before the torch flags, the newer settings and ``built_with`` existed."""
    problem = Problem(torch.float64)
    opt, _ = run(name, problem, 6)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in FLAGS + NEWER_SETTINGS:
            group.pop(key, None)
    for st in sd["state"].values():
        st.pop("built_with", None)
        for key, v in st.items():  # torch once saved inner step counts as plain numbers
            for s in v if isinstance(v, list) else [v]:
                if isinstance(s, dict) and isinstance(s.get("step"), torch.Tensor):
                    s["step"] = float(s["step"])
    twin_problem = copy.deepcopy(problem)
    twin = build(name, twin_problem)
    twin.load_state_dict(sd)
    assert all(g[k] == v for g in twin.param_groups for k, v in twin.defaults.items() if k in FLAGS)
    lockstep([(problem, opt), (twin_problem, twin)], 5)
    for a, b in zip(problem.params(), twin_problem.params()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", IDS)
def test_named_parameters_keep_their_names_through_the_state_dict(name):
    problem = Problem()
    opt, _ = run(name, problem, 2)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == ["b", "v", "w"]
    sd = roundtrip(opt.state_dict())
    assert [n for g in sd["param_groups"] for n in g["param_names"]] == names
    twin = build(name, copy.deepcopy(problem))
    twin.load_state_dict(sd)
    assert [n for g in twin.param_groups for n in g["param_names"]] == names
    unnamed = CONFIGS[name].build([{"params": [problem.w]}, {"params": [problem.b], "factorize": False}])
    assert all("param_names" not in g for g in unnamed.param_groups)


@pytest.mark.parametrize("name", IDS)
def test_zero_gradients_leave_the_parameters(name):
    if CONFIGS[name].moves_at_zero_grad:
        pytest.skip(CONFIGS[name].moves_at_zero_grad)
    problem = Problem(torch.float64)
    opt = build(name, problem, weight_decay=0.0)
    before = [p.detach().clone() for p in problem.params()]
    for _ in range(9):  # crosses merges / resets: they change factors, never the weights
        for p in problem.params():
            p.grad = torch.zeros_like(p)
        opt.step()
    for a, b in zip(before, problem.params()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_parameters_without_gradients_and_empty_groups_are_left_alone(name):
    problem = Problem()
    opt = CONFIGS[name].build([{"params": [problem.w, problem.v]}, {"params": [problem.b], "factorize": False}])
    opt.add_param_group({"params": [], "lr": 1e-3})
    before = [p.detach().clone() for p in problem.params()]
    problem.b.grad = torch.randn_like(problem.b)
    opt.step()  # only b has a gradient
    assert torch.equal(problem.w, before[0]) and torch.equal(problem.v, before[1])
    assert not opt.state.get(problem.w) and not opt.state.get(problem.v) and opt.state[problem.b]
    opt.zero_grad()
    opt.step()  # no gradient at all
    twin_problem = copy.deepcopy(problem)
    twin = CONFIGS[name].build([{"params": [twin_problem.w, twin_problem.v]},
                                {"params": [twin_problem.b], "factorize": False}])
    twin.add_param_group({"params": [], "lr": 1e-3})
    twin.load_state_dict(roundtrip(opt.state_dict()))
    assert len(twin.param_groups) == len(opt.param_groups) and same(flat_state(opt), flat_state(twin))


@pytest.mark.parametrize("name", IDS)
def test_hooks_fire_once_per_step(name):
    problem = Problem()
    opt = build(name, problem)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
               opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post"))]
    try:
        for _ in range(8):  # crosses merges / resets
            opt.zero_grad()
            problem.loss().backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", "post", "global post"] * 8


@pytest.mark.parametrize("name", IDS)
def test_foreach_and_fused_equal_the_loop_in_float64(name):
    results = {}
    for flags in (dict(fused=False, foreach=False), dict(fused=True), dict(foreach=True), {}):
        problem = Problem(torch.float64, non_contiguous=True)  # fused: strided tensors take the loop
        run(name, problem, 10, **flags)
        results[str(flags)] = problem.params()
    plain = results.pop(str(dict(fused=False, foreach=False)))
    for key, got in results.items():
        for a, b in zip(got, plain):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-13), key


def test_strided_parameters_and_gradients_get_torchs_update_with_fused_on():
    """torch's fused CPU kernel ignores strides; geomopt's AdamW path equals torch's plain AdamW on them."""
    torch.manual_seed(0)
    for flags in ({}, dict(fused=True)):
        base = torch.randn(10, 3)
        mine, ref = torch.nn.Parameter(base[:, 1]), torch.nn.Parameter(base[:, 1].clone())
        opt = geomopt.POET([{"params": [mine], "factorize": False}], lr=0.1, **flags)
        torch_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.01)
        for _ in range(5):
            g = torch.randn(3, 10).T[:, 0]  # a strided gradient
            mine.grad, ref.grad = g, g.clone()
            opt.step()
            torch_opt.step()
        assert not mine.is_contiguous() and torch.equal(mine, ref)


@pytest.mark.parametrize("name", IDS)
def test_bad_arguments_name_the_argument_and_value(name):
    cfg, problem = CONFIGS[name], Problem()
    capturable = cfg.cls is geomopt.POET and "inner" not in cfg.kwargs  # test_capturable.py
    for kwargs, exc, pattern in [
        *([] if capturable else [(dict(capturable=True), ValueError, "capturable=True is not supported")]),
        (dict(differentiable=True), ValueError, "differentiable=True is not supported"),
        (dict(foreach=True, fused=True), ValueError, "foreach and fused cannot both be True"),
        (dict(maximize="yes"), TypeError, "maximize must be a bool, got 'yes'"),
        (dict(fused=1), TypeError, "fused must be None or a bool, got 1"),
        (dict(external_edits="ignore"), ValueError, r"external_edits must be one of \('rebase', 'raise'\)"),
        (dict(lr=-1.0), ValueError, "lr must be >= 0.0, got -1.0"),
    ]:
        with pytest.raises(exc, match=pattern):
            build(name, problem, **kwargs)
    opt = build(name, problem)
    if capturable:
        named = [("extra", torch.nn.Parameter(torch.zeros(3)))] if "param_names" in opt.param_groups[0] else [
            torch.nn.Parameter(torch.zeros(3))]
        opt.add_param_group({"params": named, "capturable": True})
        assert opt.param_groups[-1]["capturable"] is True
    else:
        with pytest.raises(ValueError, match="capturable=True is not supported"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "capturable": True})
    with pytest.raises(TypeError, match="complex64 tensor of shape"):
        cfg.build([torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))])


@pytest.mark.parametrize("name", IDS)
def test_step_inside_inference_mode_and_autocast_equals_a_plain_step(name):
    results = []
    for ctx in (None, "inference", "autocast"):
        problem = Problem()
        opt = build(name, problem)
        for _ in range(6):
            opt.zero_grad()
            problem.loss().backward()
            if ctx == "inference":
                with torch.inference_mode():
                    opt.step()
            elif ctx == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step()
            else:
                opt.step()
        results.append(problem.params())
        assert all(not t.is_inference() for st in opt.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", IDS)
def test_tiny_shapes(name):
    cfg = CONFIGS[name]
    if cfg.cls is geomopt.POET and isinstance(cfg.kwargs["block_size"], int):
        over = dict(block_size=2)
    else:
        over = dict(cfg.tiny)
    shapes = [(1, 7), (6, 1), (5, 1), (2, 2), (3, 2)]
    params = [torch.nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in shapes]
    opt = cfg.build([(f"w{i}", p) for i, p in enumerate(params)], **over)
    for step in range(8):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(10 * step + i))
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert all(cfg.factor_key in opt.state[p] for p in params)


@pytest.mark.parametrize("name", IDS)
def test_the_state_a_step_makes_fits_its_declared_layout(name):
    """The layout ``load_state_dict`` checks against is the one the optimizer creates, merges and resets."""
    from geomopt.optim import state as layout

    problem = Problem()
    opt = build(name, problem)
    for steps in (1, 8):  # fresh, then across merges / resets
        for _ in range(steps):
            opt.zero_grad()
            problem.loss().backward()
            opt.step()
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                spec = opt._declared_layout(p, group, st) if p.dim() == 2 else layout.adamw_layout(tuple(p.shape))
                layout.check(spec, st, name)
                assert set(st) <= set(spec), sorted(set(st) - set(spec))  # nothing undeclared
