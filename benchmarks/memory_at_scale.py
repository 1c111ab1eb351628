"""Peak memory of one training step of a Llama at any size, by kind, per optimizer: simulated on fake tensors.

    python benchmarks/memory_at_scale.py --shape 8b --seq-len 1024 --dtype bfloat16 --out results/
    python benchmarks/memory_at_scale.py --shape 13b --seq-len 512 --optimizers adamw,poet-lean+bwd
    python benchmarks/memory_at_scale.py --shape 60m --calibrate      # simulated against real CPU tensors

The model is a transformers LlamaForCausalLM built from a config (no download) under
``torch._subclasses.fake_tensor.FakeTensorMode``: its tensors have shapes, dtypes and devices but no storage,
so an 8B model takes no memory and the step's ops cost only their Python dispatch. Each optimizer's real
``step()`` runs on them (``NAME+bwd`` steps inside backward with ``geomopt.step_in_backward``), under
``torch.distributed._tools.mem_tracker.MemTracker``, which counts every storage allocated and freed by kind:
parameters, gradients, optimizer memory (what the step allocates: its state, and its temporaries while it
runs), activations (forward) and temporaries (backward). Two steps run, so the peak includes a step with the
state in place. The table splits the optimizer memory at the peak into the state that outlives the step and
the step's temporaries.

``--calibrate`` runs the same steps on real CPU tensors and measures their peak by replaying the profiler's
allocations (``benchmarks/peak_memory.py``), beside the simulation, so the two can be compared.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from geomopt import registry, report, step_in_backward
from geomopt.bench import IN_BACKWARD, PRESETS, next_token_loss
from geomopt.bench import parse_args as bench_flags
from geomopt.integrations import parse_spec
from geomopt.tensor_cache import clear_tensor_caches

#: Llama shapes: 60m / 350m as geomopt-bench's presets and GaLore's configs (byte vocabulary), 8b as
#: Sphere-AI-Lab/poet's configs/llama_8b.json (the published memory run: 32 heads, no grouped keys, vocab 32000),
#: llama3-8b with Llama-3's grouped keys and vocabulary, 13b as Llama-2-13B.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=4, vocab=256),
    "60m": dict(hidden=PRESETS["60m"]["hidden"], intermediate=PRESETS["60m"]["intermediate"],
                layers=PRESETS["60m"]["layers"], heads=PRESETS["60m"]["heads"], kv_heads=PRESETS["60m"]["heads"],
                vocab=256),
    "350m": dict(hidden=1024, intermediate=2736, layers=24, heads=16, kv_heads=16, vocab=256),
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=32, vocab=32000),
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "13b": dict(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000),
}
KINDS = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")
GiB = 2**30


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The LlamaForCausalLM of ``args.shape`` (``args.vocab`` over the shape's), in ``args.dtype``, training mode,
    with activation checkpointing where ``args.checkpointing``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[args.shape]
    cfg = LlamaConfig(vocab_size=args.vocab or s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=args.seq_len, tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))  # built in the dtype: no fp32 copy first
    try:
        model = LlamaForCausalLM(cfg).train()
    finally:
        torch.set_default_dtype(default)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    return model


def split_item(item: str) -> tuple[str, bool, dict[str, Any]]:
    """``NAME[+bwd][:key=value[:key=value...]]`` -> (registry name, whether it steps in backward, settings)."""
    head, _, rest = item.partition(":")
    name, settings = parse_spec(f"{head.removesuffix(IN_BACKWARD)}:{rest.replace(':', ',')}")
    return name, head.endswith(IN_BACKWARD), settings


def build_optimizer(item: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer of an ``--optimizers`` item, built as geomopt-bench builds it with this script's block size and
    rank (and ``--fused`` for torch's AdamW), then the item's own settings."""
    name, _, settings = split_item(item)
    spec = registry.get(name)
    flags = bench_flags(["--block-size", str(args.block_size), "--rank", str(args.rank)])
    if args.fused is not None and not spec.takes_model:
        settings = {"fused": args.fused, **settings}
    return spec.build_for_bench(model, 1e-4, flags, **settings)


def step_fn(item: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
            args: argparse.Namespace) -> Callable[..., None]:
    """One training step (an item with ``+bwd``: the optimizer steps inside backward); ``step(after_backward)``
    calls ``after_backward()`` between the backward and the step."""
    in_backward = split_item(item)[1]
    if in_backward:
        step_in_backward(model, opt)
    vocab = model.config.vocab_size

    def step(after_backward: Callable[[], None] = lambda: None) -> None:
        batch = torch.randint(0, vocab, (args.batch, args.seq_len + 1))
        next_token_loss(model, batch).backward()
        after_backward()
        if not in_backward:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def tracked_run(name: str, args: argparse.Namespace, fake: bool) -> dict[str, Any]:
    """Build model and optimizer (on fake tensors where ``fake``), run ``args.steps`` steps under MemTracker: the
    peak by kind, and the optimizer memory that outlives the step."""
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    clear_tensor_caches()  # the run counts the index tables it builds, whatever ran before it
    start = time.perf_counter()
    with mode:
        model = build_model(args)
        opt = build_optimizer(name, model, args)
        step = step_fn(name, model, opt, args)
        tracker = MemTracker()
        tracker.track_external(model, opt)
        grads = []
        with tracker:
            for _ in range(args.steps):
                tracker.reset_mod_stats()
                step(lambda: grads.append(current(tracker)["Gradient"]))
            after = current(tracker)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    row = {k: int(peak.get(k, 0)) for k in KINDS}
    row.update(optimizer=name, peak=int(peak["Total"]), state=after["Optstate"], weights=after["Parameter"],
               grads_after_backward=max(grads), seconds=round(time.perf_counter() - start, 1))
    return row


