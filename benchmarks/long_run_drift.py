"""Long-run drift: POET for 10,000 steps (50 merges) on one 256 x 256 fp32 weight, and DLRAMomentum's bases.

    python benchmarks/long_run_drift.py [--steps 10000] [--merge-every 200]

POET keeps the singular values of W0 up to the Cayley-Neumann error of each merge; this prints the largest
relative change of any singular value against W0's after every 10th merge, its growth per merge (a least-
squares slope over the merges), and for DLRAMomentum (rank 32, same target) the worst deviation of U^T U
and V^T V from the identity over the run. The loss pulls W towards a random target with other singular
values, so the factors move at every step.
"""
from __future__ import annotations

import argparse

import torch

import geomopt


def start(g: torch.Generator) -> torch.Tensor:
    """W0 = U diag(s) V^T with s evenly spread over [0.5, 1.5]: relative changes of every singular value
    are meaningful (a square Gaussian matrix has a smallest singular value near 0)."""
    u, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    return (u * torch.linspace(0.5, 1.5, 256, dtype=torch.float64)) @ v.T


def poet_drift(steps: int, merge_every: int, lr: float, seed: int = 0, **poet_kwargs) -> tuple[list, float]:
    g = torch.Generator().manual_seed(seed)
    w0 = start(g).float()
    w = torch.nn.Parameter(w0.clone())
    target = torch.randn(256, 256, generator=g) / 16
    sv0 = torch.linalg.svdvals(w.detach().double())
    opt = geomopt.POET([("weight", w)], lr=lr, block_size=32, merge_every=merge_every, **poet_kwargs)
    rows = []
    for step in range(1, steps + 1):
        w.grad = w.detach() - target
        opt.step()
        if step % merge_every == 0:
            drift = float(((torch.linalg.svdvals(w.detach().double()) - sv0).abs() / sv0).max())
            rows.append((step // merge_every, drift))
    return rows, float((w.detach() - w0).norm() / w0.norm())


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


def slope(rows: list[tuple[int, float]]) -> float:
    x = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--merge-every", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-q-norm", type=float, default=0.5, help="POET's safeguard threshold (package default 0.5)")
    p.add_argument("--exact-cayley", action="store_true")
    args = p.parse_args(argv)
    rows, moved = poet_drift(args.steps, args.merge_every, args.lr, max_q_norm=args.max_q_norm,
                             exact_cayley=args.exact_cayley)
    kind = "exact Cayley" if args.exact_cayley else f"k=5, max_q_norm {args.max_q_norm}"
    print(f"POET, 256 x 256 fp32, block 32, {kind}, lr {args.lr}, {args.steps} steps, {len(rows)} merges; "
          f"||W_end - W_0||_F = {moved:.3f}")
    print("| merges | max relative singular-value change vs W0 |\n| --- | --- |")
    for m, d in rows:
        if m % 10 == 0 or m == 1:
            print(f"| {m} | {d:.2e} |")
    print(f"growth per merge (least-squares slope): {slope(rows):.2e}")
    print(f"DLRAMomentum (rank 32, Adam, lr {args.lr}): max |U^T U - I|, |V^T V - I| over the run = "
          f"{dlra_orthonormality(args.steps, args.lr):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
