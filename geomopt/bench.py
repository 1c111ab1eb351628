"""The main job: every optimizer on the same small LLaMA and the same tokens, side by side.

    python -m geomopt.bench            # or: geomopt-bench --optimizers adamw,poet --steps 200

Each optimizer trains in its own spawned process (so peak memory is its own) on the embedded corpus
(``geomopt.data``) or ``--text-file``; the table reports validation loss, tokens/s, optimizer step
time, optimizer-state bytes, peak memory and the number of trained scalars; ``--out DIR`` writes
``results.json``, ``table.md`` and ``loss.png`` (validation loss against tokens).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import data as corpus
from .bench_report import plot, state_bytes, table, trainable_count
from .grow import expand, parse_growth
from .in_backward import step_in_backward
from .init import normalized_gaussian_
from .optim import POET, DLRAMomentum, ReLoRAReset
from .optim.routing import build_param_groups

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=32, layers=2, heads=2, intermediate=64, seq_len=32, batch=4, steps=12, eval_windows=4),
    "small": dict(hidden=128, layers=4, heads=4, intermediate=384, seq_len=128, batch=16, steps=300, eval_windows=32),
    "60m": dict(hidden=512, layers=8, heads=8, intermediate=1376, seq_len=256, batch=64, steps=2000, eval_windows=64),
}

IN_BACKWARD = "+bwd"  # optimizer-name suffix: step each weight inside backward (geomopt.step_in_backward)

# name -> (constructor, default lr); the constructor takes (model, lr, args)
OPTIMIZERS = {
    "adamw": (lambda m, lr, a: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01), 1e-3),
    "poet": (lambda m, lr, a: POET(m, lr=lr, block_size=a.block_size, merge_every=a.merge_every,
                                   neumann_terms=a.neumann_terms), 3e-3),
    "poet-lean": (lambda m, lr, a: POET(m, lr=lr, block_size=a.block_size, merge_every=a.merge_every,
                                        store_base=False), 3e-3),
    "poet-fs": (lambda m, lr, a: POET(m, lr=lr, block_size=0.5, mode="fs", merge_every=a.merge_every), 3e-3),
    "relora": (lambda m, lr, a: ReLoRAReset(m, lr=lr, rank=a.rank, alpha=a.rank, reset_every=a.reset_every,
                                            restart_warmup_steps=a.restart_warmup,
                                            warm_start_steps=a.warm_start), 3e-3),
    "dlra": (lambda m, lr, a: DLRAMomentum(m, lr=lr, rank=a.rank, method="adam"), 3e-3),
    "dlra-hb": (lambda m, lr, a: DLRAMomentum(m, lr=lr, rank=a.rank, method="heavy_ball"), 1e-1),
}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("geomopt-bench needs transformers: pip install 'geomopt[bench]'") from err
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor) -> float:
    model.eval()
    losses = [next_token_loss(model, w[None]).item() for w in windows]
    model.train()
    return sum(losses) / len(losses)


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting batch[:, 1:] from batch[:, :-1]."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def train_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one optimizer; returns its row of the table."""
    torch.set_num_threads(args.threads)
    train_tokens, val_tokens = corpus.load_corpus(args.max_bytes, args.text_file)
    windows = corpus.eval_windows(val_tokens, args.eval_windows, args.seq_len)
    model = build_model(args).to(args.device)
    if name.startswith("poet") and args.poet_init == "normalized":
        normalized_gaussian_(model, generator=torch.Generator().manual_seed(args.seed))
    linears = [p for g in build_param_groups(model) if g["factorize"] for p in g["params"]]
    sv0 = [torch.linalg.svdvals(w.detach().double()) for w in linears]
    base, in_bwd = name.removesuffix(IN_BACKWARD), name.endswith(IN_BACKWARD)
    make, default_lr = OPTIMIZERS[base]
    lr = getattr(args, f"lr_{base.replace('-', '_')}", None) or default_lr
    opt = make(model, lr, args)
    if in_bwd:
        step_in_backward(model, opt)  # loss.backward() steps each weight; opt.step() below finds no gradient
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, max(1, args.steps // 10)))
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every optimizer
    curve, step_time, train_time, peak_state = [], 0.0, 0.0, 0
    curve.append((0, evaluate(model, windows.to(args.device))))
    bar = _progress(args.steps, name, args.quiet)
    grown = []  # (step, tokens, val loss before, val loss after)
    for step in range(1, args.steps + 1):
        batch = corpus.sample_batch(train_tokens, args.batch, args.seq_len, gen).to(args.device)
        t0 = time.perf_counter()
        loss = next_token_loss(model, batch)
        loss.backward()
        _sync(args.device)  # the step's time must not include the tail of the backward's GPU work
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        _sync(args.device)
        t2 = time.perf_counter()
        step_time += t2 - t1
        train_time += t2 - t0
        peak_state = max(peak_state, state_bytes(opt))  # factors' inner state is dropped at merges
        for at, kwargs in args.grow:
            if at == step:
                before = evaluate(model, windows.to(args.device))
                expand(model, opt, seed=args.seed + step, **kwargs)
                after = evaluate(model, windows.to(args.device))
                grown.append((step, step * args.batch * args.seq_len, before, after))
                curve.append((step * args.batch * args.seq_len, after))
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step * args.batch * args.seq_len, evaluate(model, windows.to(args.device))))
        bar(step, loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    drift = None if grown else max(  # singular values of grown weights are not comparable
        float(((torch.linalg.svdvals(w.detach().double()) - s0).abs() / s0.clamp_min(1e-12)).max())
        for w, s0 in zip(linears, sv0))
    row = dict(optimizer=name, lr=lr, val_loss=curve[-1][1], val_ppl=math.exp(curve[-1][1]),
               tokens_per_s=args.steps * args.batch * args.seq_len / train_time,
               step_ms=None if in_bwd else 1000 * step_time / args.steps,
               state_bytes=peak_state, peak_rss_bytes=peak, spectrum_drift=drift,
               curve=curve, stats=getattr(opt, "stats", {}), growth=grown, trainable=trainable_count(opt))
    if args.device.startswith("cuda"):
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return row


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _progress(total: int, name: str, quiet: bool):
    if quiet:
        return lambda step, loss: None
    try:
        from tqdm import tqdm
    except ImportError:
        def plain(step: int, loss: float) -> None:
            if step % max(1, total // 10) == 0 or step == total:
                print(f"{name}: step {step}/{total} loss {loss:.3f}", file=sys.stderr, flush=True)
        return plain
    bar = tqdm(total=total, desc=f"{name:>10}", file=sys.stderr, mininterval=1.0)

    def update(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step == total:
            bar.close()
    return update


def _child(name: str, args: argparse.Namespace, queue) -> None:
    try:
        queue.put(("ok", train_one(name, args)))
    except BaseException as err:  # report, never hang the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in args.optimizers:
        if args.in_process:
            rows.append(train_one(name, args))
            continue
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, queue))
        proc.start()
        status, payload = queue.get()
        proc.join()
        if status != "ok":
            raise RuntimeError(f"optimizer {name!r} failed: {payload}")
        rows.append(payload)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="geomopt-bench", description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", default="adamw,poet",
                   help=f"comma list of {','.join(OPTIMIZERS)}; NAME{IN_BACKWARD} steps inside backward "
                        "(geomopt.step_in_backward)")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    for key in ("hidden", "layers", "heads", "intermediate", "seq_len", "batch", "steps", "eval_windows"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"override the preset's {key}")
    p.add_argument("--tokens", type=int, default=None,
                   help="training token budget: steps = ceil(tokens / (batch x seq_len)), instead of --steps")
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: steps // 6)")
    for name in OPTIMIZERS:
        p.add_argument(f"--lr-{name}", type=float, default=None, help=f"learning rate of {name}")
    p.add_argument("--block-size", type=int, default=32, help="POET block size (default 32 = hidden / 4)")
    p.add_argument("--merge-every", type=int, default=50, help="POET merge interval in steps")
    p.add_argument("--neumann-terms", type=int, default=5, help="POET's Cayley-Neumann terms k")
    p.add_argument("--rank", type=int, default=32, help="ReLoRA and DLRA rank (ReLoRA alpha = rank, so s = 1)")
    p.add_argument("--reset-every", type=int, default=100, help="ReLoRA steps per cycle")
    p.add_argument("--restart-warmup", type=int, default=10, help="ReLoRA post-reset lr warm-up steps (0: none)")
    p.add_argument("--warm-start", type=int, default=0, help="ReLoRA full-rank warm-start steps")
    p.add_argument("--poet-init", choices=("normalized", "default"), default="normalized",
                   help="initialize POET's weights with the paper's normalized Gaussian, or the model's own")
    p.add_argument("--text-file", default=None, help="train on this file's bytes instead of the embedded corpus")
    p.add_argument("--max-bytes", type=int, default=8_000_000, help="bytes of corpus to read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="bench-out", help="folder for results.json, table.md and loss.png "
                   "(default: bench-out)")
    p.add_argument("--in-process", action="store_true", help="no subprocess per optimizer (peak memory is shared)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--grow", action="append", default=[], metavar="STEP:SPEC",
                   help="grow the model after STEP with geomopt.grow.expand, e.g. 100:mlp_width=512,hidden=192 or "
                        "200:add_layers=1+3 (repeatable)")
    args = p.parse_args(argv)
    if args.tokens is not None:
        if args.steps is not None:
            p.error(f"give --steps or --tokens, not both (got --steps {args.steps} --tokens {args.tokens})")
        if args.tokens < 1:
            p.error(f"--tokens must be >= 1, got {args.tokens}")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tokens is not None:
        args.steps = -(-args.tokens // (args.batch * args.seq_len))
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [o for o in args.optimizers if o.removesuffix(IN_BACKWARD) not in OPTIMIZERS]
    if unknown or not args.optimizers:
        p.error(f"--optimizers: unknown {unknown}; choose from {','.join(OPTIMIZERS)}")
    for key in ("hidden", "layers", "heads", "intermediate", "seq_len", "batch", "steps", "eval_windows"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    args.eval_every = args.eval_every or max(1, args.steps // 6)
    try:
        args.grow = sorted(parse_growth(g) for g in args.grow)
    except ValueError as err:
        p.error(f"--grow: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the benchmark and print its table; returns the exit status."""
    run_bench(argv)
    return 0


def run_bench(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark with command-line ``argv``; returns the table's rows."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args)
    md = table(rows)
    tokens = args.steps * args.batch * args.seq_len
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"Python {platform.python_version()}, device {args.device}")
    title = (f"preset {args.preset}: {args.steps} steps x {args.batch} x {args.seq_len} = {tokens} tokens, "
             f"seed {args.seed}")
    print(f"\n{title}; {machine}; {time.perf_counter() - t0:.0f} s in all\n")
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2))
        (out / "table.md").write_text(f"{title}; {machine}\n\n{md}\n")
        if not plot(rows, out / "loss.png", f"{title}\n{machine}"):
            print("loss.png not written: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(main())
