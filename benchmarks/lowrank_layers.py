"""What ``geomopt.nn.LowRankLinear`` saves against ``nn.Linear`` on a preset's routed layers: parameter and gradient
bytes of the whole model, and forward + backward time of each layer shape, dense and factored side by side.

    python benchmarks/lowrank_layers.py --preset small --rank 32

For every shape of the layers that ``geomopt.nn.convert`` swaps, the forward and backward of one layer on the
preset's batch (batch x sequence rows) is timed for ``nn.Linear`` and for ``LowRankLinear`` of ``--rank``
(``geomopt.timing``: median of ``--reps`` after warm-up); the total weighs each shape by its count in the model.
"""
from __future__ import annotations

import argparse
import copy
from collections import Counter
from typing import Any

import torch
from torch import nn

from geomopt import bench, report
from geomopt.nn import LowRankLinear, convert
from geomopt.timing import timed


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Parameter bytes, and gradient bytes after one backward (what training keeps besides the optimizer)."""
    x = torch.randint(0, 256, (2, 16))
    model.zero_grad(set_to_none=True)
    bench.next_token_loss(model, x).backward()
    out = dict(params=sum(p.numel() * p.element_size() for p in model.parameters()),
               grads=sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return out


def layer_ms(layer: nn.Module, rows: int, reps: int, device: str) -> float:
    x = torch.randn(rows, layer.in_features, device=device, requires_grad=True)
    up = torch.randn(rows, layer.out_features, device=device)

    def fwd_bwd() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(up)

    return timed(fwd_bwd, device, reps).median * 1e3


def rows_of(args: argparse.Namespace, rank: int, reps: int) -> list[dict[str, Any]]:
    dense = bench.build_model(args)
    factored = copy.deepcopy(dense)
    names = convert(factored, rank)
    counts = Counter(tuple(dense.get_submodule(n).weight.shape) for n in names)
    rows_per_batch = args.batch * args.seq_len
    out = []
    for (m, n), count in counts.items():
        linear = nn.Linear(n, m).to(args.device)
        low = LowRankLinear.from_linear(linear, rank)
        d, f = layer_ms(linear, rows_per_batch, reps, args.device), layer_ms(low, rows_per_batch, reps, args.device)
        out.append(dict(layer=f"{n} -> {m}", count=count, dense_ms=d, factored_ms=f, ratio=f / d))
    total_d = sum(r["dense_ms"] * r["count"] for r in out)
    total_f = sum(r["factored_ms"] * r["count"] for r in out)
    out.append(dict(layer="all converted layers", count=sum(counts.values()), dense_ms=total_d, factored_ms=total_f,
                    ratio=total_f / total_d))
    for key, value in model_bytes(dense).items():
        low = model_bytes(factored)[key]
        out.append(dict(layer=f"{key} bytes (whole model)", count=None, dense_ms=None, factored_ms=None,
                        dense=value, factored=low, ratio=low / value))
    return out


COLUMNS = [report.Column("what", "layer"), report.Column("count", "count"),
           report.Column("dense (ms or bytes)", lambda r: r.get("dense") or r["dense_ms"], ".3f"),
           report.Column("LowRankLinear", lambda r: r.get("factored") or r["factored_ms"], ".3f"),
           report.Column("factored / dense", "ratio", ".2f")]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(bench.PRESETS))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder for lowrank_layers.json and lowrank_layers.md")
    a = p.parse_args(argv)
    args = bench.parse_args(["--preset", a.preset, "--device", a.device])
    rows = rows_of(args, a.rank, a.reps)
    print(f"preset {a.preset}, rank {a.rank}, {args.batch} x {args.seq_len} rows, {a.device}, "
          f"{torch.get_num_threads()} threads")
    print(report.write(a.out, "lowrank_layers", rows, COLUMNS, dict(vars(a)), device=a.device))
    return rows


if __name__ == "__main__":
    main()
