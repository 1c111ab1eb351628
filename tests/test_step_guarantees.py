"""What a geomopt step guarantees, for every configuration in the table: it never overwrites what the user wrote
into a weight, it applies changed group settings or refuses them before anything changes, it is all-or-nothing
(an exception anywhere leaves every weight with its own state, and a retried step equals one step), and
overflowed moments never become NaN."""
import copy
import os
import signal

import pytest
import torch
from contract_tools import Problem, build, flat_state, refused, same
from optim_table import CONFIGS, IDS
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import geomopt


def train(problem, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        problem.loss().backward()
        opt.step()


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def edit(problem, kind):
    """Change w from outside the optimizer; returns the new value."""
    new = (problem.w.detach() * 2 + 0.5).clone()
    if kind == "in-place":
        with torch.no_grad():
            problem.w.mul_(2).add_(0.5)
    elif kind == "data":  # .data edits are invisible to torch's version counter
        problem.w.data.mul_(2).add_(0.5)
    else:
        module = nn.Module()
        for n, p in problem.named():
            module.register_parameter(n, p)
        module.load_state_dict({"w": new, "v": problem.v.detach().clone(), "b": problem.b.detach().clone()})
    return new


@pytest.mark.parametrize("kind", ["in-place", "data", "load_state_dict"])
@pytest.mark.parametrize("name", IDS)
def test_a_weight_changed_outside_is_never_overwritten(name, kind):
    problem = Problem(torch.float64)
    opt = build(name, problem)
    train(problem, opt, 6)
    old = problem.w.detach().clone()
    new = edit(problem, kind)
    assert torch.equal(problem.w, new)
    set_lr(opt, 0.0)  # a step that moves nothing: the weight must stay what the user wrote
    train(problem, opt, 1)
    assert torch.equal(problem.w, new)
    set_lr(opt, CONFIGS[name].kwargs["lr"])
    train(problem, opt, 1)  # a real step starts from the new weight
    assert (problem.w - new).norm() < 0.5 * (new - old).norm()
    assert opt.stats["rebases"] == (1 if CONFIGS[name].overwrites else 0)  # once, and no spurious one after


@pytest.mark.parametrize("name", [n for n in IDS if CONFIGS[n].overwrites])
def test_external_edits_raise_policy_raises_before_anything_changes(name):
    problem = Problem(torch.float64)
    opt = build(name, problem, external_edits="raise")
    train(problem, opt, 4)
    edit(problem, "data")
    refused(problem, opt, RuntimeError, r"a weight of shape \(6, 5\) .* was changed outside")


def test_a_loaded_model_is_kept_by_paper_mode_poet():
    """The reported case: a 16 x 16 Linear, POET paper mode, model.load_state_dict between two steps."""
    torch.manual_seed(0)
    lin, other = nn.Linear(16, 16), nn.Linear(16, 16)
    opt = geomopt.POET(lin, lr=1e-2, block_size=4)
    x = torch.randn(32, 16)
    for _ in range(3):
        opt.zero_grad()
        lin(x).square().mean().backward()
        opt.step()
    gap = (lin.weight - other.weight).norm()  # where an overwrite would bring it back to
    lin.load_state_dict(other.state_dict())
    opt.zero_grad()
    lin(x).square().mean().backward()
    opt.step()
    assert (lin.weight - other.weight).norm() < 0.1 * gap and opt.stats["rebases"] == 1


def test_two_optimizers_on_one_weight_each_keep_the_others_update():
    """POET (paper mode) and torch's AdamW step the same weight: POET re-bases on AdamW's write every step."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False)
    poet, adamw = geomopt.POET([("w", lin.weight)], lr=0.0, block_size=4), torch.optim.AdamW([lin.weight], lr=1e-2)
    x = torch.randn(16, 8)
    for step in range(4):
        lin.zero_grad()
        lin(x).square().mean().backward()
        poet.step()
        adamw.step()
        after = lin.weight.detach().clone()
        poet.step()  # lr 0: keeps what AdamW wrote
        assert torch.equal(lin.weight, after)
    assert poet.stats["rebases"] == 4


def settings_changes(name):
    """(group key, new value, applied?) for the configuration's method."""
    cfg = CONFIGS[name]
    changes = [("factorize", False, True)]
    if cfg.cls is geomopt.POET:
        fs = cfg.kwargs.get("mode") == "fs"
        changes += [("block_size", 0.25 if fs else (2 if cfg.kwargs["block_size"] == 3 else 3), True),
                    ("mode", "bs" if fs else "fs", True),
                    ("store_base", not cfg.kwargs.get("store_base", True), True),
                    ("neumann_terms", 5 if cfg.kwargs.get("neumann_terms") == 3 else 3, True),
                    ("exact_cayley", not cfg.kwargs.get("exact_cayley", False), True)]
        if fs:
            changes.remove(("mode", "bs", True))
    elif cfg.cls is geomopt.ReLoRAReset:
        changes += [("rank", 1 if cfg.kwargs["rank"] > 1 else 2, True)]
    else:
        changes += [("method", "adam" if cfg.kwargs.get("method") != "adam" else "heavy_ball", True),
                    ("rank", cfg.kwargs["rank"] + 1, False)]
    return changes


@pytest.mark.parametrize("name", IDS)
def test_group_settings_changed_mid_run_are_applied_or_refused_before_anything_changes(name):
    for key, value, applied in settings_changes(name):
        problem = Problem(torch.float64)
        opt = build(name, problem)
        train(problem, opt, 6)
        group = next(g for g in opt.param_groups if any(p is problem.w for p in g["params"]))
        group[key] = value
        if not applied:
            refused(problem, opt, ValueError, f"{key}={value!r}: .* cannot change '{key}'")
            continue
        opt.zero_grad()
        problem.loss().backward()
        weights = [p.detach().clone() for p in problem.params()]
        set_lr(opt, 0.0)
        opt.step()  # the new layout is built on the weight as it is
        assert all(torch.equal(a, b) for a, b in zip(weights, problem.params())), key
        set_lr(opt, CONFIGS[name].kwargs["lr"])
        train(problem, opt, 8)  # and trains: across merges / resets in the new layout
        assert all(torch.isfinite(p).all() for p in problem.params()), key
        st = opt.state[problem.w]
        assert (CONFIGS[name].factor_key in st) == (key != "factorize"), key
        if key != "factorize":
            assert opt.stats["rebuilds"] == 2 and st["built_with"][key] == value, key  # w and v


@pytest.mark.parametrize("name", IDS)
def test_a_bad_value_set_in_a_later_group_changes_nothing(name):
    problem = Problem(torch.float64)
    opt = CONFIGS[name].build([{"params": [problem.b], "factorize": False}, {"params": [problem.w, problem.v]}])
    train(problem, opt, 3)
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    refused(problem, opt, ValueError, r"betas\[1\] must be in \[0, 1\), got 1.5")


@pytest.mark.parametrize("name", IDS)
def test_a_layer_frozen_at_construction_trains_once_unfrozen(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    model[0].requires_grad_(False)
    opt = CONFIGS[name].build(model)  # like torch.optim.AdamW(model.parameters()): the frozen layer is kept
    assert any(p is model[0].weight for g in opt.param_groups for p in g["params"])
    x, y = torch.randn(16, 5), torch.randn(16, 4)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    steps(3)
    assert not opt.state.get(model[0].weight)
    model[0].requires_grad_(True)
    before = model[0].weight.detach().clone()
    steps(3)
    assert CONFIGS[name].factor_key in opt.state[model[0].weight] and not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("name", IDS)
def test_a_gradient_of_another_dtype_is_taken(name):
    """torch lets a parameter's gradient have another dtype (``grad_dtype = None``): the step reads it."""
    runs = []
    for dtype in (torch.float32, torch.float64):
        problem = Problem()
        opt = build(name, problem)
        for step in range(4):
            for i, p in enumerate(problem.params()):
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
                p.grad_dtype = None
                p.grad = g.to(dtype)
            opt.step()
        runs.append(problem.params())
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


class FailAt(TorchDispatchMode):
    """Raise ``exc`` at the k-th aten op that allocates its output (where a real out-of-memory error happens); ops
    that write in place or return views never fail, nor do the profiler's markers around torch's step hooks."""

    def __init__(self, k, exc=MemoryError):
        super().__init__()
        self.k, self.n, self.exc = k, 0, exc

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        if func.namespace == "aten" and not schema.is_mutable and all(r.alias_info is None for r in schema.returns):
            self.n += 1
            if self.n == self.k:
                raise self.exc("injected")
        return func(*args, **(kwargs or {}))


def prepared(name, seed=0):
    problem = Problem(torch.float64, seed=seed)
    opt = build(name, problem)
    train(problem, opt, 5)  # the next step merges / resets for most configurations
    opt.zero_grad()
    problem.loss().backward()
    return problem, opt


def rebuilt(name, problem, opt):
    """A second (problem, optimizer) in the same state, through the state_dict, with the same gradients."""
    twin_problem = copy.deepcopy(problem)
    for a, b in zip(problem.params(), twin_problem.params()):
        b.grad = a.grad.clone()
    twin = build(name, twin_problem)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin_problem, twin


def per_param(problem, opt):
    return [(p.detach().clone(), flat_state_of(opt, p)) for p in problem.params()]


def flat_state_of(opt, p):
    one = copy.copy(opt)
    one.param_groups = [{"params": [p]}]
    return flat_state(one)


@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("name", IDS)
def test_an_exception_mid_step_leaves_each_weight_with_its_state_and_a_retry_equals_one_step(name, exc):
    problem, opt = prepared(name)
    ref_problem, ref = rebuilt(name, problem, opt)
    before = per_param(problem, opt)
    counter = FailAt(0)
    with counter:
        ref.step()
    after = per_param(ref_problem, ref)
    total = counter.n
    for k in sorted({max(1, total * i // 7) for i in range(1, 7)} | {total}):
        p2, o2 = rebuilt(name, problem, opt)
        with pytest.raises(exc):
            with FailAt(k, exc):
                o2.step()
        for (w0, s0), (w1, s1), (w, s) in zip(before, after, per_param(p2, o2)):
            old = torch.equal(w, w0) and same(s, s0)
            new = torch.equal(w, w1) and same(s, s1)
            assert old or new, f"op {k} of {total}: a weight and its state do not belong together"
        o2.step()  # the retry, with the same gradients: completes the interrupted step
        for (w1, s1), (w, s) in zip(after, per_param(p2, o2)):
            assert torch.allclose(w, w1, rtol=1e-12, atol=1e-14) and same(s, s1, tol=1e-12), f"op {k} of {total}"


@pytest.mark.parametrize("name", ["poet", "relora", "dlra"])
def test_ctrl_c_inside_a_commit_is_held_until_the_weight_and_its_state_are_written(name, monkeypatch):
    # Python's own Ctrl-C handler: a shell starts background jobs with SIGINT ignored, and then it is held and dropped
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check_ctrl_c_is_held(name, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def check_ctrl_c_is_held(name, monkeypatch):
    problem, opt = prepared(name)
    ref_problem, ref = rebuilt(name, problem, opt)
    ref.step()
    before, after = per_param(problem, opt), per_param(ref_problem, ref)
    commit = geomopt.FactorOptimizer._commit_many  # every commit goes through it

    def interrupted(self, params, write, updates):  # a real SIGINT, delivered inside the first commit
        def write_after_signal():
            os.kill(os.getpid(), signal.SIGINT)
            if write is not None:
                write()
        monkeypatch.setattr(geomopt.FactorOptimizer, "_commit_many", commit)
        commit(self, params, write_after_signal, updates)

    monkeypatch.setattr(geomopt.FactorOptimizer, "_commit_many", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    states = per_param(problem, opt)
    done = [torch.equal(w, w1) and same(s, s1) for (w1, s1), (w, s) in zip(after, states)]
    kept = [torch.equal(w, w0) and same(s, s0) for (w0, s0), (w, s) in zip(before, states)]
    assert done[0] and not all(done) and all(d or k for d, k in zip(done, kept))  # that commit completed
    opt.step()
    assert all(torch.equal(w, w1) and same(s, s1) for (w1, s1), (w, s) in zip(after, per_param(problem, opt)))


@pytest.mark.parametrize("name", IDS)
def test_an_overflowed_moment_never_becomes_nan(name):
    problem = Problem()
    opt = build(name, problem)
    for step in range(10):  # crosses merges / resets
        for i, p in enumerate(problem.params()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            if step == 1:
                p.grad.fill_(1e30)  # finite, but its square overflows fp32
        opt.step()
    for st in opt.state.values():
        for t in flat_state_of_dict(st):
            assert not t.isnan().any()
    assert all(not p.isnan().any() for p in problem.params())


def flat_state_of_dict(st):
    out = []
    for v in st.values():
        for x in v if isinstance(v, list) else [v]:
            out += [t for t in (x.values() if isinstance(x, dict) else [x])
                    if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return out


def corrupted(name):
    """(description, function that corrupts a state_dict's first factorized state, message) for the method."""
    cfg = CONFIGS[name]
    if cfg.cls is geomopt.POET:
        out = [("a repeated entry", lambda st: st["perm_row"].__setitem__(1, st["perm_row"][0]),
                r"'perm_row' has repeated entries: not a permutation"),
               ("an entry out of range", lambda st: st["perm_col"].__setitem__(0, 99),
                r"'perm_col' has entries outside"),
               ("a float permutation", lambda st: st.update(perm_row=st["perm_row"].double()),
                r"'perm_row' must be an integer tensor"),
               ("a broken generator state", lambda st: st.update(rng=st["rng"][:10]),
                r"'rng' is not a torch.Generator"),
               ("a generator of the wrong dtype", lambda st: st.update(rng=st["rng"].long()),
                r"'rng' must be a 1-D uint8"),
               ("an integer factor", lambda st: st["q_row"].__setitem__(0, st["q_row"][0].long()),
                r"'q_row' must hold floating-point tensors")]
    elif cfg.cls is geomopt.ReLoRAReset:
        out = [("a negative counter", lambda st: st.update(draws=-1), r"'draws' must be an int >= 0"),
               ("a missing seed", lambda st: st.pop("seed"), r"lacks 'seed'")]
    else:
        out = [("a basis of other rows", lambda st: st.update(U=st["U"][:-1]), r"'U' must have shape"),
               ("a momentum list too short", lambda st: st.update(exp_avg=st["exp_avg"][:2]),
                r"'exp_avg' must be a list of 3")]
    return out


@pytest.mark.parametrize("name", IDS)
def test_a_state_dict_that_cannot_be_this_optimizers_is_refused_and_changes_nothing(name):
    problem = Problem()
    opt = build(name, problem)
    train(problem, opt, 4)
    twin_problem = copy.deepcopy(problem)
    twin = build(name, twin_problem)
    train(twin_problem, twin, 2)
    for what, corrupt, message in corrupted(name):
        sd = copy.deepcopy(opt.state_dict())
        corrupt(sd["state"][0])
        state = flat_state(twin)
        with pytest.raises(ValueError, match=message):
            twin.load_state_dict(sd)
        assert same(state, flat_state(twin)), what


def test_checkpoints_refuse_what_their_loader_cannot_read_and_keep_a_modules_extra_state(tmp_path):
    class WithExtra(nn.Linear):
        def __init__(self):
            super().__init__(4, 4)
            self.note = {"calls": 3, "name": "ok"}

        def get_extra_state(self):
            return self.note

        def set_extra_state(self, state):
            self.note = state

    from geomopt.checkpoint import load_checkpoint, save_checkpoint

    model = WithExtra()
    opt = geomopt.POET(model, lr=1e-2, block_size=2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, opt, step=1, extra={"seen": torch.arange(3), "epoch": 2})
    other = WithExtra()
    other.note = {}
    payload = load_checkpoint(path, other, geomopt.POET(other, lr=1e-2, block_size=2))
    assert other.note == {"calls": 3, "name": "ok"} and payload["extra"]["epoch"] == 2
    with pytest.raises(TypeError, match=r"extra\['when'\] is a builtins.slice"):
        save_checkpoint(tmp_path / "bad", model, opt, extra={"when": slice(1)})
    model.note = object()
    with pytest.raises(TypeError, match=r"the model's state_dict\['_extra_state'\] is a builtins.object"):
        save_checkpoint(tmp_path / "bad", model, opt)
    assert not (tmp_path / "bad").exists()
