"""How the cost of one POET step grows with m * n * b: time the step of one m x n weight over a grid of shapes
and block sizes, and fit  t = t0 + c * m * n * b  by least squares.

    python benchmarks/poet_step_cost.py                  # the grid of BENCHMARKS.md
    python benchmarks/poet_step_cost.py --sizes 64x64x8,128x128x16,128x256x16,256x256x32 --reps 3

The block gradients and the rotations of W cost about m n b multiply-adds each (m / b row blocks of b x n by
n x b, and the same for the columns); the Cayley-Neumann series and its backward cost k (m + n) b^2, which is
smaller while b < n. So after a fixed per-step overhead t0 the time should be linear in m n b. The script
prints every point, the fit (t0, c, R^2) and each point's residual relative to its measured time, then a
second fit with a term in m n (copies of W, which b does not multiply).
"""
from __future__ import annotations

import argparse
import json

import torch

from geomopt import POET, report
from geomopt.timing import timed

DEFAULT_SIZES = "256x256x16,512x512x16,512x512x32,1024x1024x32,1024x1024x64,2048x1024x64,2048x2048x64"


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--sizes: each item must be MxNxB with positive integers, got {item!r}")
        m, n, b = map(int, parts)
        if b < 2 or b > min(m, n):
            raise SystemExit(f"--sizes: block size must be in [2, min(m, n)], got {item!r}")
        out.append((m, n, b))
    if len(out) < 2:
        raise SystemExit(f"--sizes: a fit needs at least 2 sizes, got {len(out)}")
    return out


def step_seconds(m: int, n: int, b: int, reps: int, store_base: bool, device: str) -> float:
    """Median time of POET.step() on one m x n weight (merges off, so every timed step does the same work)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(m, n, generator=gen).div_(n ** 0.5).to(device))
    opt = POET([("w", w)], lr=1e-4, block_size=b, merge_every=10**9,
               store_base=store_base, max_q_norm=None)
    g = (torch.randn(m, n, generator=gen) * 1e-3).to(device)
    # two warm-up steps: state creation, allocator
    return timed(opt.step, device, reps, warmup=2, before=lambda: setattr(w, "grad", g.clone())).median


def lstsq(columns: list[list[float]], ts: list[float]) -> tuple[list[float], float]:
    """Least squares t = sum_j coef_j columns[j] (plus a constant); returns ([t0, coef...], R^2)."""
    t = torch.tensor(ts, dtype=torch.float64)
    a = torch.stack([torch.ones_like(t)] + [torch.tensor(c, dtype=torch.float64) for c in columns], dim=1)
    coef = torch.linalg.lstsq(a, t.unsqueeze(1)).solution.squeeze(1)
    ss_res = float(((t - a @ coef) ** 2).sum())
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return [float(c) for c in coef], 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def fit(xs: list[float], ts: list[float]) -> tuple[float, float, float]:
    """Least squares t = t0 + c x; returns (t0, c, R^2)."""
    (t0, c), r2 = lstsq([xs], ts)
    return t0, c, r2


COLUMNS = [report.Column("m", "m"), report.Column("n", "n"), report.Column("b", "b"),
           report.Column("m n b", "mnb", ".3g"), report.Column("step ms", "ms", ".2f"),
           report.Column("fit ms", "fit_ms", ".2f"),
           report.Column("residual", "residual", "+.1%")]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated MxNxB (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per size; the median is kept")
    p.add_argument("--lean", action="store_true", help="lean mode (store_base=False)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the points and the fit to this file")
    a = p.parse_args(argv)
    if a.reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {a.reps}")
    sizes = parse_sizes(a.sizes)
    points = []
    for m, n, b in sizes:
        t = step_seconds(m, n, b, a.reps, not a.lean, a.device)
        points.append({"m": m, "n": n, "b": b, "mnb": m * n * b, "ms": 1000 * t})
    t0, c, r2 = fit([q["mnb"] for q in points], [q["ms"] for q in points])
    print(f"POET step ({'lean' if a.lean else 'paper'} mode, {a.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    for q in points:
        q["fit_ms"] = t0 + c * q["mnb"]
        q["residual"] = (q["ms"] - q["fit_ms"]) / q["ms"]
    print(report.markdown(points, COLUMNS))
    print(f"fit: t = {t0:.3f} ms + {c * 1e9:.3f} ms per 1e9 (m n b); R^2 = {r2:.4f}")
    # the rotations also copy W (and paper mode rebuilds it from W0): a term in m n that b does not multiply
    (u0, a_mn, c_mnb), r2_two = lstsq([[q["m"] * q["n"] for q in points], [q["mnb"] for q in points]],
                                      [q["ms"] for q in points])
    print(f"fit with a copy term: t = {u0:.3f} ms + {a_mn * 1e6:.3f} ms per 1e6 (m n) + {c_mnb * 1e9:.3f} ms "
          f"per 1e9 (m n b); R^2 = {r2_two:.4f}")
    result = {"points": points, "t0_ms": t0, "ms_per_mnb": c, "r2": r2, "lean": a.lean, "device": a.device,
              "two_term": {"t0_ms": u0, "ms_per_mn": a_mn, "ms_per_mnb": c_mnb, "r2": r2_two}}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
