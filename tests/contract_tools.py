"""Problems and helpers of the generic contract tests (test_contract, test_step_guarantees)."""
import copy

import torch
from optim_table import CONFIGS
from torch import nn


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor with the values of ``t`` (a transposed copy for 2-D, every other entry for 1-D)."""
    if t.dim() == 2:
        return t.T.contiguous().T
    buf = torch.zeros(t.numel(), 2, dtype=t.dtype)
    buf[:, 0] = t
    return buf[:, 0]


class Problem:
    """torch's "goes right direction" problem, grown a little: ||V tanh(W x + b) - y||^2 + ||W x||^2 with rank-1
    weights W and V (so that every method, the rank-r ones included, starts from a point it represents exactly)
    and an AdamW-routed bias."""

    def __init__(self, dtype=torch.float32, non_contiguous=False, seed=0, shapes=((6, 5), (4, 6))):
        g = torch.Generator().manual_seed(seed)
        make = strided if non_contiguous else (lambda t: t)
        (m, n), (k, _) = shapes
        w = torch.randn(m, 1, generator=g, dtype=dtype) @ torch.randn(1, n, generator=g, dtype=dtype)
        self.w = nn.Parameter(make(w))
        self.v = nn.Parameter(make(torch.randn(k, 1, generator=g, dtype=dtype) @ torch.randn(1, m, generator=g,
                                                                                              dtype=dtype)))
        self.b = nn.Parameter(make(torch.randn(m, generator=g, dtype=dtype)))
        self.x = torch.randn(n, generator=g, dtype=dtype)
        self.y = torch.randn(k, generator=g, dtype=dtype)

    def named(self):
        return [("w", self.w), ("v", self.v), ("b", self.b)]

    def params(self):
        return [p for _, p in self.named()]

    def loss(self):
        return (self.v @ torch.tanh(self.w @ self.x + self.b) - self.y).pow(2).sum() + (self.w @ self.x).pow(2).sum()


def build(name, problem, **over):
    return CONFIGS[name].build(problem.named(), **over)


def run(name, problem, steps, **over):
    opt = build(name, problem, **over)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = problem.loss()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, losses


def lockstep(pairs, steps):
    """Train each (problem, optimizer) pair the same number of steps, one step each in turn."""
    for _ in range(steps):
        for problem, opt in pairs:
            opt.zero_grad()
            problem.loss().backward()
            opt.step()


def refused(problem, opt, exc, pattern):
    """``opt.step()`` raises ``exc`` (message matching ``pattern``) and changes no weight and no state."""
    import pytest

    opt.zero_grad()
    problem.loss().backward()
    weights, state = [p.detach().clone() for p in problem.params()], flat_state(opt)
    with pytest.raises(exc, match=pattern):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, problem.params())) and same(state, flat_state(opt))


def flat_state(opt):
    """Every value of the optimizer's state, in parameter order, as comparable leaves."""
    out = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v.detach().clone())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                out.append(k)
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            out.append(len(v))
            for x in v:
                walk(x)
        else:
            out.append(v)

    for g in opt.param_groups:
        for p in g["params"]:
            walk(opt.state.get(p, {}))
    return out


def same(a, b, tol=0.0):
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            ok = torch.equal(x, y) if tol == 0 or not x.is_floating_point() else bool(
                ((x - y).abs() <= tol * (1 + y.abs())).all() | (x.isnan() & y.isnan()).all())
            if not ok:
                return False
        elif x != y:
            return False
    return True


def clone_pair(problem, opt):
    """A deep copy of (problem, optimizer) that keeps the optimizer pointing at the copied parameters, with the
    gradients (which deepcopy leaves behind)."""
    twin_problem, twin = copy.deepcopy((problem, opt))
    for a, b in zip(problem.params(), twin_problem.params()):
        b.grad = None if a.grad is None else a.grad.clone()
    return twin_problem, twin
