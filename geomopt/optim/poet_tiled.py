"""POET's step on the tile pipeline (the kernel path, ``geomopt.kernels``): a run of weights in three stages, each one
entry of the dispatch point, and one host read.

1. ``tile_grads``, per group of weights of one shape and block layout: both sides' block gradients into one flat
   buffer of the run, the finite flags of the gradients and the row checksums of the weights, from one read of G and
   W, reached in place through their permutations;
2. ``factor_update``, per block size: all the b x b work (the old map, its inverse, the map's backward, the inner
   Adam, the new map, the safeguard's bound, lean mode's incremental rotation), in place on that buffer;
3. one host read: per weight whether its gradient is finite, whether it is as the optimizer last wrote it (its row
   checksums against the record), the bound on its generators and whether its inverses converged;
4. ``tile_rewrite``, per group, inside the commit of the group's weights with their new state.

The plan leaves the finite and edit checks of these weights to stage 1 (``_checks_in_step``): a weight with a
non-finite gradient is skipped, one changed from outside is re-based and the run computed again. Where an inverse
did not converge (a state from a run with a larger bound), or no bound fixes the iterations, the run goes on on the
staged reference pipeline (``POETOptimizer._step_run``), iterating to convergence. A weight takes this pipeline where
the dispatch point says ``tile_grads`` prefers it (``"tiled"``: its kernel, on a CUDA tensor, kernels enabled) and
the other stages' kernels take its blocks (``limit``).
"""
from __future__ import annotations

from typing import Any, Hashable, NamedTuple

import torch

from ..geometry.cayley import rotation_inverse
from ..geometry.dispatch import can, kernel_for, limit
from ..geometry.tiles import TileLayout, checksum_probe, tile_layout
from . import poet_settings as settings
from .batching import ByKey
from .factor_update import AdamHyper, Entries, Updated
from .host_read import to_host
from .inner import AdamRule
from .poet_step import Work, exact_for_flagged, group_key, inverse_iterations, make_groups, per_size, rotation
from .routing import is_factorized
from .sharded import is_dtensor, to_local

__all__ = ["RunLayout", "run_layout", "TiledStep"]


class RunLayout(NamedTuple):
    """Where a run's blocks live in its flat buffer: ``batch`` (one entry per generator tensor, keyed (side, b, factor
    dtype, device)); per size key (b, dtype, device) its region (element offset, blocks, keys in order); per group of
    one shape its ``TileLayout``; the buffer's size; and the index tensors it was built from (its identity)."""
    batch: ByKey
    regions: dict[Hashable, tuple[int, int, list]]
    layouts: list[TileLayout]
    total: int
    built_from: tuple


def run_layout(groups: list[list[Work]]) -> RunLayout:
    works = [w for gr in groups for w in gr]
    device = to_local(works[0].p).device
    batch = ByKey([(side, idx.shape[1], w.fdtype, device) for w in works for side, idx in w.sides()],
                  [idx.shape[0] for w in works for _, idx in w.sides()])
    by_size: dict[Hashable, list] = {}
    for k in batch.groups:
        by_size.setdefault(k[1:], []).append(k)
    regions, first, total = {}, {}, 0
    for size, keys in by_size.items():
        blocks = 0
        for k in keys:
            first[k] = blocks
            blocks += sum(batch.counts[e] for e in batch.groups[k])
        regions[size] = (total, blocks, keys)
        total += blocks * size[0] ** 2
    starts = batch.starts()
    offsets = [regions[k[1:]][0] + (first[k] + starts[e]) * k[1] ** 2 for e, k in enumerate(batch.keys)]
    layouts, e = [], 0
    for gr in groups:
        at = []
        for w in gr:
            at.append((offsets[e: e + len(w.rows)], offsets[e + len(w.rows): e + len(w.qs)]))
            e += len(w.qs)
        layouts.append(tile_layout([w.rows for w in gr], [w.cols for w in gr], tuple(to_local(gr[0].p).shape),
                                   [a for a, _ in at], [c for _, c in at]))
    return RunLayout(batch, regions, layouts, total, tuple(i for w in works for i in w.rows + w.cols))


