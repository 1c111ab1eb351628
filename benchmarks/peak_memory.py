"""Peak memory of live tensors while training a geomopt-bench model, per optimizer, side by side in one run.

    python benchmarks/peak_memory.py                         # small preset: adamw, poet, poet-lean, poet-lean+bwd
    python benchmarks/peak_memory.py --optimizers adamw,relora --steps 3
    python benchmarks/peak_memory.py --batch 1 --seq-len 32    # activations small: weights, gradients, state

A CPU process's resident set (the figure of `geomopt-bench` on CPU) is mostly the interpreter and libraries,
and torch keeps no allocator peak on CPU. So this script builds the model and the optimizer and runs a few
training steps under `torch.profiler` with `profile_memory=True`, and replays the bytes each op allocated
and freed in time order: the largest sum of live bytes is the peak of tensor memory (weights, gradients,
optimizer state, activations, temporaries that outlive an op). On CUDA it reads
`torch.cuda.max_memory_allocated()` instead. NAME+bwd steps inside backward (`geomopt.step_in_backward`).
"""
from __future__ import annotations

import argparse

import torch

from geomopt import bench, registry, report, step_in_backward
from geomopt.data import load_corpus, sample_batch


def replay_peak(prof: torch.profiler.profile) -> int:
    """The peak of live CPU tensor bytes while ``prof`` ran: the allocator's running total of allocated bytes,
    which each allocation event of the profile carries, at its largest, less what was allocated before the
    first event. (An earlier version summed each op's own allocations net of frees in start order; that missed
    frees and allocations attributed to enclosing ops and read POET's step at half its true peak.)"""
    from torch._C._profiler import _EventType

    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            allocs.append((e.start_time_ns, e.extra_fields))
    if not allocs:
        return 0
    first = min(allocs, key=lambda a: a[0])[1]
    return max(f.total_allocated for _, f in allocs) - (first.total_allocated - first.alloc_size)


def train(name: str, args: argparse.Namespace, steps: int, train_tokens: torch.Tensor) -> None:
    """Everything a training run holds, built inside the measurement: model, optimizer, batches, steps."""
    model = bench.build_model(args).to(args.device)
    base = name.removesuffix(bench.IN_BACKWARD)
    spec = registry.get(base)
    opt = spec.build_for_bench(model, spec.bench_lr, args)
    handle = step_in_backward(model, opt) if name.endswith(bench.IN_BACKWARD) else None
    gen = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(steps):
        batch = sample_batch(train_tokens, args.batch, args.seq_len, gen).to(args.device)
        bench.next_token_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if handle is not None:
        handle.remove()


def measure(name: str, args: argparse.Namespace, steps: int, train_tokens: torch.Tensor) -> int:
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train(name, args, steps, train_tokens)
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        train(name, args, steps, train_tokens)
    return replay_peak(prof)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(bench.PRESETS))
    ap.add_argument("--optimizers", default="adamw,poet,poet-lean,poet-lean+bwd")
    ap.add_argument("--steps", type=int, default=3, help="training steps measured (the state exists after the first)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-bytes", type=int, default=2_000_000, help="bytes of corpus to read")
    ap.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    ap.add_argument("--seq-len", type=int, default=None, help="override the preset's sequence length")
    ap.add_argument("--out", default=None, help="folder for peak_memory.json and peak_memory.md")
    a = ap.parse_args(argv)
    names = a.optimizers.split(",")
    unknown = [n for n in names if n.removesuffix(bench.IN_BACKWARD) not in registry.REGISTRY]
    if unknown:
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {registry.names()} "
                         f"(NAME{bench.IN_BACKWARD} to step inside backward)")
    if a.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {a.steps}")
    overrides = [x for k, v in (("--batch", a.batch), ("--seq-len", a.seq_len)) if v is not None for x in (k, str(v))]
    args = bench.parse_args(["--preset", a.preset, "--device", a.device, "--max-bytes", str(a.max_bytes), *overrides])
    train_tokens, _ = load_corpus(args.max_bytes)
    rows = []
    for name in names:
        rows.append(dict(optimizer=name, peak_bytes=measure(name, args, a.steps, train_tokens)))
    ref = next((r["peak_bytes"] for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["vs_adamw"] = report.ratio(r["peak_bytes"], ref)
    print(f"preset {a.preset}, batch {args.batch} x {args.seq_len}, {a.steps} steps, {a.device}: peak tensor memory")
    columns = [report.Column("optimizer", "optimizer"),
               report.Column("peak", lambda r: f"{r['peak_bytes'] / 2**20:.1f} MiB"),
               report.Column("vs adamw", "vs_adamw")]
    print(report.write(a.out, "peak_memory", rows, columns, dict(vars(a)), device=a.device))
    return rows


if __name__ == "__main__":
    main()