def current(tracker: MemTracker) -> dict[str, int]:
    """The bytes alive now, by kind."""
    snap = tracker.get_tracker_snapshot("current").get(torch.device("cpu"), {})
    return {k: int(snap.get(k, 0)) for k in KINDS}


def replay_run(name: str, args: argparse.Namespace) -> int:
    """The same steps on real CPU tensors, the peak of tensor memory from the profiler's allocations."""
    from peak_memory import replay_peak

    clear_tensor_caches()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model(args)
        opt = build_optimizer(name, model, args)
        step = step_fn(name, model, opt, args)
        for _ in range(args.steps):
            step()
        del model, opt, step
    return replay_peak(prof)


def parts(row: dict[str, Any]) -> dict[str, int]:
    """The peak by what it holds: the optimizer memory at the peak split into state and step temporaries."""
    state = min(row["state"], row["Optstate"])
    return {"weights": row["Parameter"] + row["Buffer"], "gradients": row["Gradient"], "optimizer state": state,
            "step temporaries": row["Optstate"] - state, "activations": row["Activation"],
            "backward temporaries": row["Temp"] + row["Other"]}


def table(rows: list[dict[str, Any]], args: argparse.Namespace, ref: float | None) -> str:
    unit, size = ("GiB", GiB) if max(r["peak"] for r in rows) >= GiB else ("MiB", 2**20)

    def show(n: int) -> str:
        return f"{n / size:.2f}"
    columns = [report.Column("optimizer", "optimizer"), report.Column(f"peak {unit}", lambda r: show(r["peak"])),
               report.Column("peak GB", lambda r: f"{r['peak'] / 1e9:.2f}")]
    if ref is not None:
        columns.append(report.Column(f"vs {ref:g} GB", lambda r: report.ratio(r["peak"] / 1e9, ref)))
    columns += [report.Column(f"{k} {unit}", lambda r, k=k: show(parts(r)[k])) for k in parts(rows[0])]
    if args.calibrate:
        columns += [report.Column(f"real peak {unit}", lambda r: show(r["real_peak"])),
                    report.Column("simulated / real", lambda r: report.ratio(r["peak"], r["real_peak"], ".4f"))]
    columns.append(report.Column("s", "seconds"))
    return report.write(args.out, f"memory_at_scale_{args.shape}_{args.seq_len}", rows, columns, dict(vars(args)))


def chart(rows: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    """A horizontal stacked bar per optimizer: the peak by part, GiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    names = [r["optimizer"] for r in rows]
    left = [0.0] * len(rows)
    for key in parts(rows[0]):
        vals = [parts(r)[key] / GiB for r in rows]
        ax.barh(names, vals, left=left, label=key)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("GiB at the peak of one training step (simulated)")
    ax.set_title(f"Llama {args.shape}, L = {args.seq_len}, batch {args.batch}, {args.dtype}"
                 + (", activation checkpointing" if args.checkpointing else ""))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--optimizers", default="adamw,poet,poet-lean,poet-lean+bwd,poet-lean+bwd:compensate=False,"
                    "relora,dlra", help="comma-separated NAME[+bwd][:key=value...]: a registry name, +bwd to step "
                    "inside backward, settings over the registry's (e.g. poet-lean+bwd:compensate=False)")
    ap.add_argument("--vocab", type=int, default=None, help="override the shape's vocabulary")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="activation checkpointing of every decoder layer (default on)")
    ap.add_argument("--block-size", type=int, default=256, help="POET's b")
    ap.add_argument("--rank", type=int, default=128, help="ReLoRA's and DLRA's rank")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                    help="torch AdamW's fused flag (default: geomopt-bench's, fused where torch has the kernel)")
    ap.add_argument("--steps", type=int, default=2, help="training steps (the state exists from the second)")
    ap.add_argument("--reference-gb", type=float, default=None, help="a published peak (GB) to show ratios against")
    ap.add_argument("--calibrate", action="store_true", help="also run on real CPU tensors, profiler-replayed peak")
    ap.add_argument("--out", default=None, help="folder for the JSON, the Markdown table and the chart")
    a = ap.parse_args(argv)
    for item in a.optimizers.split(","):
        try:
            split_item(item)
        except ValueError as err:
            ap.error(f"--optimizers: {err} (an item is NAME[{IN_BACKWARD}][:key=value...], {IN_BACKWARD}: step "
                     "inside backward)")
    for key in ("seq_len", "batch", "block_size", "rank", "steps"):
        if getattr(a, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(a, key)}")
    return a


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    rows = []
    for name in args.optimizers.split(","):
        row = tracked_run(name, args, fake=True)
        if args.calibrate:
            gc.collect()
            row["real_peak"] = replay_run(name, args)
        rows.append(row)
        print(f"{name}: peak {row['peak'] / GiB:.2f} GiB ({row['seconds']} s)", file=sys.stderr)
    print(f"Llama {args.shape}, L = {args.seq_len}, batch {args.batch}, {args.dtype}, checkpointing "
          f"{'on' if args.checkpointing else 'off'}, b = {args.block_size}, rank {args.rank}: the peak, by part")
    print(table(rows, args, args.reference_gb))
    if args.out is not None:
        chart(rows, args, f"{args.out}/memory_at_scale_{args.shape}_{args.seq_len}.png")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    main()