def _key_views(lay: RunLayout, mats: torch.Tensor) -> dict[Hashable, torch.Tensor]:
    """Per key of ``lay.batch``, its matrices in the flat buffer (views)."""
    out = {}
    for (b, *_), (off, _, keys) in lay.regions.items():
        for k in keys:
            count = sum(lay.batch.counts[e] for e in lay.batch.groups[k])
            out[k] = mats[off: off + count * b * b].view(count, b, b)
            off += count * b * b
    return out


class _Read(NamedTuple):
    """Stage 3's verdicts, per weight of the run (nonzero: found)."""
    nonfinite: list[float]
    changed: list[float]
    bounds: list[float]
    unconverged: list[float]


class TiledStep:
    """The tile pipeline of ``POETOptimizer`` (mixed in): which weights take it, the checks it makes, its runs."""

    def _tiled(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether weight ``p`` of ``group`` steps on the tile pipeline."""
        rule = self._inner
        if group["capturable"] or not isinstance(rule, AdamRule) or rule.amsgrad or is_dtensor(p):
            return False
        if settings.rotation_map(group) is None or group["max_q_norm"] is None:
            return False
        g = p.grad
        if p.dim() != 2 or p.stride(1) != 1 or g is None or g.dtype != p.dtype or g.stride(1) != 1:
            return False
        if not can("tile_grads", p, "tiled"):
            return False
        biggest = max(b for dim in p.shape for _, b in settings.sizes(dim, group) or [(0, 0)])
        limits = [limit(name, p, "block") for name in ("tile_rewrite", "factor_update")]
        return all(cap is None or biggest <= cap for cap in limits)

    def _checks_in_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> frozenset:
        """The tiled weights with factor state, whose gradients and checksums stage 1 reads anyway (their fingerprint
        record, if any, holds checksums): with ``nonfinite="skip"`` and ``external_edits="rebase"`` (raising needs
        every check before any weight changes)."""
        if self.nonfinite != "skip" or self.external_edits != "rebase":
            return frozenset()
        return frozenset(id(p) for p in params if is_factorized(p, group) and self._is_factor_state(
            self.state.get(p, {})) and self._edits.checksummed(p) is not False and self._tiled(group, p))

    def _tiled_layout(self, groups: list[list[Work]]) -> RunLayout:
        """``run_layout``, kept while the run's index blocks are the same tensors (they change at merges)."""
        blocks = tuple(i for gr in groups for w in gr for i in w.rows + w.cols)
        key = (tuple(id(b) for b in blocks), tuple(len(gr) for gr in groups))
        hit = self._tile_cache.get(key)
        if hit is None or any(a is not b for a, b in zip(hit.built_from, blocks)):
            hit = run_layout(groups)
        self._tile_seen[key] = hit
        return hit

    def _tiled_run(self, group: dict[str, Any], works: list[Work], lr: float) -> None:
        """One run of tiled weights (consecutive by ``group_key``): the stages of the module docstring."""
        groups: list[list[Work]] = []
        for w in works:
            if groups and group_key(w) == group_key(groups[-1][0]):
                groups[-1].append(w)
            else:
                groups.append([w])
        lay = self._tiled_layout(groups)
        device = to_local(works[0].p).device
        mats = torch.empty(lay.total, dtype=works[0].fdtype, device=device)
        verdict = torch.zeros(4, len(works), dtype=torch.float32, device=device)
        sums, probes = self._tile_grads(group, groups, lay, mats, verdict)
        bound = max(w.st.get("q_bound", group["max_q_norm"]) for w in works)
        iterations = inverse_iterations(group, works[0].fdtype, bound)
        upd = self._factor_updates(group, works, lay, mats, lr, iterations, verdict) if iterations else {}
        # stage 3: the one host read
        read = _Read(*[[x for x in row] for row in to_host(verdict, [[0.0] * len(works)] * 4)])
        checked = [id(w.p) in self._step_checks for w in works]
        skip = [c and f != 0 for c, f in zip(checked, read.nonfinite)]
        if any(skip):
            group["nonfinite_skips"] = group.get("nonfinite_skips", 0) + sum(skip)
        edited = [c and e != 0 and not k for c, e, k in zip(checked, read.changed, skip)]
        kept = [w for w, k in zip(works, skip) if not k]
        if any(edited):
            self._rebase_edited(group, groups, edited, sums)
            kept = [self._work(w.p, w.g, group) for w in kept]
            return self._tiled_run(group, kept, lr) if kept else None
        if not kept:
            return None
        if not upd or any(n != 0 for n, k in zip(read.unconverged, skip) if not k):
            singles = make_groups([(w, None) for w in kept], {}, {})
            return self._step_run(group, singles, lr, adaptive=True)
        self._tiled_commit(group, groups, lay, mats, upd, read, skip, probes)

    def _tile_grads(self, group: dict[str, Any], groups: list[list[Work]], lay: RunLayout, mats: torch.Tensor,
                    verdict: torch.Tensor) -> tuple[list, list]:
        """Stage 1 per group, its finite flags and changes into ``verdict``'s rows 0 and 1: (per group the row
        checksums of its weights or None, and their probe or None)."""
        sums, probes, at = [], [], 0
        wanted = self._overwrites(group)
        for gr, tiles in zip(groups, lay.layouts):
            ws = [to_local(w.p) for w in gr]
            probe = checksum_probe(tiles.shape[1], ws[0].dtype, ws[0].device) if wanted else None
            expected = self._edits.expected([w.p for w in gr]) if wanted else None
            sums.append(kernel_for("tile_grads", ws[0])([w.g for w in gr], ws, tiles, mats,
                                                        verdict[0:2, at: at + len(gr)], probe, expected))
            probes.append(probe)
            at += len(gr)
        return sums, probes

    def _factor_updates(self, group: dict[str, Any], works: list[Work], lay: RunLayout, mats: torch.Tensor,
                        lr: float, iterations: int, verdict: torch.Tensor) -> dict[Hashable, Updated]:
        """Stage 2 per block size: ``factor_update`` on the size's region of the buffer, the bounds and convergence
        per weight into ``verdict``'s rows 2 and 3."""
        qs = [q for w in works for q in w.qs]
        inner = [s for w in works for s in w.inner_row + w.st["inner_col"]]
        inner = [s if s else self._inner.fresh(q) for s, q in zip(inner, qs)]
        owner = [i for i, w in enumerate(works) for _ in w.qs]
        scales = settings.lr_scales(group, works)
        rule = self._inner
        adam = AdamHyper(rule.betas[0], rule.betas[1], rule.eps, rule.weight_decay, rule.decoupled)
        rmap, lean = settings.rotation_map(group), not group["store_base"]
        out = {}
        for size, (off, blocks, keys) in lay.regions.items():
            b = size[0]
            at = [e for k in keys for e in lay.batch.groups[k]]
            entries = Entries([qs[e] for e in at], [inner[e] for e in at], [lr * scales[e] for e in at],
                              [lay.batch.keys[e][0] == "row" for e in at], [owner[e] for e in at])
            view = mats[off: off + blocks * b * b].view(blocks, b, b)
            out[size] = kernel_for("factor_update", view)(view, entries, rmap, lean, iterations, adam, verdict[2:4])
        return out

    def _rebase_edited(self, group: dict[str, Any], groups: list[list[Work]], edited: list[bool], sums: list) -> None:
        """Weights changed from outside (stage 3): re-based as the plan would have (``_rebase``), their checksums as
        they are now their record (they were read from the weights as they are)."""
        at = 0
        for gr, s in zip(groups, sums):
            for i, w in enumerate(gr):
                if edited[at + i]:
                    self._rebase(w.p, group, w.st)
                    w.st["built_with"] = self._settings(group)
                    w.st["rebases"] = w.st.get("rebases", 0) + 1
                    self._edits.record_checksums([w.p], s[i: i + 1])
            at += len(gr)

    def _tiled_commit(self, group: dict[str, Any], groups: list[list[Work]], lay: RunLayout, mats: torch.Tensor,
                      upd: dict[Hashable, Updated], read: _Read, skip: list[bool], probes: list) -> None:
        """Stage 4: the new generators and states per weight, the safeguard's and scheduled exact rotations, then per
        group the rewrite and the state, committed together, and the checksums of what was written."""
        works = [w for gr in groups for w in gr]
        new_qs, new_inner = self._new_entries(lay, upd)
        limit_q = group["max_q_norm"]
        flags = [not k and bd > limit_q for bd, k in zip(read.bounds, skip)]
        due = [not k and group["exact_merge"] and w.st["since_merge"] + 1 >= group["merge_every"]
               for w, k in zip(works, skip)]
        exact = [f or d for f, d in zip(flags, due)]
        if any(exact):
            per = lay.batch.split(_key_views(lay, mats))
            old = inv = None
            if not group["store_base"]:
                rmap = settings.rotation_map(group)
                old = per_size(lambda q, b: rotation(q, b, rmap), lay.batch.cat([q for w in works for q in w.qs]))
                inv = per_size(lambda d, b: rotation_inverse(d), old)
            exact_for_flagged(group["store_base"], works, exact, lay.batch, per, new_qs, old, inv)
        pos, wi = 0, 0
        for gr, tiles, probe in zip(groups, lay.layouts, probes):
            ups, merges = [], []
            for w in gr:
                qs, inner = new_qs[pos: pos + len(w.qs)], new_inner[pos: pos + len(w.qs)]
                pos += len(w.qs)
                if not skip[wi]:
                    up, merge = self._update_of(group, w, qs, inner, flags[wi], read.bounds[wi])
                    ups.append(up)
                    merges.append((w, merge, flags[wi]))
                wi += 1
            take = [not skip[wi - len(gr) + i] for i in range(len(gr))]
            self._commit_tiles(group, gr, tiles, mats, take, ups, merges, probe)

    def _commit_tiles(self, group: dict[str, Any], gr: list[Work], tiles: TileLayout, mats: torch.Tensor,
                      take: list[bool], ups: list[dict], merges: list, probe: torch.Tensor | None) -> None:
        """One group's rewrite (prepared now, written in the commit) and state, committed together."""
        xs = [to_local(w.p) for w in gr]
        paper = group["store_base"]
        srcs = [to_local(w.st["w0"]) for w in gr] if paper else xs
        comps = [w.st["comp"] for w in gr] if not paper and all("comp" in w.st for w in gr) else None
        merging = {id(w.p): m for w, m, _ in merges}
        keeps = [torch.empty_like(x, dtype=w.fdtype) if paper and merging.get(id(w.p)) else None
                 for w, x in zip(gr, xs)]
        write, sums = kernel_for("tile_rewrite", xs[0])(xs, srcs, comps, keeps, tiles, mats, take, probe)
        ps = [w.p for w, t in zip(gr, take) if t]
        kept = {id(w.p): k for w, k in zip(gr, keeps)}
        for (w, merge, early), up in zip(merges, ups):
            if merge:
                up.update(self._merged(w.p, {**w.st, **up}, group, kept[id(w.p)], early))
        self._commit_many(ps, write, ups)
        if sums is not None and ps:
            rows = [i for i, t in enumerate(take) if t]
            self._edits.record_checksums(ps, sums[rows] if len(rows) < len(take) else sums)

    @staticmethod
    def _new_entries(lay: RunLayout, upd: dict[Hashable, Updated]) -> tuple[list, list]:
        """Per entry of ``lay.batch``: its new generators and inner state (views of stage 2's outputs)."""
        count = len(lay.batch.keys)
        qs: list[Any] = [None] * count
        inner: list[Any] = [None] * count
        for size, (_, _, keys) in lay.regions.items():
            u, start, j = upd[size], 0, 0
            for k in keys:
                for e in lay.batch.groups[k]:
                    part = slice(start, start + lay.batch.counts[e])
                    qs[e] = u.q[part]
                    inner[e] = dict(step=u.steps[j], exp_avg=u.exp_avg[part], exp_avg_sq=u.exp_avg_sq[part])
                    start += lay.batch.counts[e]
                    j += 1
        return qs, inner
