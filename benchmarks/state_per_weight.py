"""Optimizer-state bytes of each routed weight of a geomopt-bench model, against AdamW's for the same weight.

    python benchmarks/state_per_weight.py                    # the small preset, ReLoRA rank 32, POET b = 32
    python benchmarks/state_per_weight.py --preset 60m --rank 128 --block-size 128

For ReLoRA the expected ratio is 3 r (m + n) / (2 m n): A (r x n), B (m x r) and their two Adam moments
against AdamW's two m x n moments. The table splits ReLoRA's bytes into those numbers and the bookkeeping
(the generator state that redraws A, step counters), and prints POET's lean and paper modes for comparison.
"""
from __future__ import annotations

import argparse

import torch

from geomopt import POET, ReLoRAReset, bench, report
from geomopt.bench_report import state_bytes


def one_step_state(make, model: torch.nn.Module) -> tuple[dict[int, int], set[int]]:
    """({id(tensor): state bytes}, ids of the factorized weights) after one step with random gradients."""
    opt = make(model)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt.step()
    out = {}
    for p in model.parameters():
        if p in opt.state:
            holder = torch.optim.Optimizer.__new__(torch.optim.Optimizer)
            holder.state = {p: opt.state[p]}
            out[id(p)] = state_bytes(holder)
    factorized = {id(p) for p in model.parameters() if {"A", "q_row"} & set(opt.state.get(p, {}))}
    return out, factorized


COLUMNS = [report.Column("weight (m x n)", lambda r: f"{r['m']} x {r['n']}"), report.Column("AdamW", "adamw"),
           report.Column("ReLoRA", "relora"), report.Column("of it A, B, moments", "factors"),
           report.Column("ReLoRA / AdamW", lambda r: r["relora"] / r["adamw"], ".5f"),
           report.Column("bound 3r(m+n)/(2mn)", "bound", ".5f"),
           report.Column("POET lean / AdamW", lambda r: r["lean"] / r["adamw"], ".4f"),
           report.Column("POET paper / AdamW", lambda r: r["paper"] / r["adamw"], ".4f")]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(bench.PRESETS))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=32)
    a = ap.parse_args(argv)
    model = bench.build_model(bench.parse_args(["--preset", a.preset]))
    r = a.rank
    adamw, _ = one_step_state(lambda m: torch.optim.AdamW(m.parameters()), model)
    relora, routed = one_step_state(lambda m: ReLoRAReset(m, rank=r), model)
    lean, _ = one_step_state(lambda m: POET(m, block_size=a.block_size, store_base=False), model)
    paper, _ = one_step_state(lambda m: POET(m, block_size=a.block_size), model)
    names = {id(p): n for n, p in model.named_parameters()}
    rows, seen = [], set()
    print(f"preset {a.preset}, ReLoRA rank {r}, POET block {a.block_size}; bytes per weight after one step")
    for p in model.parameters():
        m, n = p.shape if p.dim() == 2 else (0, 0)
        if id(p) not in routed or (m, n) in seen:  # AdamW-routed tensors have the same state in every run
            continue
        seen.add((m, n))
        factors = 3 * r * (m + n) * p.element_size()
        row = dict(weight=names[id(p)], m=m, n=n, adamw=adamw[id(p)], relora=relora[id(p)], factors=factors,
                   bound=3 * r * (m + n) / (2 * m * n), lean=lean[id(p)], paper=paper[id(p)])
        rows.append(row)
    print(report.markdown(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
