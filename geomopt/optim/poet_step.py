"""POET's step in stages: block gradients from G and W and their generator gradients (``generator_grads``), the
rotations of the updated generators (``rotation``, with the safeguard's bound: ``rotation_and_bound``,
``safeguard``), the rewrite of W (``rewrite``), the new state (``new_factors``). ``POETOptimizer._step_run`` runs
them in order and commits each group.

The dense parts run per ``Group``: the weights of one shape, dtype and block layout. On the multi-tensor path
(``foreach`` or ``fused`` set, the default on a GPU) a group holds every such weight of the run: their gradients
and weights are stacked into one (L, m, n) tensor, the block products and rotations are one call per key for
all of them, and one multi-tensor copy writes the new weights, so the number of calls does not grow with the
number of layers. Elsewhere (the default on a CPU) each weight is a group of its own: its gathers and block
products fit in cache, and the stacking's extra copies were measured slower there (BENCHMARKS.md). The small b x b
work of all weights is batched either way, in ``POETOptimizer._step_run``. The rewrite is prepared (its work
tensors allocated) before the group's commit and runs inside it without allocating, so an exception never leaves
a weight advanced without its state.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, NamedTuple

import torch

from ..geometry import rotation_inverse, skew_norm_bound
from ..geometry.blocks import rotation_buffers, stacked_rows
from ..geometry.cayley import newton_schulz_inverse, newton_schulz_iterations
from ..geometry.dispatch import call, can
from .batching import ByKey, dense_stack
from .host_read import to_host
from .poet_settings import RotationMap, rotation_map
from .rounding import add_dropped_, split_rounding, write_compensated
from .sharded import all_reduce, like, reduce_over_meshes, shard_state, to_local

__all__ = ["Work", "Group", "group_key", "make_groups", "rotation", "rotation_and_bound", "rotations",
           "per_size", "delta", "apply_blocks", "block_grads", "rewrite", "generator_grads", "safeguard", "new_factors",
           "group_mats", "exact_for_flagged", "inverse_iterations", "entry_owners", "weight_bounds",
           "host_rotations"]


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


def rotation(q: torch.Tensor, b: int, rmap: RotationMap | None) -> torch.Tensor:
    """The blocks of packed generators ``q``: exact Cayley (``rmap`` None) or ``rmap``'s Cayley-Neumann polynomial."""
    if rmap is None:
        return call("cayley_exact", q, b)
    return call(rmap.name, q, b, rmap.terms)


def rotation_and_bound(q: torch.Tensor, b: int, rmap: RotationMap) -> tuple[torch.Tensor, torch.Tensor]:
    """Cayley-Neumann blocks of ``q`` and ``skew_norm_bound`` of each: from shared products where the map's
    implementation can (``"with_bound"``), else separately."""
    if rmap.form == "paper" and can("cayley_neumann", q, "with_bound"):
        return call("cayley_neumann_with_bound", q, b, rmap.terms)
    return rotation(q, b, rmap), skew_norm_bound(q, b)


def per_size(fn: Callable, xs: dict[Hashable, torch.Tensor]) -> dict[Hashable, Any]:
    """``fn(x, b)`` once per block size, dtype and device, on the tensors of the keys (side, b, dtype, device) that
    share them concatenated (the map, its inverses and bounds do not depend on the side), the results split back
    per key as views, in the keys' order. ``fn`` returns a tensor or a tuple of tensors with the leading block
    dimension; a 0-d result (a convergence flag) goes to every key."""
    by_size: dict[Hashable, list] = {}
    for k in xs:
        by_size.setdefault(k[1:], []).append(k)
    out: dict[Hashable, Any] = {}
    for size, ks in by_size.items():
        if len(ks) == 1:
            out[ks[0]] = fn(xs[ks[0]], size[0])
            continue
        res = fn(torch.cat([xs[k] for k in ks]), size[0])
        counts = [xs[k].shape[0] for k in ks]
        parts = [r.split(counts) if r.dim() else [r] * len(ks) for r in (res if isinstance(res, tuple) else (res,))]
        for i, k in enumerate(ks):
            out[k] = tuple(p[i] for p in parts) if isinstance(res, tuple) else parts[0][i]
    return {k: out[k] for k in xs}  # in the keys' order


