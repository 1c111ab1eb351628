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
from . import registry
from .bench_report import COLUMNS, plot, state_bytes, table, trainable_count
from .grow import expand, parse_growth
from .in_backward import step_in_backward
from .init import normalized_gaussian_
from .nn import LowRankLinear, lowrank_role
from .optim import POET
from .optim.routing import build_param_groups
from .schedules import warmup_cosine
from .timing import Clock

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=32, layers=2, heads=2, intermediate=64, seq_len=32, batch=4, steps=12, eval_windows=4,
                 block_size=8),
    "small": dict(hidden=128, layers=4, heads=4, intermediate=384, seq_len=128, batch=16, steps=300, eval_windows=32,
                  block_size=32),
    "60m": dict(hidden=512, layers=8, heads=8, intermediate=1376, seq_len=256, batch=64, steps=2000, eval_windows=64,
                block_size=128),
}  # block_size: POET's b, hidden / 4

IN_BACKWARD = "+bwd"  # optimizer-name suffix: step each weight inside backward (geomopt.step_in_backward)

def _ref_block_arg(text: str) -> int | str:
    return "none" if text.lower() == "none" else int(text)


def _need_transformers() -> None:
    """Exit with what to install when transformers (the bench extra) is missing, before any work starts."""
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise SystemExit("geomopt-bench needs transformers: pip install 'geomopt[bench]'") from err


def routed_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weight matrices of the layers the optimizers route (detached): the routed ``nn.Linear`` weights, and
    U S V^T of every ``geomopt.nn.LowRankLinear`` (whose rank may have changed since: compare the leading values)."""
    with torch.no_grad():
        out = [m.weight_matrix() for m in model.modules() if isinstance(m, LowRankLinear)]
    return out + [p.detach() for g in build_param_groups(model) if g["factorize"] for p in g["params"]
                  if lowrank_role(p) is None]


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    _need_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


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


class Run:
    """One optimizer's training run on the benchmark's model and batches, advanced a few steps at a time, so
    that the runs of several optimizers can take turns (``run``)."""

    def __init__(self, name: str, args: argparse.Namespace, progress: bool = True):
        torch.set_num_threads(args.threads)
        self.name, self.args = name, args
        train_tokens, val_tokens = corpus.load_corpus(args.max_bytes, args.text_file)
        self.train_tokens = train_tokens
        self.windows = corpus.eval_windows(val_tokens, args.eval_windows, args.seq_len).to(args.device)
        self.model = model = build_model(args).to(args.device)
        base, self.in_bwd = name.removesuffix(IN_BACKWARD), name.endswith(IN_BACKWARD)
        spec = registry.get(base)
        if issubclass(spec.cls, POET) and args.poet_init == "normalized":
            normalized_gaussian_(model, generator=torch.Generator().manual_seed(args.seed))
        self.lr = getattr(args, f"lr_{base.replace('-', '_')}", None) or spec.bench_lr
        self.opt = spec.build_for_bench(model, self.lr, args)  # which may factorize the model's layers
        self.sv0 = [torch.linalg.svdvals(w.double()) for w in routed_matrices(model)]
        if self.in_bwd:
            step_in_backward(model, self.opt)  # loss.backward() steps each weight; opt.step() finds no gradient
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(
            total_steps=args.steps, warmup_steps=max(1, args.steps // 10), warmup_offset=1))
        self.gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every optimizer
        self.step_time = self.train_time = 0.0
        self.peak_state = 0
        self.curve = [(0, evaluate(model, self.windows))]
        self.grown: list[tuple] = []  # (step, tokens, val loss before, val loss after)
        self.step = 0
        self.loss = float("nan")
        self.bar = _progress(args.steps, name, args.quiet or not progress)

    def advance(self, steps: int) -> None:
        """Train up to ``steps`` more steps (fewer at the end of the run)."""
        args, model, opt = self.args, self.model, self.opt
        for _ in range(min(steps, args.steps - self.step)):
            self.step += 1
            batch = corpus.sample_batch(self.train_tokens, args.batch, args.seq_len, self.gen).to(args.device)
            clock = Clock(args.device).start()
            loss = next_token_loss(model, batch)
            loss.backward()
            backward = clock.lap()  # synced: the step's time does not include the tail of the backward's GPU work
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.sched.step()
            step = clock.lap()
            self.step_time += step
            self.train_time += backward + step
            self.peak_state = max(self.peak_state, state_bytes(opt))  # factors' inner state is dropped at merges
            tokens = self.step * args.batch * args.seq_len
            for at, kwargs in args.grow:
                if at == self.step:
                    before = evaluate(model, self.windows)
                    expand(model, opt, seed=args.seed + self.step, **kwargs)
                    after = evaluate(model, self.windows)
                    self.grown.append((self.step, tokens, before, after))
                    self.curve.append((tokens, after))
            if self.step % args.eval_every == 0 or self.step == args.steps:
                self.curve.append((tokens, evaluate(model, self.windows)))
            self.loss = loss.item()
            self.bar(self.step, self.loss)

    def finish(self) -> dict[str, Any]:
        """The run's row of the table."""
        args, curve = self.args, self.curve
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        drift = None if self.grown else max(  # singular values of grown weights are not comparable
            (float(((s[: len(s0)] - s0[: len(s)]).abs() / s0[: len(s)].clamp_min(1e-12)).max())
             for s, s0 in zip((torch.linalg.svdvals(w.double()) for w in routed_matrices(self.model)), self.sv0)),
            default=None)
        row = dict(optimizer=self.name, lr=self.lr, val_loss=curve[-1][1], val_ppl=math.exp(curve[-1][1]),
                   tokens_per_s=args.steps * args.batch * args.seq_len / self.train_time,
                   step_ms=None if self.in_bwd else 1000 * self.step_time / args.steps,
                   state_bytes=self.peak_state, peak_rss_bytes=peak, spectrum_drift=drift,
                   curve=curve, stats=getattr(self.opt, "stats", {}), growth=self.grown,
                   trainable=trainable_count(self.opt))
        if args.device.startswith("cuda"):
            row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        return row


