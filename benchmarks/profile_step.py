"""Profile one optimizer's step on a geomopt-bench model: where the step's time goes (torch.profiler).

    python benchmarks/profile_step.py --preset 60m --optimizer poet --block-size 128 --steps 10
"""
from __future__ import annotations

import argparse

import torch

from geomopt import bench, registry
from geomopt.data import load_corpus, sample_batch
from geomopt.timing import Clock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(bench.PRESETS))
    p.add_argument("--optimizer", default="poet", choices=registry.names())
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    args = bench.parse_args(["--preset", a.preset, "--block-size", str(a.block_size), "--device", a.device])
    model = bench.build_model(args).to(a.device)
    spec = registry.get(a.optimizer)
    opt = spec.build_for_bench(model, spec.bench_lr, args)
    train, _ = load_corpus(2_000_000)
    gen = torch.Generator().manual_seed(0)

    def grads() -> None:
        batch = sample_batch(train, args.batch, args.seq_len, gen).to(a.device)
        bench.next_token_loss(model, batch).backward()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        grads()
        opt.step()
        opt.zero_grad(set_to_none=True)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if a.device.startswith("cuda") else [])
    total = 0.0
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.steps):
            grads()
            clock = Clock(a.device).start()
            with torch.profiler.record_function("optimizer.step"):
                opt.step()
                total += clock.lap()
            opt.zero_grad(set_to_none=True)
    print(f"{a.optimizer} on {a.preset} ({a.device}): {1000 * total / a.steps:.1f} ms per step (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
