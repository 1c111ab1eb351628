"""POET: reparameterized training via orthogonal equivalence transformation, as an optimizer."""
from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from ..geometry import block_layout, block_sizes, rotation_inverse, skew_size
from .base import FactorOptimizer, _check_number, factor_dtype, fill_args_doc
from .batching import ByKey, chunks
from .poet_step import Work, apply_blocks, block_grads, delta, rewrite, rotation, rotation_and_bound, rotations
from .sharded import all_reduce, like, local_state, put_back, reduce_over_meshes, row_shard, to_local

__all__ = ["POETOptimizer", "POET"]

MODES = ("bs", "fs")
_SIDES = ("row", "col")


DEFAULT_BLOCK = 256


def _side_block(dim: int, group: dict[str, Any]) -> int:
    b = group["block_size"]
    if b is None:
        return DEFAULT_BLOCK
    if isinstance(b, float):  # fully stochastic: a fraction of the dimension
        return max(2, int(round(b * dim)))
    return b


def _layout(perm: torch.Tensor, group: dict[str, Any], chunks: int = 1) -> list[torch.Tensor]:
    """Index blocks of one side: ``perm`` cut into ``chunks`` equal consecutive parts, each blocked on its own
    (the row permutation's scope; 1 = the whole side), the parts' blocks of one size concatenated."""
    if chunks == 1:
        return block_layout(perm, _side_block(perm.numel(), group), group["mode"] == "fs")
    parts = [block_layout(c, _side_block(c.numel(), group), False) for c in perm.chunk(chunks)]
    return [torch.cat(blocks) for blocks in zip(*parts)]


def _sizes(dim: int, group: dict[str, Any], chunks: int = 1) -> list[tuple[int, int]]:
    """[(blocks, b), ...] of a side of ``dim`` indices cut into ``chunks`` parts (see ``_layout``)."""
    part = dim // chunks
    return [(nb * chunks, b) for nb, b in block_sizes(part, _side_block(part, group), group["mode"] == "fs")]