def rotations(qs: list[torch.Tensor], idxs: list[torch.Tensor], rmap: RotationMap | None) -> list[torch.Tensor]:
    return [rotation(q, idx.shape[1], rmap) for q, idx in zip(qs, idxs)]


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


class Group(NamedTuple):
    """Weights of one key (``group_key``: local shape, dtype, factor dtype, device, block layout) stepped together:
    their works, consecutive in the step's order, and per row key the (L * n_blocks, b) indices into the stacked
    (L * m, n) view (``blocks.stacked_rows``), per column key the (L, n_blocks, b) blocks. A group of one weight
    keeps the weight's own index blocks and runs the per-weight calls."""
    works: list[Work]
    rows: list[torch.Tensor]
    cols: list[torch.Tensor]


def group_key(w: Work) -> tuple:
    t = to_local(w.p)
    return (tuple(t.shape), t.dtype, w.fdtype, t.device, tuple(i.shape for i in w.rows),
            tuple(i.shape for i in w.cols), w.shard is None)


def make_groups(works: list[tuple[Work, Any]], cache: dict, seen: dict) -> list[Group]:
    """``works`` as (work, its ``group_key``, or None for a weight stepped alone) in groups: runs of one key. The
    stacked indices are taken from ``cache`` where the weights' index blocks are the same tensors (they change
    at merges), and every group's are put into ``seen`` (the next step's cache)."""
    runs: list[list[Work]] = []
    last = None
    for w, key in works:
        if key is not None and runs and key == last:
            runs[-1].append(w)
        else:
            runs.append([w])
        last = key
    out = []
    for run in runs:
        if len(run) == 1:
            out.append(Group(run, run[0].rows, run[0].cols))
            continue
        blocks = tuple(idx for w in run for idx in w.rows + w.cols)
        key = tuple(id(b) for b in blocks)
        hit = cache.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], blocks)):
            m = to_local(run[0].p).shape[0]
            rows = [stacked_rows(torch.stack([w.rows[j] for w in run]), m) for j in range(len(run[0].rows))]
            cols = [torch.stack([w.cols[j] for w in run]) for j in range(len(run[0].cols))]
            hit = (blocks, rows, cols)
        seen[key] = hit
        out.append(Group(run, hit[1], hit[2]))
    return out


def block_grads(groups: list[Group], keep_weights: bool) -> tuple[dict[Hashable, torch.Tensor], list]:
    """Per key (side, b, factor dtype, device), the (n_blocks, b, b) products G[s_k] W[s_k]^T (rows) and
    W[:, t_k]^T G[:, t_k] (columns) of every weight, in the step's order of the weights: one call per group and
    key. Also, per group, its weights stacked in the factor dtype (``keep_weights``: lean mode rotates them)."""
    raw: dict[Hashable, list[torch.Tensor]] = {}
    bases = []
    for gr in groups:
        fdtype = gr.works[0].fdtype
        g = dense_stack([w.g for w in gr.works], fdtype)
        wt = dense_stack([to_local(w.p) for w in gr.works], fdtype)  # the step runs under no_grad
        lead, m, n = wt.shape
        for idx in gr.rows:
            out = call("row_block_grad", g.reshape(lead * m, n), wt.reshape(lead * m, n), idx)
            raw.setdefault(("row", idx.shape[-1], fdtype, wt.device), []).append(out)
        for idx in gr.cols:
            out = call("col_block_grad", wt[0], g[0], idx) if lead == 1 else call("col_block_grads", wt, g, idx)
            raw.setdefault(("col", idx.shape[-1], fdtype, wt.device), []).append(out)
        bases.append(wt if keep_weights else None)
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in raw.items()}, bases