def train_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one optimizer start to end; returns its row of the table."""
    run_ = Run(name, args)
    run_.advance(args.steps)
    return run_.finish()


def _progress(total: int, name: str, quiet: bool):
    """A callback ``(steps done so far, last loss)`` that shows progress: tqdm's bar, or a line every tenth."""
    if quiet:
        return lambda step, loss: None
    try:
        from tqdm import tqdm
    except ImportError:
        shown = [0]

        def plain(step: int, loss: float) -> None:
            if step - shown[0] >= max(1, total // 10) or step == total:
                shown[0] = step
                print(f"{name}: step {step}/{total} loss {loss:.3f}", file=sys.stderr, flush=True)
        return plain
    bar = tqdm(total=total, desc=f"{name:>10}", file=sys.stderr, mininterval=1.0)

    def update(step: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step == total:
            bar.close()
    return update


TURN_STEPS = 10  # steps an optimizer's process trains before the next one takes its turn


def _child(name: str, args: argparse.Namespace, conn) -> None:
    """One optimizer's process: set up, then train TURN_STEPS steps whenever the parent says so."""
    try:
        run_ = Run(name, args, progress=False)
        conn.send(("ready", 0, run_.loss))
        while True:
            what = conn.recv()
            if what == "advance":
                run_.advance(TURN_STEPS)
                conn.send(("advanced", run_.step, run_.loss))
            else:
                conn.send(("ok", run_.finish(), None))
                return
    except BaseException as err:  # report, never hang the parent
        conn.send(("error", f"{type(err).__name__}: {err}", None))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train every optimizer; returns the rows. By default each optimizer trains in its own spawned process (so
    peak memory is its own) and the processes take turns, TURN_STEPS steps each, so that every optimizer's
    timings come from the same minutes of the machine (a shared machine's speed drifts by 10-20% from one
    minute to the next). ``--in-process`` trains them one after another in this process."""
    if args.in_process:
        return [train_one(name, args) for name in args.optimizers]
    ctx = mp.get_context("spawn")
    procs = []
    try:
        for name in args.optimizers:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(name, args, child), daemon=True)
            proc.start()
            procs.append((name, proc, parent))
        for name, _, conn in procs:
            _expect(name, conn, "ready")
        bar = _progress(args.steps * len(procs), "all", args.quiet)
        rows: dict[str, dict[str, Any]] = {}
        steps = dict.fromkeys(args.optimizers, 0)
        while len(rows) < len(procs):
            for name, _, conn in procs:
                if name in rows:
                    continue
                conn.send("advance")
                step, loss = _expect(name, conn, "advanced")
                steps[name] = step
                bar(sum(steps.values()), loss)
                if step >= args.steps:
                    conn.send("finish")
                    rows[name] = _expect(name, conn, "ok")[0]
        return [rows[name] for name in args.optimizers]
    finally:
        for _, proc, conn in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
            conn.close()


def _expect(name: str, conn, what: str) -> tuple:
    """The payload of the child's next message, which must be ``what``."""
    status, payload, extra = conn.recv()
    if status == "error":
        raise RuntimeError(f"optimizer {name!r} failed: {payload}")
    if status != what:
        raise RuntimeError(f"optimizer {name!r}: expected {what!r}, got {status!r}")
    return (payload, extra)


def _parser() -> argparse.ArgumentParser:
    """``geomopt-bench``'s flags (the optimizer names and their lrs from ``geomopt.registry``)."""
    p = argparse.ArgumentParser(prog="geomopt-bench", description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", default="adamw,poet",
                   help=f"comma list of {','.join(registry.names())}; NAME{IN_BACKWARD} steps inside backward "
                        "(geomopt.step_in_backward)")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    for key in ("hidden", "layers", "heads", "intermediate", "seq_len", "batch", "steps", "eval_windows"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"override the preset's {key}")
    p.add_argument("--tokens", type=int, default=None,
                   help="training token budget: steps = ceil(tokens / (batch x seq_len)), instead of --steps")
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: steps // 6)")
    for name, spec in registry.REGISTRY.items():
        p.add_argument(f"--lr-{name}", type=float, default=None, help=f"learning rate of {name}: {spec.label} "
                       f"(default {spec.bench_lr:g})")
    p.add_argument("--block-size", type=int, default=None,
                   help="POET block size b (default: the preset's, hidden / 4: tiny 8, small 32, 60m 128)")
    p.add_argument("--merge-every", type=int, default=50, help="POET merge interval in steps")
    p.add_argument("--lr-ref-block", type=_ref_block_arg, default=None,
                   help="POET's lr_ref_block: the factors' lr scaled by sqrt(REF / b); 'none' turns it off "
                        "(default: POET's, 32)")
    p.add_argument("--neumann-terms", type=int, default=None, help="POET's Cayley-Neumann terms k (default: POET's)")
    p.add_argument("--retraction", default="svd", choices=("svd", "qr"), help="DLRAMomentum's retraction")
    p.add_argument("--exact-merge", action="store_true",
                   help="POET's merging step rotates by the exact Cayley map (exact_merge=True)")
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
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the preset's values where none was given, checked (``SystemExit`` with the reason)."""
    p = _parser()
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
    unknown = [o for o in args.optimizers if o.removesuffix(IN_BACKWARD) not in registry.REGISTRY]
    if unknown or not args.optimizers:
        p.error(f"--optimizers: unknown {unknown}; choose from {','.join(registry.names())}")
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
    _need_transformers()  # up front: the worker processes would each fail later
    t0 = time.perf_counter()
    rows = run(args)
    md = table(rows)
    tokens = args.steps * args.batch * args.seq_len
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"Python {platform.python_version()}, device {args.device}")
    title = (f"preset {args.preset}: {args.steps} steps x {args.batch} x {args.seq_len} = {tokens} tokens, "
             f"seed {args.seed}; ratios are to adamw, torch's fused AdamW where the device has it (adamw-loop: "
             "torch's default loop)")
    print(f"\n{title}; {machine}; {time.perf_counter() - t0:.0f} s in all\n")
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2))
        (out / "table.md").write_text(f"{title}; {machine}\n\n{md}\n\n{COLUMNS}\n")
        if not plot(rows, out / "loss.png", f"{title}\n{machine}"):
            print("loss.png not written: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(main())
