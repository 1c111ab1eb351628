"""Triton kernel of ``geomopt.optim.factor_update.factor_update`` (same signature): POET's b x b work of every block
of one size of a step in one launch, one block per program (see ``kernel.py``). The generator tensors and their
moments are reached through tables of pointers; new ones are written to (N, b(b-1)/2) tensors."""
from __future__ import annotations

import math

import torch

from ...optim.factor_update import AdamHyper, Entries, Updated, entry_counts
from ...optim.poet_settings import RotationMap
from ...tensor_cache import tensor_cache
from ..tiling import INTERPRETED, launch, pow2, precision, table, warps
from .kernel import _factor_update_kernel

__all__ = ["factor_update"]

TOLERANCE = {torch.float32: 1e-5}
#: the largest block a program holds whole (a few b x b fp32 tiles at once)
LIMITS = {"block": 64}


@tensor_cache
def _block_table(counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(2 N,) int32: per block its entry, then its index within the entry (fixed by the entries' sizes)."""
    return table([e for e, c in enumerate(counts) for _ in range(c)] + [j for c in counts for j in range(c)],
                 torch.int32, device)


def factor_update(blocks: torch.Tensor, entries: Entries, rmap: RotationMap, lean: bool, iterations: int,
                  adam: AdamHyper, verdict: torch.Tensor) -> Updated:
    """Kernel of ``geomopt.optim.factor_update.factor_update``."""
    n_blocks, b = blocks.shape[0], blocks.shape[-1]
    device = blocks.device
    if blocks.dtype != torch.float32 or not blocks.is_contiguous():
        raise ValueError(f"blocks must be a contiguous fp32 tensor, got {blocks.dtype}")
    if verdict.dtype != torch.float32 or verdict.dim() != 2 or verdict.shape[0] != 2 or verdict.stride(1) != 1:
        raise ValueError(f"verdict must be a (2, W) fp32 tensor with contiguous rows, got {verdict.dtype} "
                         f"{tuple(verdict.shape)}")
    if b > LIMITS["block"] and not INTERPRETED:
        raise ValueError(f"blocks of more than {LIMITS['block']} indices do not fit on chip (POET's step keeps them on "
                         "the references)")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    for q, st in zip(entries.qs, entries.states):
        for t in (q, st["exp_avg"], st["exp_avg_sq"]):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device != device:
                raise ValueError("generators and moments must be contiguous fp32 tensors on the blocks' device")
    counts = entry_counts(entries)
    if sum(counts) != n_blocks:
        raise ValueError(f"the entries hold {sum(counts)} blocks, blocks has {n_blocks}")
    nq, n_entries = b * (b - 1) // 2, len(counts)
    q_out = torch.empty(n_blocks, nq, dtype=torch.float32, device=device)
    m_out, v_out = torch.empty_like(q_out), torch.empty_like(q_out)
    steps = torch.stack([s["step"].to(device, torch.float32) for s in entries.states])
    new_steps = torch.empty_like(steps)
    blocks_tab = _block_table(tuple(counts), device)
    moments = [s[k] for k in ("exp_avg", "exp_avg_sq") for s in entries.states]
    tab = table([t.data_ptr() for t in [*entries.qs, *moments]] + [int(r) for r in entries.rows]
                + list(entries.owners), torch.int64, device)
    lrs = table(entries.lrs, torch.float32, device)
    B = pow2(b)
    touched = [blocks, *entries.qs, *moments, blocks_tab, tab, lrs, steps, q_out, m_out, v_out, new_steps, verdict]
    launch("factor_update", _factor_update_kernel, (n_blocks if b >= 2 else 0,), touched, blocks, blocks_tab, tab,
           lrs, steps, q_out, m_out, v_out, new_steps, verdict, verdict.stride(0), n_blocks, n_entries, b, nq,
           iterations, adam.beta1, adam.beta2, math.log2(adam.beta1) if adam.beta1 > 0 else -math.inf,
           math.log2(adam.beta2) if adam.beta2 > 0 else -math.inf, adam.eps, adam.weight_decay,
           math.sqrt(torch.finfo(torch.float32).eps), B=B, DEG=rmap.terms - 1 if rmap.form == "series" else
           rmap.terms + 1, SERIES=rmap.form == "series", LEAN=lean, DECOUPLED=adam.decoupled,
           PREC=precision(device, torch.float32), num_warps=warps(B))
    return Updated(q_out, m_out, v_out, new_steps)
