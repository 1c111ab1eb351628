"""Time each Triton kernel against its torch reference, eager and torch.compile, side by side in one run.

    python benchmarks/bench_kernels.py                 # on a GPU: the sizes of BENCHMARKS.md
    python benchmarks/bench_kernels.py --small --device cpu --no-compile   # a smoke run (TRITON_INTERPRET=1)

For every case it prints the time of the kernel, of the eager reference and of the compiled reference,
the kernel's speed-up over each, its achieved GB/s (minimum traffic: inputs read once, outputs written
once) and TFLOP/s, the device's peaks, the fraction of the roofline bound reached (bound time = max(bytes /
peak bandwidth, flops / peak compute) over the measured time), and the kernel's relative error against
the reference. fp32 runs use IEEE products (no TF32), so their compute peak is the non-tensor FP32 rate.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

from geomopt.geometry import block_layout, cayley_neumann, skew_size
from geomopt.geometry import blocks as ref_blocks
from geomopt.geometry.qr import tall_qr
from geomopt.timing import timed

# (memory bandwidth B/s, {dtype: dense compute FLOP/s}) from the vendors' data sheets, by name substring
PEAKS = {
    "H200": (4.8e12, {"fp32": 67e12, "bf16": 989e12}),
    "H100 PCIe": (2.0e12, {"fp32": 51e12, "bf16": 756e12}),
    "H100": (3.35e12, {"fp32": 67e12, "bf16": 989e12}),
    "A100": (2.0e12, {"fp32": 19.5e12, "bf16": 312e12}),
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
        return max(rel(x, y) for x, y in zip(a, b))
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cases(args, device: torch.device, dtype: torch.dtype):
    """(name, shape text, kernel fn, reference fn, bytes, flops) per case."""
    from geomopt.kernels import block_ops, cayley, retract

    size = dtype.itemsize
    g = torch.Generator(device="cpu").manual_seed(0)
    for b in args.block:
        nq = skew_size(b)
        q = (torch.randn(args.blocks, nq, generator=g) * 0.5 / (0.5 * b) ** 0.5).to(device, dtype)
        up = torch.randn(args.blocks, b, b, generator=g).to(device, dtype)
        k = args.terms
        text = f"{args.blocks} x b={b}, k={k}"
        io = args.blocks * (nq + b * b) * size
        yield ("cayley_neumann fwd", text, functools.partial(cayley.cayley_neumann, q, b, k),
               functools.partial(cayley_neumann, q, b, k), io, args.blocks * k * 2 * b**3)
        qg = q.clone().requires_grad_()

        def fwd_bwd(fn, qg=qg, b=b, k=k, up=up):
            return torch.autograd.grad(fn(qg, b, k), qg, up)[0]

        yield ("cayley_neumann fwd+bwd", text, functools.partial(fwd_bwd, cayley.cayley_neumann),
               functools.partial(fwd_bwd, cayley_neumann), 2 * io, args.blocks * 4 * k * 2 * b**3)
    m = n = args.weight
    x = torch.randn(m, n, generator=g).to(device, dtype)
    gr = torch.randn(m, n, generator=g).to(device, dtype)
    for b in args.block:
        idx = block_layout(torch.randperm(m, generator=g).to(device), b, False)[0]
        d = torch.randn(idx.shape[0], b, b, generator=g).to(device, dtype)
        text = f"{m} x {n}, b={b}"
        flops = 2 * b * m * n
        blocks_io = idx.shape[0] * b * b * size
        for name in ("rotate_rows", "rotate_cols"):
            yield (name, text, functools.partial(getattr(block_ops, name), x, idx, d),
                   functools.partial(getattr(ref_blocks, name), x, idx, d), 2 * m * n * size + blocks_io, flops)
        yield ("row_block_grad", text, functools.partial(block_ops.row_block_grad, gr, x, idx),
               functools.partial(ref_blocks.row_block_grad, gr, x, idx), 2 * m * n * size + blocks_io, flops)
        yield ("col_block_grad", text, functools.partial(block_ops.col_block_grad, x, gr, idx),
               functools.partial(ref_blocks.col_block_grad, x, gr, idx), 2 * m * n * size + blocks_io, flops)
    for rows in args.qr_rows:
        c = args.qr_cols
        u, _ = torch.linalg.qr(torch.randn(rows, c // 2, generator=g, dtype=torch.float64))
        xu = torch.randn(rows, c - c // 2, generator=g, dtype=torch.float64) * 1e-3
        xu -= u @ (u.T @ xu)
        aug = torch.cat([u, xu], 1).to(device, dtype)
        # CholeskyQR2: two Gram products and two applications (2 m c^2 flops each); X read 3x, Y and Q written
        yield ("tall_qr (CholeskyQR2)", f"{rows} x {c}", functools.partial(retract.tall_qr, aug),
               functools.partial(tall_qr, aug), 5 * rows * c * size, 8 * rows * c * c)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    name, bw, flops = peaks(device)
    out = []
    for dname in args.dtype:
        dtype = DTYPES[dname]
        peak = flops.get(dname)
        for case, shape, kern, ref, nbytes, nflops in cases(args, device, dtype):
            want = ref()
            err = rel(kern(), want)
            t_k = timed(kern, device, args.reps).median
            t_e = timed(ref, device, args.reps).median
            t_c = None
            if args.compile:
                compiled = torch.compile(ref.func)
                t_c = timed(functools.partial(compiled, *ref.args), device, args.reps).median
            bound = None
            if bw and peak:
                bound = max(nbytes / bw, nflops / peak) / t_k
            out.append(dict(kernel=case, shape=shape, dtype=dname, device=name, kernel_ms=t_k * 1e3,
                            eager_ms=t_e * 1e3, compile_ms=None if t_c is None else t_c * 1e3,
                            vs_eager=t_e / t_k, vs_compile=None if t_c is None else t_c / t_k,
                            gbps=nbytes / t_k / 1e9, tflops=nflops / t_k / 1e12,
                            peak_gbps=None if bw is None else bw / 1e9,
                            peak_tflops=None if peak is None else peak / 1e12, of_bound=bound, rel_err=err))
    return out


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| kernel | shape | dtype | kernel ms | eager ms | compile ms | x eager | x compile | GB/s (peak) "
            "| TFLOP/s (peak) | of bound | rel err |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['kernel_ms']:.3f} | {r['eager_ms']:.3f} | "
            f"{fmt(r['compile_ms'], '.3f')} | {r['vs_eager']:.2f} | {fmt(r['vs_compile'], '.2f')} | "
            f"{r['gbps']:.0f} ({fmt(r['peak_gbps'], '.0f')}) | {r['tflops']:.2f} ({fmt(r['peak_tflops'], '.0f')}) | "
            f"{fmt(r['of_bound'], '.0%')} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--block", nargs="+", type=int, default=[128, 256], help="block sizes b")
    p.add_argument("--blocks", type=int, default=1024, help="skew blocks per Cayley-Neumann call")
    p.add_argument("--terms", type=int, default=5, help="Neumann terms k")
    p.add_argument("--weight", type=int, default=4096, help="side of the square weight for rotations/gradients")
    p.add_argument("--qr-rows", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--qr-cols", type=int, default=128, help="columns of [U, xu] (2 x rank)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile column")
    p.add_argument("--small", action="store_true", help="tiny sizes: a smoke run (CPU under TRITON_INTERPRET=1)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.small:
        args.block, args.blocks, args.weight, args.qr_rows, args.qr_cols, args.reps = [16], 4, 64, [128], 16, 2
    if args.device.startswith("cpu") and os.environ.get("TRITON_INTERPRET") != "1":
        print("error: --device cpu runs the kernels only under TRITON_INTERPRET=1 (set before starting python)",
              file=sys.stderr)
        return 2
    rows = run(args)
    print(f"device: {rows[0]['device'] if rows else args.device}; torch {torch.__version__}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
