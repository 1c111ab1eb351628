"""DLRA-Adam's second moment: the shipped one (one scalar per coordinate block, S, U and V parts: basis-invariant, no
transport) against per-coordinate moments kept in the tangent coordinates, on the matrix-sensing problem of
``geomopt.sensing`` and on a quadratic, side by side.

    python benchmarks/dlra_second_moment.py

The per-coordinate moments (xs, xu, xv each with its own v) need carrying to the next tangent space, as the first
moment is: ``naive`` transports v by the projection (``geometry.lowrank.transport``), which can make entries
negative; ``sqrt`` transports sqrt(v) and squares the result (never negative). Their direction m / (sqrt(v) + eps)
is taken per entry and projected back onto the tangent space (per-entry scaling leaves it). One weight, the
fixed-rank SVD retraction, float64; per problem the best lr of a grid, the steps to the tolerance, the final error.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from geomopt import report
from geomopt.geometry.lowrank import retract, tangent_project, transport
from geomopt.sensing import _loss, _rel, make_problem

MOMENTS = ("block", "naive", "sqrt")


def _tangent(u: torch.Tensor, v: torch.Tensor, d: tuple) -> tuple:
    """A triple of coordinates projected back onto the tangent space at (U, V)."""
    ds, du, dv = d
    return ds, du - u @ (u.T @ du), dv - v @ (v.T @ dv)


def _direction(kind: str, xi: tuple, m: list, v: Any, t: int, b1: float, b2: float, eps: float):
    m = [b1 * mi + (1 - b1) * x for mi, x in zip(m, xi)]
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    if kind == "block":
        means = torch.stack([x.square().mean() for x in xi])
        v = b2 * v + (1 - b2) * means
        return [(mi / c1) / ((vb / c2).sqrt() + eps) for mi, vb in zip(m, v)], m, v
    v = [b2 * vi + (1 - b2) * x.square() for vi, x in zip(v, xi)]
    return [(mi / c1) / ((vi.clamp_min(0) / c2).sqrt() + eps) for mi, vi in zip(m, v)], m, v


def _carry(kind: str, u, w, u2, w2, v):
    if kind == "block":
        return v
    if kind == "naive":
        return list(transport(u, w, u2, w2, tuple(v)))
    return [x.square() for x in transport(u, w, u2, w2, tuple(x.clamp_min(0).sqrt() for x in v))]


def run(kind: str, grad_fn, error_fn, start: tuple, rank: int, lr: float, steps: int, tol: float) -> list[float]:
    """DLRA-Adam from ``start`` = (U, s, V) with the ``kind`` of second moment: the errors per step."""
    u, s, w = start[0], torch.diag(start[1]), start[2]
    m = [torch.zeros_like(s), torch.zeros_like(u), torch.zeros_like(w)]
    v: Any = torch.zeros(3, dtype=u.dtype) if kind == "block" else [torch.zeros_like(x) for x in m]
    errors = []
    for t in range(1, steps + 1):
        xi = tangent_project(u, w, grad_fn(u @ s @ w.T))
        d, m, v = _direction(kind, xi, m, v, t, 0.9, 0.999, 1e-8)
        d = _tangent(u, w, d)
        u2, s2, w2 = retract(u, s, w, d, lr, rank=rank)
        m, v = list(transport(u, w, u2, w2, tuple(m))), _carry(kind, u, w, u2, w2, v)
        u, s, w = u2, s2, w2
        errors.append(error_fn(u @ s @ w.T))
        if not math.isfinite(errors[-1]) or errors[-1] > 1e3 or errors[-1] < tol:
            break
    return errors


def problems() -> dict[str, tuple]:
    """name -> (gradient of the loss at X, error of X, start, rank, tolerance)."""
    out = {}
    for cond in (100.0, 1000.0):
        prob = make_problem(cond=cond)

        def grad(x, prob=prob):
            x = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(_loss(prob, x), x)
            return g

        out[f"sensing, condition {cond:g}"] = (grad, lambda x, prob=prob: _rel(prob, x), prob["start"], prob["rank"],
                                               1e-4)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(40, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 30, generator=g,
                                                                                  dtype=torch.float64)
    u0, _ = torch.linalg.qr(torch.randn(40, 4, generator=g, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))
    out["quadratic ||X - T||^2 / 2, rank 4"] = (lambda x: x - target,
                                                 lambda x: float((x - target).norm() / target.norm()),
                                                 (u0, torch.ones(4, dtype=torch.float64), v0), 4, 1e-6)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default=None, help="folder for dlra_second_moment.json and .md")
    a = p.parse_args(argv)
    lrs = [3e-3, 1e-2, 3e-2, 1e-1]
    rows = []
    for name, (grad, err, start, rank, tol) in problems().items():
        for kind in MOMENTS:
            runs = {lr: run(kind, grad, err, start, rank, lr, a.steps, tol) for lr in lrs}
            reached = {lr: len(e) for lr, e in runs.items() if e and e[-1] < tol}
            lr = min(reached, key=reached.get) if reached else min(runs, key=lambda k: min(runs[k] + [math.inf]))
            diverged = [f"{x:g}" for x, e in runs.items() if e and (not math.isfinite(e[-1]) or e[-1] > 1e3)]
            rows.append(dict(problem=name, moment=kind, lr=lr, steps=reached.get(lr), error=runs[lr][-1],
                             diverged=", ".join(diverged) or "-"))
    columns = [report.Column("problem", "problem"), report.Column("second moment", "moment"),
               report.Column("best lr", "lr", "g"), report.Column("steps to tolerance", "steps"),
               report.Column("final error", "error", ".2e"), report.Column("diverged at lr", "diverged")]
    print(report.write(a.out, "dlra_second_moment", rows, columns, dict(vars(a), lrs=lrs)))
    return rows


if __name__ == "__main__":
    main()
