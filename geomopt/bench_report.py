"""What ``geomopt-bench`` measures about an optimizer, and how it shows the results (its table, in
``geomopt.report``'s columns, and its plot)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from .report import Column, markdown


def trainable_count(opt: torch.optim.Optimizer) -> int:
    """Scalars the optimizer trains: every AdamW-routed tensor in full, and for a factorized weight the
    factors that stand in for it (POET's skew blocks, ReLoRA's A and B, DLRA's U, S and V; a weight in
    ReLoRA's full-rank warm start counts in full)."""
    count = getattr(opt, "trained_numel", lambda p: p.numel())  # what the optimizer says (torch's: every scalar)
    return sum(count(p) for group in opt.param_groups for p in group["params"])


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in the optimizer's state (factors, moments, permutations, ...)."""
    seen: set[int] = set()

    def walk(v: Any) -> int:
        if isinstance(v, torch.Tensor):
            if id(v) in seen:
                return 0
            seen.add(id(v))
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0

    return sum(walk(s) for s in opt.state.values())


def peak_key(row: dict[str, Any]) -> str:
    """The peak-memory figure of a row: CUDA's allocator peak on a GPU, the process's peak RSS on CPU."""
    return "peak_cuda_bytes" if "peak_cuda_bytes" in row else "peak_rss_bytes"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the rows; ratios are to the adamw row (torch's fused AdamW) when there is one."""
    base = next((r for r in rows if r["optimizer"] == "adamw"), None)

    def with_ratio(key: str, text: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            ok = base and base.get(key) and r.get(key) is not None
            return text(r) + (f" ({r[key] / base[key]:.2f}x)" if ok else "")
        return cell

    def merges(r: dict[str, Any]) -> str:
        st = r.get("stats") or {}
        return (f"{st['merges']} ({st['early_merges']})" if "merges" in st else
                f"{st['resets']} resets" if "resets" in st else "-")

    pk = peak_key(rows[0]) if rows else "peak_rss_bytes"
    columns = [
        Column("optimizer", "optimizer"), Column("lr", "lr", "g"), Column("val loss", "val_loss", ".4f"),
        Column("val ppl", "val_ppl", ".2f"), Column("tokens/s", with_ratio("tokens_per_s",
                                                                            lambda r: f"{r['tokens_per_s']:.0f}")),
        Column("step ms", with_ratio("step_ms", _ms)),
        Column("optimizer state", with_ratio("state_bytes", lambda r: f"{r['state_bytes'] / 2**20:.2f} MiB")),
        Column("peak CUDA memory" if pk == "peak_cuda_bytes" else "peak RSS",
               with_ratio(pk, lambda r: f"{r[peak_key(r)] / 2**20:.0f} MiB")),
        Column("trainable", with_ratio("trainable", lambda r: _count(r["trainable"]))),
        Column("merges (early) / resets", merges),
        Column("spectrum drift", lambda r: "-" if r["spectrum_drift"] is None else format(r["spectrum_drift"], ".1e"))]
    return markdown(rows, columns)


COLUMNS = """Columns. val loss: the validation loss at the end, in nats per byte of the held-out part of the corpus;
val ppl: its exponential. tokens/s: training tokens per second of training time (forward, backward and step;
validation excluded). step ms: the mean wall time per step of `optimizer.step()`, `zero_grad` and the scheduler
("in backward": the step runs inside the backward pass). optimizer state: the largest size over the run of the
tensors the optimizer holds (factors, moments, permutations). peak RSS: the peak resident memory of the process
that trained the row (each optimizer trains in its own process; on CUDA, peak allocated memory). trainable: the
scalars the optimizer trains (the AdamW-routed tensors in full; for a factorized weight, the factors that stand in
for it). merges (early) / resets: POET's merges summed over the weights (one weight merging counts once), the
safeguard's early merges in parentheses; ReLoRA's resets summed over the weights. spectrum drift: the largest
relative change of any singular value of the model's `nn.Linear` weights (those geomopt routes) since the start
("-" after growth). In parentheses: the ratio to the adamw row, torch's fused AdamW where the device has it."""


def _ms(r: dict[str, Any]) -> str:
    return "in backward" if r["step_ms"] is None else f"{r['step_ms']:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Validation loss against tokens, one curve per optimizer, into ``path`` (PNG). Returns False, with
    nothing written, when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        tokens, losses = zip(*r["curve"])
        ax.plot(tokens, losses, marker="o", markersize=3, label=f"{r['optimizer']} ({r['val_loss']:.3f})")
    if all(loss > 0 for r in rows for _, loss in r["curve"] if math.isfinite(loss)):
        ax.set_yscale("log")  # the untrained start stays in view and the trained end stays readable
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
