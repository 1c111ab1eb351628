"""Time each Triton kernel against its torch reference, side by side in one run, and POET's step against torch's
fused AdamW step.

    python benchmarks/bench_kernels.py                 # on a GPU: the sizes of BENCHMARKS.md
    python benchmarks/bench_kernels.py --step          # also opt.step(): POET lean on the kernels vs fused AdamW
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --small --device cpu --no-compile   # a smoke run

For every case it prints the time of the kernel, of the eager reference (and of the compiled reference where the
reference is one tensor program: the Cayley-Neumann map, the QR), the kernel's speed-up over each, its achieved GB/s
(the bytes its launch arguments span, each tensor once: what ``benchmarks/step_cost.py`` counts) and TFLOP/s, the
device's peaks, the fraction of the roofline bound reached (bound time = max(bytes / peak bandwidth, flops / peak
compute) over the measured time), and the kernel's relative error against the reference. fp32 products run as three
TF32 products on GPUs that have TF32 (``kernels.tiling.precision``), so their compute peak is the tensor-core TF32
rate over three. The cases: the Cayley-Neumann map (forward; forward and backward), POET's three step kernels on a
group of weights of one shape (``tile_grads``, ``tile_rewrite`` in lean mode, ``factor_update`` on all their blocks)
and the CholeskyQR2 retraction of DLRA. ``--step`` times ``optimizer.step()`` of POET in lean mode with the kernels
enabled against torch's fused AdamW on the same weights (``--step-weights`` weights of ``--weight`` squared, each b
of ``--block``; blocks larger than the kernels' limit stay on the references, as the dispatch decides).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

from geomopt import report
from geomopt.geometry import dispatch, skew_size
from geomopt.geometry.cayley import cayley_neumann
from geomopt.geometry.qr import tall_qr
from geomopt.geometry.tiles import tile_grads as ref_tile_grads
from geomopt.geometry.tiles import tile_layout
from geomopt.geometry.tiles import tile_rewrite as ref_tile_rewrite
from geomopt.optim.factor_update import AdamHyper, Entries
from geomopt.optim.factor_update import factor_update as ref_factor_update
from geomopt.optim.poet_settings import RotationMap
from geomopt.timing import timed

# (memory bandwidth B/s, {dtype: dense compute FLOP/s}) from the vendors' data sheets, by name substring; fp32 is the
# TF32 tensor-core rate over three (the kernels' "tf32x3" products)
PEAKS = {
    "H200": (4.8e12, {"fp32": 989e12 / 6, "bf16": 989e12}),
    "H100 PCIe": (2.0e12, {"fp32": 756e12 / 6, "bf16": 756e12}),
    "H100": (3.35e12, {"fp32": 989e12 / 6, "bf16": 989e12}),
    "A100": (2.0e12, {"fp32": 156e12 / 3, "bf16": 312e12}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peaks(device: torch.device) -> tuple[str, float | None, dict]:
    if device.type != "cuda":
        return "cpu", None, {}
    name = torch.cuda.get_device_name(device)
    for key, (bw, flops) in PEAKS.items():
        if key in name:
            return name, bw, flops
    return name, None, {}


def rel(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(rel(x, y) for x, y in zip(a, b) if isinstance(x, torch.Tensor))
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def launched_bytes(fn) -> int:
    """The bytes of the kernel launches ``fn`` makes (their arguments, each tensor once)."""
    with dispatch.record_launches() as launches:
        fn()
    return sum(x.bytes for x in launches if x.name != "copy_to_device")


def _group(args, device, dtype, b, g):
    """A group of ``--group`` square weights of ``--weight`` in one flat buffer layout, with their gradients."""
    count, m = args.group, args.weight
    perms = [[torch.randperm(m, generator=g).to(device) for _ in range(2)] for _ in range(count)]
    rows = [[p[0][: m // b * b].view(-1, b)] for p in perms]
    cols = [[p[1][: m // b * b].view(-1, b)] for p in perms]
    per = m // b * b * b
    lay = tile_layout(rows, cols, (m, m), [[2 * w * per] for w in range(count)],
                      [[(2 * w + 1) * per] for w in range(count)])
    ws = [torch.randn(m, m, generator=g).to(device, dtype) for _ in range(count)]
    gs = [torch.randn(m, m, generator=g).to(device, dtype) for _ in range(count)]
    return lay, ws, gs, 2 * count * per


def _factor_entries(n_blocks: int, b: int, device, g) -> Entries:
    nq = skew_size(b)
    q = (torch.randn(n_blocks, nq, generator=g) * 0.3 / b ** 0.5).to(device)
    st = dict(step=torch.tensor(3.0, device=device), exp_avg=torch.zeros_like(q), exp_avg_sq=torch.zeros_like(q))
    return Entries([q], [st], [1e-3], [True], [0])


def cases(args, device: torch.device, dtype: torch.dtype):
    """(name, shape text, kernel fn, reference fn, compiled reference or None, flops) per case: the kernel and its
    providers to compare with (``run`` times each the same way)."""
    from geomopt.kernels import cayley, factor_update, retract, tile_grads, tile_rewrite

    g = torch.Generator(device="cpu").manual_seed(0)
    for b in args.block:
        nq, k = skew_size(b), args.terms
        q = (torch.randn(args.blocks, nq, generator=g) * 0.5 / (0.5 * b) ** 0.5).to(device, dtype)
        up = torch.randn(args.blocks, b, b, generator=g).to(device, dtype)
        text = f"{args.blocks} x b={b}, k={k}"
        ref = functools.partial(cayley_neumann, q, b, k)
        yield ("cayley_neumann fwd", text, functools.partial(cayley.cayley_neumann, q, b, k), ref,
               functools.partial(torch.compile(cayley_neumann), q, b, k), args.blocks * (k + 1) * 2 * b ** 3)
        qg = q.clone().requires_grad_()

        def fwd_bwd(fn, qg=qg, b=b, k=k, up=up):
            return torch.autograd.grad(fn(qg, b, k), qg, up)[0]

        yield ("cayley_neumann fwd+bwd", text, functools.partial(fwd_bwd, cayley.cayley_neumann),
               functools.partial(fwd_bwd, cayley_neumann), None, args.blocks * 4 * (k + 1) * 2 * b ** 3)
        lay, ws, gs, total = _group(args, device, dtype, b, g)
        text = f"{args.group} x {args.weight}^2, b={b}"
        flops = 4 * args.group * args.weight ** 2 * b  # two b x b products per tile on each side / in each tile

        def grads(fn, lay=lay, ws=ws, gs=gs, total=total):
            out, verdict = torch.empty(total, device=device), torch.zeros(2, len(ws), device=device)
            fn(gs, ws, lay, out, verdict)
            return out

        yield ("tile_grads", text, functools.partial(grads, tile_grads.tile_grads),
               functools.partial(grads, ref_tile_grads), None, flops)
        mats = (torch.randn(total, generator=g) * 0.1).to(device)

        def rewrite(fn, lay=lay, ws=ws, mats=mats):
            xs = [w.clone() for w in ws]
            fn(xs, xs, None, [None] * len(xs), lay, mats, [True] * len(xs))[0]()
            return xs

        yield ("tile_rewrite (lean)", text, functools.partial(rewrite, tile_rewrite.tile_rewrite),
               functools.partial(rewrite, ref_tile_rewrite), None, flops)
        if dtype == torch.float32:
            n_blocks = total // (b * b)
            entries = _factor_entries(n_blocks, b, device, g)
            blocks = (torch.randn(n_blocks, b, b, generator=g) * 1e-2).to(device)
            adam = AdamHyper(0.9, 0.999, 1e-8, 0.0, True)

            def update(fn, blocks=blocks, entries=entries, adam=adam):
                out = blocks.clone()
                fn(out, entries, RotationMap(k), True, 2, adam, torch.zeros(2, 1, device=device))
                return out

            yield ("factor_update (lean)", f"{n_blocks} x b={b}, k={k}",
                   functools.partial(update, factor_update.factor_update), functools.partial(update, ref_factor_update),
                   None, n_blocks * (6 * (k + 1) + 10) * 2 * b ** 3)
    for rows in args.qr_rows:
        c = args.qr_cols
        u, _ = torch.linalg.qr(torch.randn(rows, c // 2, generator=g, dtype=torch.float64))
        xu = torch.randn(rows, c - c // 2, generator=g, dtype=torch.float64) * 1e-3
        xu -= u @ (u.T @ xu)
        aug = torch.cat([u, xu], 1).to(device, dtype)
        yield ("tall_qr (CholeskyQR2)", f"{rows} x {c}", functools.partial(retract.tall_qr, aug),
               functools.partial(tall_qr, aug), functools.partial(torch.compile(tall_qr), aug), 8 * rows * c * c)


def run(args) -> list[dict]:
    """One row per case: every provider (the kernel, the eager reference, the compiled one) timed alike, the kernel's
    speed-up over the others, its achieved rates and error."""
    device = torch.device(args.device)
    name, bw, flops = peaks(device)
    out = []
    for dname in args.dtype:
        peak = flops.get(dname)
        for case, shape, kern, ref, compiled, nflops in cases(args, device, DTYPES[dname]):
            providers = dict(kernel=kern, eager=ref, compile=compiled if args.compile else None)
            ms = {k: None if fn is None else timed(fn, device, args.reps).median * 1e3 for k, fn in providers.items()}
            nbytes = launched_bytes(kern)
            t = ms["kernel"] / 1e3
            out.append(dict(kernel=case, shape=shape, dtype=dname, device=name, **{f"{k}_ms": v for k, v in ms.items()},
                            vs_eager=ms["eager"] / ms["kernel"],
                            vs_compile=None if ms["compile"] is None else ms["compile"] / ms["kernel"],
                            gbps=nbytes / t / 1e9, tflops=nflops / t / 1e12, peak_gbps=None if bw is None else bw / 1e9,
                            peak_tflops=None if peak is None else peak / 1e12,
                            of_bound=max(nbytes / bw, nflops / peak) / t if bw and peak else None,
                            rel_err=rel(kern(), ref())))
    return out


def step_times(args) -> list[dict]:
    """``optimizer.step()`` of POET lean (kernels on) and of torch's fused AdamW on the same weights and gradients."""
    import geomopt

    device = torch.device(args.device)
    out = []
    for b in args.block:
        ws = [torch.nn.Parameter(torch.randn(args.weight, args.weight, device=device) / args.weight ** 0.5)
              for _ in range(args.step_weights)]
        for w in ws:
            w.grad = torch.randn_like(w) * 1e-3
        named = [(f"layers.{i}.proj.weight", w) for i, w in enumerate(ws)]
        poet = geomopt.POET([{"params": named}], lr=1e-3, block_size=b, store_base=False, merge_every=10**9)
        adamw = torch.optim.AdamW(ws, lr=1e-3, fused=True)
        for name, opt in (("adamw (fused)", adamw), (f"poet lean, b={b}", poet)):
            t = timed(opt.step, device, args.reps).median
            out.append(dict(optimizer=name, weights=f"{args.step_weights} x {args.weight}^2", step_ms=t * 1e3))
        out[-1]["vs_adamw"] = out[-1]["step_ms"] / out[-2]["step_ms"]
    return out