def _in_place(w: Work) -> bool:
    target = to_local(w.p)
    return target.dtype == w.fdtype and can("rotate_rows", target, "in_place") and can("rotate_cols", target,
                                                                                      "in_place")


def rewrite(gr: Group, rows: list[torch.Tensor], cols: list[torch.Tensor], store_base: bool, keep: list[bool],
            base: torch.Tensor | None = None, take: torch.Tensor | None = None):
    """The group's new weights, as (write, kept, stacked): ``write()`` puts them into the weights and allocates nothing
    (the step calls it inside the group's commit); ``kept[i]`` is weight i's new value in the factor dtype where
    ``keep[i]`` (a merge follows: the new W0), else None; ``stacked`` the new weights as one (L, m, n) tensor in the
    factor dtype where they were computed so, else None. It is R W0 P (paper mode; ``rows`` / ``cols`` the new
    rotations per key, in the group's stacked order) or the incremental update of W (lean mode; the deltas).

    One weight on the reference path with the weight in the factor dtype: the rotations run in place on the
    weight, their work tensors allocated here (``rotation_buffers``), no copy of W made. Otherwise (several
    weights, a kernel, a bf16 weight with fp32 factors) the new weights are computed on a stacked copy of the
    bases (``base``: lean mode's stacked weights from ``block_grads``) and copied in by one multi-tensor copy.
    ``take`` (paper mode's capturable step, with ``base`` the stacked weights as they are): per weight, whether it
    takes its new value or keeps its own, chosen on the device."""
    w = gr.works[0]
    current = base if take is not None else None
    if len(gr.works) == 1 and _in_place(w) and take is None:
        write, kept = _rewrite_in_place(w, rows + cols, store_base, keep[0])
        return write, [kept], None
    targets = [to_local(x.p) for x in gr.works]
    if store_base or base is None or len(gr.works) == 1 or take is not None:
        src = [to_local(x.st["w0"]) for x in gr.works] if store_base else targets
        base = dense_stack(src, w.fdtype, private=True)
    comps = None if store_base or "comp" not in w.st else [to_local(x.st["comp"]) for x in gr.works]
    if comps is not None:  # lean mode rotates the weight as it is plus what its last rounding dropped
        add_dropped_(base, comps[0].unsqueeze(0) if len(comps) == 1 else torch.stack(comps), targets[0].dtype)
    lead, m, n = base.shape
    flat = base.view(lead * m, n)
    in_place = can("rotate_rows", flat, "in_place")
    for idx, d in zip(gr.rows, rows):
        flat = call("rotate_rows_", flat, idx, d) if in_place else call("rotate_rows", flat, idx, d)
    x = flat.view(lead, m, n)
    for idx, e in zip(gr.cols, cols):
        if lead > 1:
            x = call("rotate_cols_stacked_", x, idx, e)
        elif can("rotate_cols", x, "in_place"):
            call("rotate_cols_", x[0], idx, e)
        else:
            x = call("rotate_cols", x[0], idx, e).unsqueeze(0)
    if take is not None:
        x = torch.where(take.view(-1, 1, 1), x, current)
    news = list(x.unbind(0))
    kept = [(new if lead == 1 else new.clone()) if k else None for new, k in zip(news, keep)]
    if comps is not None:
        low, dropped = split_rounding(x, targets[0].dtype)
        return functools.partial(write_compensated, targets, list(low.unbind(0)), comps,
                                 list(dropped.unbind(0))), kept, x
    return functools.partial(torch._foreach_copy_, targets, news), kept, x


def _rewrite_in_place(w: Work, mats: list[torch.Tensor], store_base: bool, keep: bool):
    """One weight's rewrite in place on the weight (see ``rewrite``): (write, kept)."""
    nrow = len(w.rows)
    x = to_local(w.p).detach()
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


