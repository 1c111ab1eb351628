"""POET's per-weight state: where the row blocks live (row shards, FSDP2), the permutations, the skew factors
and their inner state, W0, the declared layout, and the merge-then-reinitialize that renews them (also before a
growth). Mixed into ``POETOptimizer``, whose step (``poet.py``) reads and commits this state."""
from __future__ import annotations

import weakref
from typing import Any

import torch

from ..geometry import skew_size
from . import poet_settings as settings
from . import state as layout
from .guard import deferred_interrupt
from .inner import AdamRule
from .poet_settings import SIDES, compensates
from .poet_step import apply_blocks, rotations
from .rounding import CODE_DTYPE
from .sharded import like, row_shard, to_local
from .state import factor_dtype

__all__ = ["POETState"]


class POETState:
    """The state half of ``POETOptimizer``."""

    # ------------------------------------------------------------------ where the row blocks live
    def _chunks(self, p: torch.Tensor, group: dict[str, Any]) -> int:
        """Parts the row permutation of ``p`` keeps to: ``row_shards`` (under FSDP2 by default the mesh size,
        so that row blocks never cross a shard), or 1 where that does not divide the rows or in "fs" mode."""
        if group["mode"] == "fs":
            return 1
        k = group["row_shards"]
        if k is None:
            shard = row_shard(p)
            k = shard.world if shard is not None else 1
        return k if p.shape[0] % k == 0 else 1

    def _steps_shard(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """A row-sharded weight whose row permutation keeps to its shard steps locally: row blocks, their
        factors and W0's rows are local; the replicated column factors get all-reduced gradients."""
        shard = row_shard(p)
        return shard is not None and self._chunks(p, group) == shard.world

    def _blocks(self, p: torch.Tensor, st: dict[str, Any], group: dict[str, Any]) -> tuple[Any, list, list]:
        """(shard or None, row index blocks, column index blocks) of the rows this rank steps; kept while the
        permutations (new tensors at every merge and load) and the block settings stay the same."""
        key = (st.get("perm_row"), st.get("perm_col"), group["block_size"], group["mode"], group["row_shards"])
        hit = self._layout_cache.get(id(p))
        if hit is not None and hit[0]() is p and all(
                a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(hit[1], key)):
            return hit[2]
        out = self._compute_blocks(p, st, group)
        cache = self._layout_cache  # the entry goes with the tensor (a gathered FSDP2 copy lives for one step)
        cache[id(p)] = (weakref.ref(p, lambda _, k=id(p): cache.pop(k, None)), key, out)
        return out

    def _compute_blocks(self, p: torch.Tensor, st: dict[str, Any], group: dict[str, Any]) -> tuple[Any, list, list]:
        shard = row_shard(p) if self._steps_shard(p, group) else None
        perm_row = to_local(st["perm_row"])
        if shard is not None:
            rows = settings.layout(perm_row - shard.offset, group)
        else:
            rows = settings.layout(perm_row, group, self._chunks(p, group))
        return shard, rows, settings.layout(st["perm_col"], group)

    # ------------------------------------------------------------------ state
    def _perms(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """New permutations for ``p`` drawn from its generator: {perm_row, perm_col, rng} (state unchanged)."""
        gen = self._generator(state)
        m, n = p.shape
        k = self._chunks(p, group)
        if k == 1:
            perm_row = torch.randperm(m, generator=gen)
        else:  # every rank draws every part (the generators stay equal) and keeps its own
            perm_row = torch.cat([c * (m // k) + torch.randperm(m // k, generator=gen) for c in range(k)])
        perm_col = torch.randperm(n, generator=gen).to(p.device)
        perm_row = perm_row.to(p.device)
        shard = row_shard(p) if self._steps_shard(p, group) else None
        if shard is not None:
            perm_row = like(perm_row[shard.offset: shard.offset + shard.rows], shard)
        return dict(perm_row=perm_row, perm_col=perm_col, rng=gen.get_state())

    def _fresh_factors(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """Zero skew factors for p's block layout and their fresh inner state: {q_row, q_col, inner_row, inner_col}."""
        fdtype = factor_dtype(p)
        shard = row_shard(p) if self._steps_shard(p, group) else None
        out: dict[str, Any] = {}
        for side, dim in zip(SIDES, p.shape):
            chunks = self._chunks(p, group) if side == "row" else 1
            qs = [torch.zeros(nb, skew_size(b), dtype=fdtype, device=p.device)
                  for nb, b in settings.sizes(dim, group, chunks)]
            if shard is not None and side == "row":  # this rank's row blocks: a DTensor sharded on blocks
                qs = [like(q[: q.shape[0] // shard.world], shard) for q in qs]
            out[f"q_{side}"] = qs
            foreach, fused = self._inner_flags(group)
            out[f"inner_{side}"] = [self._inner.fresh(q, foreach=foreach, fused=fused) for q in qs]
        return out

    def _init_factor_state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[p]
        state.update(step=0, since_merge=0, merges=0, early_merges=0)
        state["rng"] = torch.Generator().manual_seed(self._param_seed(index)).get_state()
        self._build_factors(p, state, group)

    def _build_factors(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Factors on the weight as it is: new permutations, zero skew factors with fresh inner state, W0 = p
        (paper mode); R = P = I, so nothing about the weight changes."""
        state.update(self._perms(p, state, group))
        state.update(self._fresh_factors(p, group), q_bound=0.0)
        state.pop("w0", None)
        state.pop("comp", None)
        if group["store_base"]:
            w0 = to_local(p).detach().to(factor_dtype(p), copy=True)
            shard = row_shard(p) if self._steps_shard(p, group) else None
            state["w0"] = w0 if shard is None else like(w0, shard)
        elif compensates(group, p):  # made with the state, so that a template of it (DCP's) has the entry
            state["comp"] = self._zero_comp(p, group)

    def _zero_comp(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Lean mode's rounding buffer with nothing dropped yet: zero codes of the rows this rank steps."""
        comp = torch.zeros_like(to_local(p), dtype=CODE_DTYPE)
        shard = row_shard(p) if self._steps_shard(p, group) else None
        return comp if shard is None else like(comp, shard)

    def _rebuild(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        """New settings (block size, mode, ...) or a weight changed from outside: factors built anew on W."""
        self._build_factors(p, st, group)
        st["since_merge"] = 0

    def _state_layout(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
        m, n = p.shape
        keys = layout.ADAM_KEYS if isinstance(self._inner, AdamRule) else None
        out: dict[str, Any] = dict(perm_row=layout.Perm(m), perm_col=layout.Perm(n), rng=layout.RngState(),
                                   step=layout.Count(), since_merge=layout.Count(), merges=layout.Count(),
                                   early_merges=layout.Count(), built_with=layout.Optional(layout.Settings()),
                                   q_bound=layout.Optional(layout.Bound()))
        for side, dim in zip(SIDES, p.shape):
            chunks = self._chunks(p, group) if side == "row" else 1
            shapes = [(nb, skew_size(b)) for nb, b in settings.sizes(dim, group, chunks)]
            out[f"q_{side}"] = layout.FloatsList(shapes)
            out[f"inner_{side}"] = layout.InnerList(shapes, keys)
        if group["store_base"]:
            out["w0"] = layout.Floats((m, n))
        if compensates(group, p):
            out["comp"] = layout.Optional(layout.Rounding((m, n)))
        return out

    def _merged(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], w_new: torch.Tensor | None,
                early: bool) -> dict[str, Any]:
        """Merge-then-reinitialize as state entries: W0 <- R W0 P (``w_new``, paper mode), Q <- 0, inner state
        reset, new permutations, counters (``state`` is read, not changed)."""
        new = self._perms(p, state, group)
        new.update(self._fresh_factors(p, group), since_merge=0, merges=state["merges"] + 1,
                   early_merges=state["early_merges"] + int(early), q_bound=0.0)
        if w_new is not None and group["store_base"]:
            shard = row_shard(p) if self._steps_shard(p, group) else None
            new["w0"] = w_new if shard is None else like(w_new, shard)
        return new

    def prepare_resize(self) -> None:
        self.merge()  # W0 <- W, Q <- 0, inner state reset: the factors hold nothing the weight lacks

    def _resize_factors(self, p: torch.Tensor, st: dict[str, Any], group: dict[str, Any], resize: Any,
                        growth: Any) -> None:
        self._build_factors(p, st, group)  # merged already: counters and the generator state carry over

    @torch.no_grad()
    def merge(self) -> None:
        """Merge every factorized weight now (e.g. before saving a model for inference elsewhere;
        the weight itself never changes: W already equals R W0 P)."""
        for group in self.param_groups:
            rmap = settings.rotation_map(group)
            for p in group["params"]:
                st = self.state.get(p)
                if not st or "perm_row" not in st:
                    continue
                w_new = None
                if group["store_base"]:  # recompute in the factor dtype: no rounding through a bf16 W
                    shard, rows, cols = self._blocks(p, st, group)
                    rots = rotations([to_local(q) for q in st["q_row"]] + st["q_col"], rows + cols, rmap)
                    w_new = apply_blocks(to_local(st["w0"]), rows, rots[: len(rows)], cols, rots[len(rows):])
                updates = self._merged(p, st, group, w_new, False)
                with deferred_interrupt():
                    st.update(updates)

