"""POET's step in stages: block gradients from G and W and their generator gradients (``generator_grads``), the
rotations of the updated generators (``rotation``, with the safeguard's bound: ``rotation_and_bound``,
``safeguard``), the rewrite of W (``rewrite``), the new state (``new_factors``). ``POETOptimizer._step_run`` runs
them in order and commits each weight.

The dense parts stay weight by weight: each weight's gathers and block products fit in cache, while stacking the
weights of one shape into a single matrix (to save calls) was measured 1x to 4x slower on the small preset's CPU (its
large strided gathers and scatters run out of cache). The small b x b work of all weights is batched instead,
in ``POETOptimizer._step_run``. The rewrite is prepared (its work tensors allocated) before the weight's commit and
runs inside it without allocating, so an exception never leaves the weight advanced without its state.
"""
from __future__ import annotations

import functools
from typing import Any, Hashable, NamedTuple

import torch

from ..geometry import rotation_inverse, skew_norm_bound
from ..geometry.blocks import rotation_buffers
from ..geometry.cayley import newton_schulz_inverse
from ..geometry.dispatch import call, can
from .batching import ByKey
from .sharded import all_reduce, like, reduce_over_meshes, shard_state, to_local

__all__ = ["Work", "rotation", "rotation_and_bound", "rotations", "delta", "apply_blocks", "block_grads", "rewrite",
           "generator_grads", "safeguard", "new_factors"]


class Work(NamedTuple):
    """One weight in a step: the weight, its local gradient (negated for ``maximize``), its state, its shard
    (FSDP2) or None, its row / column index blocks, its local generators (row blocks first), the local views of
    the row factors' inner state, and the factor dtype."""
    p: torch.Tensor
    g: torch.Tensor
    st: dict[str, Any]
    shard: Any
    rows: list[torch.Tensor]
    cols: list[torch.Tensor]
    qs: list[torch.Tensor]
    inner_row: list[dict[str, Any]]
    fdtype: torch.dtype

    def sides(self) -> list[tuple[str, torch.Tensor]]:
        return [("row", idx) for idx in self.rows] + [("col", idx) for idx in self.cols]


def rotation(q: torch.Tensor, b: int, terms: int | None) -> torch.Tensor:
    """The blocks of packed generators ``q``: exact Cayley (``terms`` None) or Cayley-Neumann."""
    return call("cayley_exact", q, b) if terms is None else call("cayley_neumann", q, b, terms)