def generator_grads(groups: list[Group], batch: ByKey, rmap: RotationMap | None, iterations: int | None = None,
                    keep_weights: bool = False):
    """Stages 1-2: block gradients from G and W, then through the map to the generators. Returns (old rotations,
    their inverses, per key of ``batch``; the generators' gradients, per entry of ``batch``; when the inverses
    ran a fixed number of Newton-Schulz ``iterations`` (no host read), a 0-d device bool: whether they converged,
    else None; per group, its stacked weights when ``keep_weights``, else None)."""
    works = [w for gr in groups for w in gr.works]
    qs = [q for w in works for q in w.qs]
    with torch.enable_grad():
        leaves = {k: t.detach().requires_grad_() for k, t in batch.cat(qs).items()}
        rots = per_size(lambda x, b: rotation(x, b, rmap), leaves)
    old = {k: r.detach() for k, r in rots.items()}
    converged = None
    if iterations is None:
        inv = per_size(lambda x, b: rotation_inverse(x), old)
    else:
        pairs = per_size(lambda x, b: newton_schulz_inverse(x, iterations), old)
        inv = {k: x for k, (x, _) in pairs.items()}
        if pairs:
            flags = [ok for _, ok in pairs.values()]
            converged = torch.stack([f.to(flags[0].device) for f in flags]).all()
    # M = W0 P = R^-1 W and N = R W0 = W P^-1 hold in both modes, so the gradients are taken from
    # W itself (the lean formulas, with D^-T = D and E^-T = E for orthogonal blocks):
    # dL/dD_k = G[s_k] W[s_k]^T D_k^-T,  dL/dE_k = E_k^-T W[:, t_k]^T G[:, t_k]
    raw, bases = block_grads(groups, keep_weights)
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
    return old, inv, grads, converged, bases


def entry_owners(works: list[Work], batch: ByKey, device: torch.device) -> dict[Hashable, torch.Tensor]:
    """Per key of ``batch``, the position in ``works`` of the weight each block belongs to."""
    return batch.owners([i for i, w in enumerate(works) for _ in w.qs], device)


def weight_bounds(works: list[Work], batch: ByKey, block_bounds: dict) -> torch.Tensor:
    """(len(works),) on the device: per weight the largest of its blocks' bounds (``block_bounds``, per key of
    ``batch``; the maximum over a sharded weight's ranks)."""
    first = next(iter(block_bounds.values()))
    dtype = functools.reduce(torch.promote_types, [v.dtype for v in block_bounds.values()])
    bounds = torch.zeros(len(works), dtype=dtype, device=first.device)
    owners = entry_owners(works, batch, bounds.device)
    for k, v in block_bounds.items():
        bounds.scatter_reduce_(0, owners[k], v.to(bounds.device, dtype), "amax")
    sharded = [w.p if w.shard is not None else None for w in works]
    if any(x is not None for x in sharded):  # a weight's row blocks are spread over its ranks
        bounds = reduce_over_meshes(bounds, sharded, torch.distributed.ReduceOp.MAX)
    return bounds


def safeguard(limit: float, works: list[Work], batch: ByKey, block_bounds: dict,
              converged: torch.Tensor | None = None) -> tuple[list[float], bool]:
    """Per weight: the bound on the spectral norm of its updated generators (``block_bounds``: per key of
    ``batch``, one per block; the maximum over a sharded weight's ranks), which the safeguard compares with
    ``limit``; and ``converged`` (the inverses' device flag, or True), read in the same host sync."""
    if not block_bounds:
        return [0.0] * len(works), True if converged is None else bool(converged)
    bounds = weight_bounds(works, batch, block_bounds)
    if converged is not None:
        bounds = torch.cat([bounds, converged.reshape(1).to(bounds)])
    read = to_host(bounds, [0.0] * len(works) + [1.0] * (converged is not None))
    return read[: len(works)], converged is None or read[-1] == 1.0