def _with_peak(key: str, peak: str, spec: str):
    return lambda r: f"{format(r[key], spec)} ({'n/a' if r[peak] is None else format(r[peak], '.0f')})"


COLUMNS = [report.Column("kernel", "kernel"), report.Column("shape", "shape"), report.Column("dtype", "dtype"),
           report.Column("kernel ms", "kernel_ms", ".3f"), report.Column("eager ms", "eager_ms", ".3f"),
           report.Column("compile ms", "compile_ms", ".3f"), report.Column("x eager", "vs_eager", ".2f"),
           report.Column("x compile", "vs_compile", ".2f"),
           report.Column("GB/s (peak)", _with_peak("gbps", "peak_gbps", ".0f")),
           report.Column("TFLOP/s (peak)", _with_peak("tflops", "peak_tflops", ".2f")),
           report.Column("of bound", "of_bound", ".0%"), report.Column("rel err", "rel_err", ".1e")]
STEP_COLUMNS = [report.Column("optimizer", "optimizer"), report.Column("weights", "weights"),
                report.Column("step ms", "step_ms", ".3f"), report.Column("vs fused AdamW", "vs_adamw", ".2f")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--block", nargs="+", type=int, default=[32, 64], help="block sizes b")
    p.add_argument("--blocks", type=int, default=1024, help="skew blocks per Cayley-Neumann call")
    p.add_argument("--terms", type=int, default=4, help="Neumann terms k")
    p.add_argument("--weight", type=int, default=4096, help="side of the square weights")
    p.add_argument("--group", type=int, default=4, help="weights of one shape per tile launch")
    p.add_argument("--qr-rows", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--qr-cols", type=int, default=128, help="columns of [U, xu] (2 x rank)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile column")
    p.add_argument("--step", action="store_true", help="also time optimizer.step() against fused AdamW")
    p.add_argument("--step-weights", type=int, default=16, help="weights of --weight squared in the --step runs")
    p.add_argument("--small", action="store_true", help="tiny sizes: a smoke run (CPU under TRITON_INTERPRET=1)")
    p.add_argument("--out", help="folder for kernels.json / .md (and step.json / .md with --step)")
    args = p.parse_args(argv)
    if args.small:
        args.block, args.blocks, args.weight, args.group, args.qr_rows, args.qr_cols, args.reps = [16], 4, 64, 2, \
            [128], 16, 2
        args.step_weights = 2
    if args.device.startswith("cpu") and os.environ.get("TRITON_INTERPRET") != "1":
        print("error: --device cpu runs the kernels only under TRITON_INTERPRET=1 (set before starting python)",
              file=sys.stderr)
        return 2
    rows = run(args)
    info = {k: v for k, v in vars(args).items() if k != "out"}
    print(f"device: {rows[0]['device'] if rows else args.device}; torch {torch.__version__}")
    print(report.write(args.out, "kernels", rows, COLUMNS, info, device=args.device))
    if args.step:
        with dispatch.kernels_on_cpu() if args.device.startswith("cpu") else _enabled():
            steps = step_times(args)
        print("\n" + report.write(args.out, "steps", steps, STEP_COLUMNS, info, device=args.device))
    return 0


class _enabled:
    """GEOMOPT_KERNELS=1 within the block."""

    def __enter__(self):
        self.before = os.environ.get("GEOMOPT_KERNELS")
        os.environ["GEOMOPT_KERNELS"] = "1"

    def __exit__(self, *exc):
        if self.before is None:
            os.environ.pop("GEOMOPT_KERNELS", None)
        else:
            os.environ["GEOMOPT_KERNELS"] = self.before


if __name__ == "__main__":
    sys.exit(main())
