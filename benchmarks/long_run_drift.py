"""Long-run drift: POET for 10,000 steps (50 merges) on one 256 x 256 weight, and DLRAMomentum's bases.

    python benchmarks/long_run_drift.py [--steps 10000] [--merge-every 200] [--exact-merge] [--dtype bfloat16]

POET keeps the singular values of W0 up to the Cayley-Neumann error of the current generators; this prints the
largest relative change of any singular value against W0's right after every 10th merge (what the merges keep for
good), its growth per merge (a least-squares slope over the merges), the largest such change at any sampled step
between merges (the current polynomial's non-orthogonality, which a merge through exact rotations does not keep),
and for DLRAMomentum (rank 32, same target) the worst deviation of U^T U and V^T V from the identity over the run.
The loss pulls W towards a random target with other singular values, so the factors move at every step.
"""
from __future__ import annotations

import argparse
import inspect
from typing import NamedTuple

import torch

import geomopt
from geomopt import report


class Drift(NamedTuple):
    """``merges``: (merge number, step, drift right after it); ``between``: the largest drift at a sampled step
    that was not a merge; ``moved``: ||W_end - W_0||_F / ||W_0||_F."""
    merges: list
    between: float
    moved: float


def start(g: torch.Generator) -> torch.Tensor:
    """W0 = U diag(s) V^T with s evenly spread over [0.5, 1.5]: relative changes of every singular value
    are meaningful (a square Gaussian matrix has a smallest singular value near 0)."""
    u, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    return (u * torch.linspace(0.5, 1.5, 256, dtype=torch.float64)) @ v.T


def poet_drift(steps: int, merge_every: int, lr: float, seed: int = 0, dtype: torch.dtype = torch.float32,
               sample_every: int = 50, **poet_kwargs) -> Drift:
    """POET (block 32, k = 5 unless ``poet_kwargs`` say otherwise) on one weight of ``dtype``; the drift is taken
    against the singular values of the starting weight in that dtype, after every merge (early ones included) and
    every ``sample_every`` steps."""
    g = torch.Generator().manual_seed(seed)
    w0 = start(g).to(dtype)
    w = torch.nn.Parameter(w0.clone())
    target = torch.randn(256, 256, generator=g).to(dtype) / 16
    sv0 = torch.linalg.svdvals(w0.double())
    opt = geomopt.POET([("weight", w)], lr=lr, block_size=32, merge_every=merge_every, **poet_kwargs)

    def drift() -> float:
        return float(((torch.linalg.svdvals(w.detach().double()) - sv0).abs() / sv0).max())

    merges, between, done = [], 0.0, 0
    for step in range(1, steps + 1):
        w.grad = w.detach() - target
        opt.step()
        now = int(opt.state[w]["merges"])
        if now > done:
            done = now
            merges.append((now, step, drift()))
        elif step % sample_every == 0:
            between = max(between, drift())
    return Drift(merges, between, float((w.detach().double() - w0.double()).norm() / w0.double().norm()))


def dlra_orthonormality(steps: int, lr: float, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(start(g).float())
    target = torch.randn(256, 256, generator=g) / 16
    opt = geomopt.DLRAMomentum([("weight", w)], lr=lr, rank=32, method="adam")
    worst = 0.0
    eye = torch.eye(32)
    for step in range(1, steps + 1):
        w.grad = w.detach() - target
        opt.step()
        st = opt.state[w]
        for basis in (st["U"], st["V"]):
            worst = max(worst, float((basis.T @ basis - eye).abs().max()))
    return worst


def slope(merges: list[tuple]) -> float:
    """Least-squares growth of the drift per merge over ``Drift.merges``."""
    x = torch.tensor([r[0] for r in merges], dtype=torch.float64)
    y = torch.tensor([r[-1] for r in merges], dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--merge-every", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-q-norm", type=float, default=0.5, help="POET's safeguard threshold (package default 0.5)")
    p.add_argument("--exact-cayley", action="store_true")
    p.add_argument("--neumann-terms", type=int, default=None, help="POET's k (default: POET's)")
    p.add_argument("--exact-merge", action="store_true",
                   help="merge through the exact Cayley map (POET(exact_merge=True); default: POET's default)")
    p.add_argument("--lean", action="store_true", help="lean mode (store_base=False)")
    p.add_argument("--no-compensate", action="store_true", help="lean mode without its rounding buffer (bf16 / fp16)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    p.add_argument("--skip-dlra", action="store_true")
    args = p.parse_args(argv)
    terms = {} if args.neumann_terms is None else dict(neumann_terms=args.neumann_terms)
    merge = dict(exact_merge=True) if args.exact_merge else {}
    res = poet_drift(args.steps, args.merge_every, args.lr, dtype=getattr(torch, args.dtype),
                     max_q_norm=args.max_q_norm, exact_cayley=args.exact_cayley,
                     store_base=not args.lean, compensate=not args.no_compensate, **terms, **merge)
    defaults = inspect.signature(geomopt.POET).parameters
    k = terms.get("neumann_terms", defaults["neumann_terms"].default)
    exact = merge.get("exact_merge", defaults["exact_merge"].default)
    kind = "exact Cayley" if args.exact_cayley else f"k={k}, max_q_norm {args.max_q_norm}"
    merged = "exact merges" if exact else "Neumann merges"
    print(f"POET, 256 x 256 {args.dtype}, block 32, {kind}, {merged}, {'lean' if args.lean else 'paper'} mode"
          f"{' (uncompensated)' if args.lean and args.no_compensate else ''}, "
          f"lr {args.lr}, {args.steps} steps, {len(res.merges)} merges; ||W_end - W_0||_F / ||W_0||_F = "
          f"{res.moved:.3f}")
    shown = [dict(merge=m, step=step, drift=d) for m, step, d in res.merges if m % 10 == 0 or m == 1]
    print(report.markdown(shown, [report.Column("merge", "merge"), report.Column("step", "step"),
                                  report.Column("max relative singular-value change vs W0, after it", "drift", ".2e")]))
    worst = max((d for *_, d in res.merges), default=float("nan"))
    print(f"after merges, max: {worst:.2e}; growth per merge (least-squares slope): {slope(res.merges):.2e}; "
          f"between merges, max: {res.between:.2e}")
    if not args.skip_dlra:
        print(f"DLRAMomentum (rank 32, Adam, lr {args.lr}): max |U^T U - I|, |V^T V - I| over the run = "
              f"{dlra_orthonormality(args.steps, args.lr):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
