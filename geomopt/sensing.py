"""Low-rank matrix sensing: the ill-conditioned problem on which DLRA momentum is compared with
heavy-ball on the factors (used by the tests and by ``python -m geomopt.sensing``).

Target X* = U diag(sigma) V^T of rank r with condition number ``cond``; measurements
y_i = <A_i, X*> with A_i Gaussian with entries of variance 1 / (m n); loss = mean_i (<A_i, X> - y_i)^2.
"""
from __future__ import annotations

import argparse
import math

import torch

from .optim.dlra import DLRAMomentum

__all__ = ["make_problem", "steps_to_tol", "run_dlra", "run_factor_heavy_ball", "sweep"]


def make_problem(m=40, n=30, rank=3, samples=400, cond=100.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=dtype))
    sigma = torch.logspace(0, -math.log10(cond), rank, dtype=dtype)
    target = u @ torch.diag(sigma) @ v.T
    a = torch.randn(samples, m, n, generator=g, dtype=dtype) / math.sqrt(m * n)
    y = torch.einsum("kij,ij->k", a, target)
    u0, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=dtype))
    v0, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=dtype))
    start = (u0, 1e-2 * torch.ones(rank, dtype=dtype), v0)  # a small random rank-r start, shared by all methods
    return dict(a=a, y=y, target=target, start=start, rank=rank)


def _loss(prob, x):
    return (torch.einsum("kij,ij->k", prob["a"], x) - prob["y"]).square().mean()


def _rel(prob, x):
    return float((x - prob["target"]).norm() / prob["target"].norm())


def steps_to_tol(errors, tol):
    return next((i + 1 for i, e in enumerate(errors) if e < tol), None)


def run_dlra(prob, lr, steps, tol=1e-4, momentum=0.9, method="heavy_ball", retraction="svd"):
    u0, s0, v0 = prob["start"]
    w = torch.nn.Parameter(u0 @ torch.diag(s0) @ v0.T)
    opt = DLRAMomentum([("w", w)], lr=lr, rank=prob["rank"], momentum=momentum, method=method, retraction=retraction)
    errors = []
    for _ in range(steps):
        opt.zero_grad()
        _loss(prob, w).backward()
        opt.step()
        errors.append(_rel(prob, w.detach()))
        if errors[-1] < tol or not math.isfinite(errors[-1]) or errors[-1] > 1e3:
            break
    return errors


def run_factor_heavy_ball(prob, lr, steps, tol=1e-4, momentum=0.9):
    """Heavy-ball (torch SGD with momentum) on balanced factors X = L R^T, the naive baseline."""
    u0, s0, v0 = prob["start"]
    left = torch.nn.Parameter(u0 * s0.sqrt())
    right = torch.nn.Parameter(v0 * s0.sqrt())
    opt = torch.optim.SGD([left, right], lr=lr, momentum=momentum)
    errors = []
    for _ in range(steps):
        opt.zero_grad()
        _loss(prob, left @ right.T).backward()
        opt.step()
        errors.append(_rel(prob, (left @ right.T).detach()))
        if errors[-1] < tol or not math.isfinite(errors[-1]) or errors[-1] > 1e3:
            break
    return errors


def sweep(prob, method, lrs, steps, tol=1e-4, retraction="svd"):
    """{lr: (steps to tol or None, best relative error)} for ``method`` in ("dlra", "dlra-adam", "factors"), DLRA
    with ``retraction``."""
    out = {}
    for lr in lrs:
        if method == "factors":
            errors = run_factor_heavy_ball(prob, lr, steps, tol)
        else:
            errors = run_dlra(prob, lr, steps, tol, method="adam" if method == "dlra-adam" else "heavy_ball",
                              retraction=retraction)
        finite = [e for e in errors if math.isfinite(e)]
        out[lr] = (steps_to_tol(errors, tol), min(finite) if finite else float("inf"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="DLRA momentum vs heavy-ball on factors, matrix sensing")
    p.add_argument("--conds", default="100,1000")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--retraction", default="svd", choices=("svd", "qr"), help="DLRAMomentum's retraction")
    args = p.parse_args(argv)
    lrs = [10 ** (k / 4) for k in range(0, 13)]  # 1 .. 1000, four per decade
    print("| condition | method | best lr | steps to 1e-4 | best rel. error |\n| --- | --- | --- | --- | --- |")
    for cond in [float(c) for c in args.conds.split(",")]:
        prob = make_problem(cond=cond)
        for method in ("dlra", "dlra-adam", "factors"):
            grid = [lr / 1000 for lr in lrs] if method == "dlra-adam" else lrs
            res = sweep(prob, method, grid, args.steps, retraction=args.retraction)
            reached = {lr: v for lr, v in res.items() if v[0] is not None}
            if reached:
                lr, (n, err) = min(reached.items(), key=lambda kv: kv[1][0])
            else:
                lr, (n, err) = min(res.items(), key=lambda kv: kv[1][1])
            print(f"| {cond:g} | {method} | {lr:.3g} | {n if n else f'> {args.steps}'} | {err:.2e} |")


if __name__ == "__main__":
    main()