def rotation_and_bound(q: torch.Tensor, b: int, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cayley-Neumann blocks of ``q`` and ``skew_norm_bound`` of each: from shared products where the map's
    implementation can (``"with_bound"``), else separately."""
    if can("cayley_neumann", q, "with_bound"):
        return call("cayley_neumann_with_bound", q, b, terms)
    return call("cayley_neumann", q, b, terms), skew_norm_bound(q, b)


def rotations(qs: list[torch.Tensor], idxs: list[torch.Tensor], terms: int | None) -> list[torch.Tensor]:
    return [rotation(q, idx.shape[1], terms) for q, idx in zip(qs, idxs)]


def _eye_like(d: torch.Tensor) -> torch.Tensor:
    return torch.eye(d.shape[-1], dtype=d.dtype, device=d.device).expand_as(d)


def delta(side: str, new: torch.Tensor, old: torch.Tensor, old_inv: torch.Tensor) -> torch.Tensor:
    """Lean mode's incremental rotation: D_new D_old^-1 on rows, E_old^-1 E_new on columns, as
    I + (new - old) old^-1 and I + old^-1 (new - old) (exactly I where a block did not move)."""
    step = (new - old) @ old_inv if side == "row" else old_inv @ (new - old)
    return _eye_like(old) + step


def apply_blocks(x: torch.Tensor, rows: list, ds: list, cols: list, es: list) -> torch.Tensor:
    """R X P for the row blocks ``rows`` (rotations ``ds``) and column blocks ``cols`` (``es``); out of place."""
    for idx, d in zip(rows, ds):
        x = call("rotate_rows", x, idx, d)
    for idx, e in zip(cols, es):
        x = call("rotate_cols", x, idx, e)
    return x


def block_grads(works: list[Work], batch: ByKey) -> dict[Hashable, torch.Tensor]:
    """Per key of ``batch``, the (n_blocks, b, b) products G[s_k] W[s_k]^T (row keys) and W[:, t_k]^T G[:, t_k]
    (column keys) of every weight, concatenated in the order of ``batch``'s entries (the works' blocks)."""
    raw = []
    for w in works:
        g = w.g.to(w.fdtype)
        wt = to_local(w.p).detach().to(w.fdtype)
        raw += [call("row_block_grad", g, wt, idx) for idx in w.rows]
        raw += [call("col_block_grad", wt, g, idx) for idx in w.cols]
    return batch.cat(raw)


def rewrite(w: Work, mats: list[torch.Tensor], store_base: bool, keep: bool):
    """The new weight, as (write, kept): ``write()`` puts it into the weight and allocates nothing (the step calls
    it inside the weight's commit); ``kept`` is the new weight in the factor dtype when ``keep`` (a merge follows:
    the new W0), else None. It is R W0 P (paper mode; ``mats`` the new rotations, row blocks first) or the
    incremental update of W (lean mode; ``mats`` the deltas).

    On the reference path, with the weight in the factor dtype, the rotations run in place on the weight with
    their work tensors allocated here (``rotation_buffers``): no copy of W is made. Otherwise (a kernel, or a
    bf16 weight with fp32 factors) the new weight is computed out of place and copied in."""
    target = to_local(w.p)
    nrow = len(w.rows)
    in_place = target.dtype == w.fdtype and can("rotate_rows", target, "in_place") and can("rotate_cols", target,
                                                                                          "in_place")
    if not in_place:
        base = to_local(w.st["w0"]) if store_base else target.detach().to(w.fdtype)
        new = apply_blocks(base, w.rows, mats[:nrow], w.cols, mats[nrow:])
        return functools.partial(target.copy_, new), (new if keep else None)
    x = target.detach()
    row_bufs = [rotation_buffers(x, idx, True) for idx in w.rows]
    col_bufs = [rotation_buffers(x, idx, False) for idx in w.cols]
    kept = torch.empty_like(x) if keep else None
    src = to_local(w.st["w0"]) if store_base else None
    covered = sum(idx.numel() for idx in w.rows) == x.shape[0]

    def write() -> None:
        first = src
        if src is not None and not covered:  # rows no block writes keep W0's values
            x.copy_(src)
            first = None
        for idx, d, buf in zip(w.rows, mats[:nrow], row_bufs):
            call("rotate_rows_", x, idx, d, first, buf)
        for idx, e, buf in zip(w.cols, mats[nrow:], col_bufs):
            call("rotate_cols_", x, idx, e, buf)
        if kept is not None:
            kept.copy_(x)

    return write, kept


def generator_grads(works: list[Work], batch: ByKey, terms: int | None, iterations: int | None = None):
    """Stages 1-2: block gradients from G and W, then through the map to the generators. Returns (old rotations,
    their inverses, per key of ``batch``; the generators' gradients, per entry of ``batch``; and, when the
    inverses ran a fixed number of Newton-Schulz ``iterations`` (no host read), a 0-d device bool: whether they
    converged; else None)."""
    qs = [q for w in works for q in w.qs]
    with torch.enable_grad():
        leaves = {k: t.detach().requires_grad_() for k, t in batch.cat(qs).items()}
        rots = {k: rotation(leaf, k[1], terms) for k, leaf in leaves.items()}
    old = {k: r.detach() for k, r in rots.items()}
    converged = None
    if iterations is None:
        inv = {k: rotation_inverse(r) for k, r in old.items()}
    else:
        pairs = {k: newton_schulz_inverse(r, iterations) for k, r in old.items()}
        inv = {k: x for k, (x, _) in pairs.items()}
        if pairs:
            flags = [ok for _, ok in pairs.values()]
            converged = torch.stack([f.to(flags[0].device) for f in flags]).all()
    # M = W0 P = R^-1 W and N = R W0 = W P^-1 hold in both modes, so the gradients are taken from
    # W itself (the lean formulas, with D^-T = D and E^-T = E for orthogonal blocks):
    # dL/dD_k = G[s_k] W[s_k]^T D_k^-T,  dL/dE_k = E_k^-T W[:, t_k]^T G[:, t_k]
    raw = block_grads(works, batch)
    outs = [raw[k] @ inv[k].transpose(1, 2) if k[0] == "row" else inv[k].transpose(1, 2) @ raw[k] for k in rots]
    del raw
    with torch.enable_grad():
        grads = batch.split(dict(zip(rots, torch.autograd.grad(list(rots.values()), list(leaves.values()),
                                                               grad_outputs=outs)))) if rots else []
    pos = 0
    for w in works:
        nrow, gq = len(w.rows), grads[pos: pos + len(w.qs)]
        if w.shard is not None and w.cols:  # a column block sums over every row: add the ranks' parts
            col = gq[nrow:]
            flat = all_reduce(torch.cat([c.reshape(-1) for c in col]), w.shard)
            grads[pos + nrow: pos + len(w.qs)] = [c.view_as(x) for c, x in zip(flat.split([x.numel() for x in col]),
                                                                              col)]
        pos += len(w.qs)
    return old, inv, grads, converged


def safeguard(limit: float, works: list[Work], batch: ByKey, block_bounds: dict,
              converged: torch.Tensor | None = None) -> tuple[list[float], bool]:
    """Per weight: the bound on the spectral norm of its updated generators (``block_bounds``: per key of
    ``batch``, one per block; the maximum over a sharded weight's ranks), which the safeguard compares with
    ``limit``; and ``converged`` (the inverses' device flag, or True), read in the same host sync."""
    if not block_bounds:
        return [0.0] * len(works), True if converged is None else bool(converged)
    first = next(iter(block_bounds.values()))
    dtype = functools.reduce(torch.promote_types, [v.dtype for v in block_bounds.values()])
    bounds = torch.zeros(len(works), dtype=dtype, device=first.device)
    owners = batch.owners([i for i, w in enumerate(works) for _ in w.qs], bounds.device)
    for k, v in block_bounds.items():
        bounds.scatter_reduce_(0, owners[k], v.to(bounds.device, dtype), "amax")
    sharded = [w.p if w.shard is not None else None for w in works]
    if any(x is not None for x in sharded):  # a weight's row blocks are spread over its ranks
        bounds = reduce_over_meshes(bounds, sharded, torch.distributed.ReduceOp.MAX)
    if converged is not None:
        bounds = torch.cat([bounds, converged.reshape(1).to(bounds)])
    read = bounds.tolist()
    return read[: len(works)], converged is None or read[-1] == 1.0


def new_factors(w: Work, qs: list[torch.Tensor], inner: list[dict[str, Any]]) -> dict[str, Any]:
    """A weight's new generators and inner states as state entries (row ones as DTensors when sharded)."""
    nrow = len(w.rows)
    rows, inner_rows = qs[:nrow], inner[:nrow]
    if w.shard is not None:
        rows = [like(q, w.shard) for q in rows]
        inner_rows = [shard_state(s, w.shard, q.shape) for s, q in zip(inner_rows, qs[:nrow])]
    return dict(q_row=rows, q_col=qs[nrow:], inner_row=inner_rows, inner_col=inner[nrow:])