def host_rotations(limit: float | None, works: list[Work], batch: ByKey, new_q: dict, rmap: RotationMap | None,
                   converged: torch.Tensor | None):
    """Stage 4 on the host: (the new rotations per key of ``batch``, per weight whether the safeguard fires, per
    weight its bound), the flags and bounds read in one host sync; None if the inverses did not converge."""
    if limit is None or rmap is None:
        return per_size(lambda q, b: rotation(q, b, rmap), new_q), [False] * len(works), None
    pairs = per_size(lambda q, b: rotation_and_bound(q, b, rmap), new_q)
    bounds, inverted = safeguard(limit, works, batch, {k: bd for k, (_, bd) in pairs.items()}, converged)
    if not inverted:
        return None
    return {k: r for k, (r, _) in pairs.items()}, [bd > limit for bd in bounds], bounds


def new_factors(w: Work, qs: list[torch.Tensor], inner: list[dict[str, Any]]) -> dict[str, Any]:
    """A weight's new generators and inner states as state entries (row ones as DTensors when sharded)."""
    nrow = len(w.rows)
    rows, inner_rows = qs[:nrow], inner[:nrow]
    if w.shard is not None:
        rows = [like(q, w.shard) for q in rows]
        inner_rows = [shard_state(s, w.shard, q.shape) for s, q in zip(inner_rows, qs[:nrow])]
    return dict(q_row=rows, q_col=qs[nrow:], inner_row=inner_rows, inner_col=inner[nrow:])


def group_mats(gr: Group, batch: ByKey, mats: dict, per: list, starts: list[int], first: int) -> list:
    """Per key of the group (row keys first), its weights' rotations: the weight's own entry for a group of
    one, else the rows of the key's batch that the group's consecutive entries span (a view)."""
    if len(gr.works) == 1:
        return per[first: first + len(gr.works[0].qs)]
    out = []
    for j, idx in enumerate(gr.rows + gr.cols):
        e = first + j
        out.append(mats[batch.keys[e]][starts[e]: starts[e] + idx.numel() // idx.shape[-1]])
    return out


def exact_for_flagged(store_base: bool, works: list[Work], flags: list[bool], batch: ByKey,
                      per: list, new_qs: list, old: dict, inv: dict) -> None:
    """A flagged weight's new rotations (or deltas) become those of the exact Cayley map, written into ``per`` (per
    entry, views of the batched matrices; a merge follows): the safeguard's weights, and with ``exact_merge`` the
    weights of a scheduled merge. The exact map runs once per key on the flagged weights' blocks."""
    owner = [i for i, w in enumerate(works) for _ in w.qs]
    at = [e for e, i in enumerate(owner) if flags[i]]
    sub = ByKey([batch.keys[e] for e in at], [batch.counts[e] for e in at])
    exact = sub.split(per_size(lambda q, b: rotation(q, b, None), sub.cat([new_qs[e] for e in at])))
    olds, invs = (None, None) if store_base else (batch.split(old), batch.split(inv))
    for e, r in zip(at, exact):
        per[e].copy_(r if store_base else delta(batch.keys[e][0], r, olds[e], invs[e]))


def inverse_iterations(group: dict[str, Any], dtype: torch.dtype, c: float) -> int | None:
    """Newton-Schulz iterations for the old blocks' inverses, from the bound on their orthogonality error:
    exact Cayley blocks are orthogonal to rounding; a Cayley-Neumann block of a generator with ||Q||_2 <= c
    (the bound the safeguard read last step, or max_q_norm) has ||I - D D^T|| <= ``RotationMap.residual(c)``.
    None: no bound (``max_q_norm=None``)."""
    rmap = rotation_map(group)
    if rmap is None:
        return newton_schulz_iterations(1e3 * torch.finfo(dtype).eps, dtype)
    if group["max_q_norm"] is None:
        return None
    return newton_schulz_iterations(rmap.residual(c), dtype)