@fill_args_doc
class POETOptimizer(FactorOptimizer):
    r"""POET (Qiu et al., arXiv 2506.08001) as a drop-in replacement for ``torch.optim.AdamW``.

    Every routed weight W (m x n, torch's out x in) is reparameterized as

    .. math:: W = R\,W_0\,P,\qquad R = \mathrm{blockdiag}_s(D_1,\dots),\; P = \mathrm{blockdiag}_t(E_1,\dots)

    where ``s`` / ``t`` are random permutations of the rows / columns cut into blocks of
    ``block_size`` (ragged last block, so every shape works), and each block is the Cayley-Neumann
    map of a skew generator, :math:`D = (I + Q)(I + Q + \dots + Q^k)` (paper Eq. 5-6, k =
    ``neumann_terms``) or the exact Cayley map. From the dense gradient G the optimizer forms

    .. math:: \partial L/\partial D_k = G_{s_k} M_{s_k}^\top\ (M = W_0 P),\qquad
              \partial L/\partial E_k = N_{:,t_k}^\top G_{:,t_k}\ (N = R W_0)

    computed from the current W in both modes, since :math:`M = R^{-1} W` and :math:`N = W P^{-1}`:
    :math:`G_{s_k} W_{s_k}^\top D_k^{-\top}` and :math:`E_k^{-\top} W_{:,t_k}^\top G_{:,t_k}` (b x b
    inverses; for orthogonal blocks these are DESIGN.md's :math:`G_{s_k} W_{s_k}^\top D_k` and
    :math:`E_k W_{:,t_k}^\top G_{:,t_k}`, and they stay exact for the Neumann series), back-propagates
    them to the packed generators, updates those with the inner optimizer and rewrites W in place.
    Every ``merge_every`` steps it merges (W0 <- R W0 P, Q <- 0, inner state reset, new permutations:
    the paper's merge-then-reinitialize). ``mode="fs"`` draws one block of ``block_size`` indices per
    side (an int, or a float fraction of the dimension); R is the identity elsewhere.

    Safeguard (not in the paper): the Neumann series is a rotation only while ||Q|| is small. After
    each update a cheap bound min(||Q||_F, ||Q||_inf) >= ||Q||_2 is taken per block; when it passes
    ``max_q_norm`` the step is rewritten with the exact Cayley map and the weight is merged at once
    (counted in ``stats["early_merges"]``).

    Args:
<COMMON_ARGS>
    block_size: block size b (int >= 2); in ``"fs"`` mode also a fraction in (0, 1]. Default (None):
        256 (the paper's POET-BS setting), clamped to each side's dimension, so small models work;
        an explicit size larger than every routed weight is an error.
    mode: ``"bs"`` (block-stochastic, default) or ``"fs"`` (fully stochastic).
    neumann_terms: k of the Cayley-Neumann series (default 5; the paper's ablation: 1 does not
        converge). k = 4 keeps the spectrum better (orthogonality error O(||Q||^10) vs O(||Q||^6)).
    exact_cayley: use the exact Cayley map (batched solve) instead of the Neumann series.
    merge_every: merge-then-reinitialize interval in steps.
    store_base: keep W0 (paper mode, default). ``False`` is lean mode: no dense copy, W rewritten
        incrementally as W <- (D_new D_old^-1) W (E_old^-1 E_new) on the blocks (b x b inverses; for
        orthogonal blocks D^-1 = D^T), so it equals paper mode up to rounding for every k.
    max_q_norm: threshold of the safeguard above (``None`` turns it off).
    row_shards: cut each row permutation into this many equal consecutive parts and block each part on
        its own (weights whose rows it does not divide, and ``"fs"`` mode, keep one part). Default
        (None): 1, and under FSDP2 the mesh size, so that no row block crosses a shard and the step needs
        no gathered weight (see README, "Where it runs"). Pass the FSDP2 mesh size to a single-process
        run to reproduce a sharded one.

    Example:
        >>> import torch, geomopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> opt = geomopt.POET(model, lr=1e-2, block_size=8, merge_every=50)
        >>> x, y = torch.randn(64, 16), torch.randn(64, 4)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     opt.step()
    """

    STAT_KEYS = ("merges", "early_merges")

    def __init__(self, params: Any, lr: float = 1e-3, *, block_size: int | float | None = None, mode: str = "bs",
                 neumann_terms: int = 5, exact_cayley: bool = False, merge_every: int = 200,
                 store_base: bool = True, max_q_norm: float | None = 0.5, row_shards: int | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 inner: type = torch.optim.AdamW, inner_kwargs: dict[str, Any] | None = None,
                 seed: int = 0, nonfinite: str = "skip"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, factorize=True,
                        block_size=block_size, mode=mode, neumann_terms=neumann_terms,
                        exact_cayley=exact_cayley, merge_every=merge_every, store_base=store_base,
                        max_q_norm=max_q_norm, row_shards=row_shards)
        super().__init__(params, defaults, inner=inner, inner_kwargs=inner_kwargs, seed=seed, nonfinite=nonfinite)
        self._layout_cache: dict[int, tuple] = {}  # id(param) -> (weakref, key, layout); see _blocks

    # ------------------------------------------------------------------ arguments
    def _check_group(self, group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
        mode = group["mode"]
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        b = group["block_size"]
        if b is None:
            b = DEFAULT_BLOCK
        elif isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"block_size must be an int (or a float fraction in 'fs' mode), got {b!r}")
        if isinstance(b, float):
            if mode != "fs":
                raise TypeError(f"block_size must be an int in 'bs' mode, got {b!r}")
            if not 0.0 < b <= 1.0:
                raise ValueError(f"block_size as a fraction must be in (0, 1], got {b!r}")
        elif b < 2:
            raise ValueError(f"block_size must be >= 2, got {b!r}")
        elif group["block_size"] is not None and factorized and all(b > max(p.shape) for p in factorized):
            largest = max(max(p.shape) for p in factorized)
            raise ValueError(f"block_size={b} is larger than every routed weight (largest dimension {largest})")
        _check_number("neumann_terms", group["neumann_terms"], low=1, integer=True)
        _check_number("merge_every", group["merge_every"], low=1, integer=True)
        for key in ("exact_cayley", "store_base", "factorize"):
            if not isinstance(group[key], bool):
                raise TypeError(f"{key} must be a bool, got {group[key]!r}")
        if group["max_q_norm"] is not None:
            _check_number("max_q_norm", group["max_q_norm"], low=0.0, low_open=True)
        if group["row_shards"] is not None:
            _check_number("row_shards", group["row_shards"], low=1, integer=True)

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
            rows = _layout(perm_row - shard.offset, group)
        else:
            rows = _layout(perm_row, group, self._chunks(p, group))
        return shard, rows, _layout(st["perm_col"], group)

    # ------------------------------------------------------------------ state
    def _draw_perms(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        gen = self._generator(state)
        m, n = p.shape
        k = self._chunks(p, group)
        if k == 1:
            perm_row = torch.randperm(m, generator=gen)
        else:  # every rank draws every part (the generators stay equal) and keeps its own
            perm_row = torch.cat([c * (m // k) + torch.randperm(m // k, generator=gen) for c in range(k)])
        state["perm_col"] = torch.randperm(n, generator=gen).to(p.device)
        perm_row = perm_row.to(p.device)
        shard = row_shard(p) if self._steps_shard(p, group) else None
        if shard is not None:
            perm_row = like(perm_row[shard.offset: shard.offset + shard.rows], shard)
        state["perm_row"] = perm_row
        state["rng"] = gen.get_state()

    def _init_factor_state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[p]
        state.update(step=0, since_merge=0, merges=0, early_merges=0)
        state["rng"] = torch.Generator().manual_seed(self._param_seed(index)).get_state()
        self._build_factors(p, state, group)

    def _build_factors(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Permutations drawn for p's shape, zero skew factors with fresh inner state, W0 = p (paper mode)."""
        self._draw_perms(p, state, group)
        fdtype = factor_dtype(p)
        shard = row_shard(p) if self._steps_shard(p, group) else None
        for side, dim in zip(_SIDES, p.shape):
            chunks = self._chunks(p, group) if side == "row" else 1
            qs = [torch.zeros(nb, skew_size(b), dtype=fdtype, device=p.device) for nb, b in _sizes(dim, group, chunks)]
            if shard is not None and side == "row":  # this rank's row blocks: a DTensor sharded on blocks
                qs = [like(q[: q.shape[0] // shard.world], shard) for q in qs]
            state[f"q_{side}"] = qs
            state[f"inner_{side}"] = [self._fresh_inner(q) for q in qs]
        if group["store_base"]:
            w0 = to_local(p).detach().to(fdtype, copy=True)
            state["w0"] = w0 if shard is None else like(w0, shard)

    def _check_loaded_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        for key in ("perm_row", "perm_col", "rng", "q_row", "q_col", "inner_row", "inner_col"):
            if key not in state:
                raise ValueError(f"POET state of a {tuple(p.shape)} weight lacks {key!r}: "
                                 "the state_dict comes from another optimizer or mode")
        for side, dim in zip(_SIDES, p.shape):
            perm = state[f"perm_{side}"]
            if not isinstance(perm, torch.Tensor) or perm.numel() != dim:
                raise ValueError(f"perm_{side} of a {tuple(p.shape)} weight must have {dim} entries, "
                                 f"got {getattr(perm, 'shape', perm)}")
            chunks = self._chunks(p, group) if side == "row" else 1
            got = [tuple(q.shape) for q in state[f"q_{side}"]]
            want = [(nb, skew_size(b)) for nb, b in _sizes(dim, group, chunks)]
            if got != want:
                raise ValueError(f"q_{side} of a {tuple(p.shape)} weight has shapes {got}, block_size="
                                 f"{group['block_size']} and row_shards={group['row_shards']} need {want}: "
                                 "another model, block size or row_shards")
        if group["store_base"] and tuple(state.get("w0", torch.empty(0)).shape) != tuple(p.shape):
            raise ValueError(f"w0 of a {tuple(p.shape)} weight is missing or has another shape")

    # ------------------------------------------------------------------ step
    def _factor_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Step the weights in runs (``batching.chunks``): within a run, every block of one side and size is
        mapped, inverted, differentiated and bounded in one batched call (``_step_run``)."""
        works = [self._work(p, group) for p in params]
        sizes = [sum(idx.numel() * idx.shape[1] for idx in w.rows + w.cols) for w in works]
        for run in chunks(works, sizes):
            self._step_run(group, run)

    def _work(self, p: torch.Tensor, group: dict[str, Any]) -> Work:
        st = self.state[p]  # a row-sharded weight (FSDP2) works on its local rows: every row tensor is local
        shard, rows, cols = self._blocks(p, st, group)
        return Work(p, st, shard, rows, cols, [to_local(q) for q in st["q_row"]] + st["q_col"],
                     [local_state(s) for s in st["inner_row"]], factor_dtype(p))

    def _step_run(self, group: dict[str, Any], works: list[Work]) -> None:
        terms = None if group["exact_cayley"] else group["neumann_terms"]
        qs = [q for w in works for q in w.qs]
        batch = ByKey([(side, idx.shape[1], q.dtype, q.device) for w in works
                       for (side, idx), q in zip(w.sides(), w.qs)], [q.shape[0] for q in qs])
        with torch.enable_grad():
            leaves = {k: t.detach().requires_grad_() for k, t in batch.cat(qs).items()}
            rots = {k: rotation(leaf, k[1], terms) for k, leaf in leaves.items()}
        old = {k: r.detach() for k, r in rots.items()}
        inv = {k: rotation_inverse(r) for k, r in old.items()}
        # M = W0 P = R^-1 W and N = R W0 = W P^-1 hold in both modes, so the gradients are taken from
        # W itself (DESIGN.md's lean formulas, with D^-T = D and E^-T = E for orthogonal blocks):
        # dL/dD_k = G[s_k] W[s_k]^T D_k^-T,  dL/dE_k = E_k^-T W[:, t_k]^T G[:, t_k]
        raw = block_grads(works, batch)
        outs = [raw[k] @ inv[k].transpose(1, 2) if k[0] == "row" else inv[k].transpose(1, 2) @ raw[k] for k in rots]
        del raw
        with torch.enable_grad():
            grads = batch.split(dict(zip(rots, torch.autograd.grad(list(rots.values()), list(leaves.values()),
                                                                   grad_outputs=outs)))) if rots else []
        del outs
        factors, inner_states, pos = [], [], 0
        for w in works:
            gq, pos, nrow = grads[pos: pos + len(w.qs)], pos + len(w.qs), len(w.rows)
            if w.shard is not None and w.cols:  # a column block sums over every row: add the ranks' parts
                col = gq[nrow:]
                flat = all_reduce(torch.cat([c.reshape(-1) for c in col]), w.shard)
                gq[nrow:] = [c.view_as(x) for c, x in zip(flat.split([x.numel() for x in col]), col)]
            for q, g in zip(w.qs, gq):
                q.grad = g
            factors += w.qs
            inner_states += w.inner_row + w.st["inner_col"]
        if factors:
            self._inner_step(group, factors, inner_states)
        for w in works:
            for s, view, q in zip(w.st["inner_row"], w.inner_row, w.qs):
                put_back(s, view, w.shard, q.shape)

        new_q = batch.cat(qs)  # the updated generators
        flags = [False] * len(works)
        if group["max_q_norm"] is not None and terms is not None:
            pairs = {k: rotation_and_bound(q, k[1], terms) for k, q in new_q.items()}
            mats = {k: r for k, (r, _) in pairs.items()}
            flags = self._safeguard(group["max_q_norm"], works, batch, {k: bd for k, (_, bd) in pairs.items()})
        else:
            mats = {k: rotation(q, k[1], terms) for k, q in new_q.items()}
        if not group["store_base"]:  # D_new D_old^-1 = I + (D_new - D_old) D_old^-1: exactly I when Q did not move
            mats = {k: delta(k[0], mats[k], old[k], inv[k]) for k in mats}
        per = batch.split(mats)
        olds, invs = (batch.split(old), batch.split(inv)) if any(flags) else ([], [])
        del old, inv
        pos = 0
        for w, early in zip(works, flags):
            mine, idx = per[pos: pos + len(w.qs)], range(pos, pos + len(w.qs))
            pos += len(w.qs)
            if early:  # the safeguard: this weight's step with the exact Cayley map, then a merge
                exact = rotations(w.qs, w.rows + w.cols, None)
                mine = exact if group["store_base"] else [
                    delta(side, r, olds[i], invs[i]) for i, (side, _), r in zip(idx, w.sides(), exact)]
            w_new, written = rewrite(w, mine, group["store_base"])
            if not written:
                to_local(w.p).copy_(w_new)
            w.st["step"] += 1
            w.st["since_merge"] += 1
            if early or w.st["since_merge"] >= group["merge_every"]:
                keep = None
                if group["store_base"]:  # the new W0 (its own copy when the weight itself was rotated)
                    keep = w_new.clone() if written else w_new
                    keep = keep if w.shard is None else like(keep, w.shard)
                self._merge(w.p, w.st, group, keep, early)

    @staticmethod
    def _safeguard(limit: float, works: list[Work], batch: ByKey, block_bounds: dict) -> list:
        """Per weight: whether the bound on the spectral norm of one of its updated generators (``block_bounds``:
        per key of ``batch``, one per block) passes ``limit`` (the maximum over a sharded weight's ranks)."""
        if not block_bounds:
            return [False] * len(works)
        first = next(iter(block_bounds.values()))
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in block_bounds.values()])
        bounds = torch.zeros(len(works), dtype=dtype, device=first.device)
        owners = batch.owners([i for i, w in enumerate(works) for _ in w.qs], bounds.device)
        for k, v in block_bounds.items():
            bounds.scatter_reduce_(0, owners[k], v.to(bounds.device, dtype), "amax")
        sharded = [w.p if w.shard is not None else None for w in works]
        if any(x is not None for x in sharded):  # a weight's row blocks are spread over its ranks
            bounds = reduce_over_meshes(bounds, sharded, torch.distributed.ReduceOp.MAX)
        return (bounds > limit).tolist()

    def _merge(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], w_new: torch.Tensor | None,
               early: bool) -> None:
        """Merge-then-reinitialize: W0 <- R W0 P, Q <- 0, inner state reset, new permutations."""
        if w_new is not None:
            state["w0"] = w_new
        for side in _SIDES:
            for q, s in zip(state[f"q_{side}"], state[f"inner_{side}"]):
                to_local(q).zero_()
                self._reset_inner(s, q)
        self._draw_perms(p, state, group)
        state["since_merge"] = 0
        state["merges"] += 1
        if early:
            state["early_merges"] += 1

    @torch.no_grad()
    def merge(self) -> None:
        """Merge every factorized weight now (e.g. before saving a model for inference elsewhere;
        the weight itself never changes: W already equals R W0 P)."""
        for group in self.param_groups:
            terms = None if group["exact_cayley"] else group["neumann_terms"]
            for p in group["params"]:
                st = self.state.get(p)
                if not st or "perm_row" not in st:
                    continue
                w_new = None
                if group["store_base"]:  # recompute in the factor dtype: no rounding through a bf16 W
                    shard, rows, cols = self._blocks(p, st, group)
                    rots = rotations([to_local(q) for q in st["q_row"]] + st["q_col"], rows + cols, terms)
                    w_new = apply_blocks(to_local(st["w0"]), rows, rots[: len(rows)], cols, rots[len(rows):])
                    w_new = w_new if shard is None else like(w_new, shard)
                self._merge(p, st, group, w_new, False)


POET = POETOptimizer
