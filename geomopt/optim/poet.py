"""POET: reparameterized training via orthogonal equivalence transformation, as an optimizer."""
from __future__ import annotations

from typing import Any

import torch

from ..geometry import block_layout, block_sizes, skew_norm_bound, skew_size
from ..geometry.dispatch import call
from .base import FactorOptimizer, _check_number, factor_dtype, fill_args_doc
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


def _rotations(qs: list[torch.Tensor], idxs: list[torch.Tensor], terms: int | None) -> list[torch.Tensor]:
    out = []
    for q, idx in zip(qs, idxs):
        b = idx.shape[1]
        out.append(call("cayley_exact", q, b) if terms is None else call("cayley_neumann", q, b, terms))
    return out


def _eye_like(d: torch.Tensor) -> torch.Tensor:
    return torch.eye(d.shape[-1], dtype=d.dtype, device=d.device).expand_as(d)


def _apply(x: torch.Tensor, rows: list, ds: list, cols: list, es: list) -> torch.Tensor:
    for idx, d in zip(rows, ds):
        x = call("rotate_rows", x, idx, d)
    for idx, e in zip(cols, es):
        x = call("rotate_cols", x, idx, e)
    return x


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
        """(shard or None, row index blocks, column index blocks) of the rows this rank steps."""
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
        terms = None if group["exact_cayley"] else group["neumann_terms"]
        store_base = group["store_base"]
        todo = []
        factors, inner_states = [], []
        for p in params:  # a row-sharded weight (FSDP2) works on its local rows: every row tensor is local
            st = self.state[p]
            shard, rows, cols = self._blocks(p, st, group)
            fdtype = factor_dtype(p)
            g = to_local(p.grad).to(fdtype)
            q_row = [to_local(q) for q in st["q_row"]]
            qs = q_row + st["q_col"]
            with torch.enable_grad():
                leaves = [q.detach().requires_grad_() for q in qs]
                rots = _rotations(leaves, rows + cols, terms)
            ds, es = [r.detach() for r in rots[: len(rows)]], [r.detach() for r in rots[len(rows):]]
            # M = W0 P = R^-1 W and N = R W0 = W P^-1 hold in both modes, so the gradients are taken from
            # W itself (DESIGN.md's lean formulas, with D^-T = D and E^-T = E for orthogonal blocks):
            # dL/dD_k = G[s_k] W[s_k]^T D_k^-T,  dL/dE_k = E_k^-T W[:, t_k]^T G[:, t_k]
            w = to_local(p).detach().to(fdtype)
            ds_inv, es_inv = [torch.linalg.inv(d) for d in ds], [torch.linalg.inv(e) for e in es]
            gd = [call("row_block_grad", g, w, idx) @ di.transpose(1, 2) for idx, di in zip(rows, ds_inv)]
            ge = [ei.transpose(1, 2) @ call("col_block_grad", w, g, idx) for idx, ei in zip(cols, es_inv)]
            ds, es = list(zip(ds, ds_inv)), list(zip(es, es_inv))
            with torch.enable_grad():
                grads = list(torch.autograd.grad(rots, leaves, grad_outputs=gd + ge)) if leaves else []
            if shard is not None and cols:  # a column block sums over every row: add the ranks' parts
                col = grads[len(rows):]
                flat = all_reduce(torch.cat([c.reshape(-1) for c in col]), shard)
                grads[len(rows):] = [c.view_as(x) for c, x in zip(flat.split([x.numel() for x in col]), col)]
            for q, gq in zip(qs, grads):
                q.grad = gq
            inner_row = [local_state(s) for s in st["inner_row"]]
            factors += qs
            inner_states += inner_row + st["inner_col"]
            todo.append((p, st, shard, rows, cols, ds, es, q_row, inner_row))
        if factors:
            self._inner_step(group, factors, inner_states)
        for p, st, shard, _, _, _, _, q_row, inner_row in todo:
            for s, view, q in zip(st["inner_row"], inner_row, q_row):
                put_back(s, view, shard, q.shape)

        flags = [False] * len(todo)
        limit = group["max_q_norm"]
        if limit is not None and terms is not None and factors:
            bounds = torch.stack([
                torch.stack([skew_norm_bound(q, idx.shape[1]).amax() for q, idx in
                             zip(q_row + st["q_col"], rows + cols)]).amax()
                if rows + cols else torch.zeros((), device=to_local(p).device)
                for p, st, _, rows, cols, _, _, q_row, _ in todo
            ])
            sharded = [p if shard is not None else None for p, _, shard, *_ in todo]
            if any(x is not None for x in sharded):  # a weight's row blocks are spread over its ranks
                bounds = reduce_over_meshes(bounds, sharded, torch.distributed.ReduceOp.MAX)
            flags = (bounds > limit).tolist()

        for (p, st, shard, rows, cols, ds, es, q_row, _), early in zip(todo, flags):
            use = None if early else terms
            new = _rotations(q_row + st["q_col"], rows + cols, use)
            dn, en = new[: len(rows)], new[len(rows):]
            if store_base:
                w_new = _apply(to_local(st["w0"]), rows, dn, cols, en)
            else:  # D_new D_old^-1 = I + (D_new - D_old) D_old^-1: exactly I when Q did not move
                dr = [_eye_like(d) + (a - d) @ di for a, (d, di) in zip(dn, ds)]
                dp = [_eye_like(e) + ei @ (a - e) for a, (e, ei) in zip(en, es)]
                w_new = _apply(to_local(p).detach().to(factor_dtype(p)), rows, dr, cols, dp)
            to_local(p).copy_(w_new)
            st["step"] += 1
            st["since_merge"] += 1
            if early or st["since_merge"] >= group["merge_every"]:
                w_keep = None if not store_base else w_new if shard is None else like(w_new, shard)
                self._merge(p, st, group, w_keep, early)

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
                    rots = _rotations([to_local(q) for q in st["q_row"]] + st["q_col"], rows + cols, terms)
                    w_new = _apply(to_local(st["w0"]), rows, rots[: len(rows)], cols, rots[len(rows):])
                    w_new = w_new if shard is None else like(w_new, shard)
                self._merge(p, st, group, w_new, False)


POET = POETOptimizer
