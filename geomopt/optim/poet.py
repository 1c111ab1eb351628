"""POET: reparameterized training via orthogonal equivalence transformation, as an optimizer."""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from . import batching
from . import poet_settings as settings
from .base import FactorOptimizer
from .batching import ByKey, chunks
from .decisions import DeviceFlags
from .poet_capture import base_reset, device_resets, device_safeguard, keep_unless
from .poet_settings import check_capturable, check_group, compensates, rounds
from .poet_state import POETState
from .poet_step import (
    Group,
    Work,
    delta,
    exact_for_flagged,
    generator_grads,
    group_key,
    group_mats,
    host_rotations,
    inverse_iterations,
    make_groups,
    new_factors,
    rewrite,
)
from .poet_tiled import TiledStep
from .rounding import CODE_DTYPE, codes_of
from .sharded import local_state, to_local
from .shared_args import base_args, common_args, group_defaults, shared_args
from .state import factor_dtype

__all__ = ["POETOptimizer", "POET"]


class _Decided(NamedTuple):
    """What ``POETOptimizer._decide`` gives the commit: the new rotations per key and per entry (views), per weight
    whether the safeguard fired on the host and its bound; a capturable paper-mode step's per-weight device flags
    (new weight taken, W0 set to it), else None; the counters of the weights merged on the device, else None."""
    mats: dict
    per: list
    flags: list
    bounds: Any
    take: torch.Tensor | None
    merged: torch.Tensor | None
    resets: list | None

@shared_args
class POETOptimizer(POETState, TiledStep, FactorOptimizer):
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
    inverses; for orthogonal blocks these are lean mode's :math:`G_{s_k} W_{s_k}^\top D_k` and
    :math:`E_k W_{:,t_k}^\top G_{:,t_k}`, and they stay exact for the Neumann series), back-propagates
    them to the packed generators, updates those with the inner optimizer and rewrites W (computed out of
    place, then committed together with the state).
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
        neumann_terms: k of the Cayley-Neumann series (default 4; the paper's ablation: 1 does not
            converge). An even k keeps the spectrum: the orthogonality error is O(||Q||^(2k+2)) for even k and
            O(||Q||^(k+1)) for odd k, so k = 4 (||Q||^10) is orthogonal where the paper's k = 5 (2 ||Q||^6) is
            not, at the same three batched products; over three seeds on the ``small`` preset both reach the
            same loss (BENCHMARKS.md, "Neumann terms"). ``neumann_terms=5`` is the paper's setting.
        neumann_form: which polynomial k means. ``"paper"`` (default): the paper's Eq. 6,
            (I + Q)(I + Q + ... + Q^k) = I + 2(Q + ... + Q^k) + Q^(k+1). ``"series"``: the Cayley map's series cut
            after Q^(k-1), I + 2(Q + ... + Q^(k-1)) (k >= 2), what the official code's torch fallback computes at
            k = 5; its Triton kernel's I + 2Q + 2Q^2 + 2Q^3 + Q^4 is ``"paper"`` at k = 3 (README, "Differences from
            the official code").
        exact_cayley: use the exact Cayley map (a batched Cholesky factorization) instead of the Neumann series.
        merge_every: merge-then-reinitialize interval in steps.
        exact_merge: the step that merges (every ``merge_every`` steps) rotates by the exact Cayley map of its
            generators, as a safeguard step does, so that W0 <- R W0 P is an exactly orthogonal change and the
            singular values survive any number of merges. The price: that step changes the weight by the
            polynomial's error at the current generators even where they did not move (at lr 0 too), so it is
            opt-in. ``False`` (default) merges the Cayley-Neumann blocks, as the paper and the official code do:
            each merge then adds the polynomial's non-orthogonality
            (at most ``neumann_terms``' residual at that ||Q||) to W0 for good, and it accumulates over merges
            (BENCHMARKS.md, "Long-run drift"). Between merges the weight is R W0 P with the polynomial either way.
            An explicit ``merge()`` keeps the weight as it is, so it merges the polynomial's blocks.
        store_base: keep W0 (paper mode, default). ``False`` is lean mode: no dense copy, W rewritten
            incrementally as W <- (D_new D_old^-1) W (E_old^-1 E_new) on the blocks (b x b inverses; for
            orthogonal blocks D^-1 = D^T), so it equals paper mode up to rounding for every k.
        compensate: lean mode with bf16 or fp16 weights keeps what each step's rounding of W dropped (one int8 code
            per entry, in 1/256 of the entry's last place: 1 byte per entry, against paper mode's fp32 W0 at 4;
            ``geomopt.geometry.rounding``) and adds it back before the next rotation, so the roundings do not
            add up: the weight stays one rounding away from its exact
            rotation, as in paper mode (BENCHMARKS.md, "bf16 weights"). Default True; ``False`` saves the buffer
            and lets the spectrum drift (0.14 relative over 2,000 steps there). Not with ``capturable=True``
            (that step rounds as ``False`` does). No effect in paper mode or on fp32 / fp64 weights.
        max_q_norm: threshold of the safeguard above (``None`` turns it off).
        row_shards: cut each row permutation into this many equal consecutive parts and block each part on
            its own (weights whose rows it does not divide, and ``"fs"`` mode, keep one part). Default
            (None): 1, and under FSDP2 the mesh size, so that no row block crosses a shard and the step needs
            no gathered weight (see README, "Where it runs"). Pass the FSDP2 mesh size to a single-process
            run to reproduce a sharded one.
        lr_ref_block: scale the factors' lr per side by sqrt(``lr_ref_block`` / b), b that side's block size,
            so that an lr carries over between block sizes: with the same per-entry step, ||Q||_2 of a b x b block
            grows about like sqrt(b). ``lr`` is then the factors' lr at b = ``lr_ref_block``; default 32 (at
            b = 256 the factors step at 0.35 ``lr``). None: the factors step at ``lr`` at every b (as before
            the setting existed). The AdamW-routed tensors are not affected.

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

    CAPTURABLE = True
    STAT_KEYS = ("merges", "early_merges")
    CYCLE_SETTING, CYCLE_STAT = "merge_every", "merges"
    TRAINED_KEYS = ("q_row", "q_col")
    STATE_MARKER = "perm_row"
    STRUCTURAL = ("block_size", "mode", "store_base", "row_shards", "neumann_terms", "neumann_form", "exact_cayley")
    ADDED_SETTINGS = ("row_shards", "lr_ref_block", "neumann_form", "exact_merge", "compensate")

    def __init__(self, params: Any, lr: float = 1e-3, *, block_size: int | float | None = None, mode: str = "bs",
                 neumann_terms: int = 4, neumann_form: str = "paper", exact_cayley: bool = False,
                 merge_every: int = 200, exact_merge: bool = False,
                 store_base: bool = True, compensate: bool = True, max_q_norm: float | None = 0.5,
                 row_shards: int | None = None,
                 lr_ref_block: int | None = 32, **common: Any):
        args = common_args(type(self), common)
        own = dict(block_size=block_size, mode=mode, neumann_terms=neumann_terms, neumann_form=neumann_form,
                   exact_cayley=exact_cayley, merge_every=merge_every, exact_merge=exact_merge, store_base=store_base,
                   compensate=compensate, max_q_norm=max_q_norm, row_shards=row_shards, lr_ref_block=lr_ref_block)
        super().__init__(params, group_defaults(lr, args, own), **base_args(args))

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._layout_cache: dict[int, tuple] = {}  # id(param) -> (weakref, key, layout); see _blocks
        self._stack_cache: dict[tuple, tuple] = {}  # a group's stacked index blocks; see make_groups
        self._tile_caches: dict[int, dict] = {}  # per param group, the run layouts of the tile pipeline
        self._tile_cache: dict[tuple, Any] = {}  # (``poet_tiled.run_layout``): the group's, from its last step,
        self._tile_seen: dict[tuple, Any] = {}  # and those of this step

    def _inner_flags(self, group: dict[str, Any]) -> tuple[bool | None, bool | None]:
        """(foreach, fused) of the factors' Adam: the group's flags; a capturable step takes the fused kernel, which
        skips a non-finite step on the device."""
        return (None, True) if group["capturable"] else (group["foreach"], group["fused"])

    def _overwrites(self, group: dict[str, Any]) -> bool:
        """Paper mode writes R W0 P; lean mode rotates W as it is, plus (``compensate``) what its last rounding
        dropped, which an edit from outside makes stale."""
        return bool(group["store_base"]) or any(compensates(group, p) for p in group["params"])

    def _rebase(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        if group["store_base"]:
            return self._rebuild(p, group, st)
        if "comp" in st:  # lean mode: the edited weight is the weight; the factors stay, the buffer is stale
            st["comp"] = self._zero_comp(p, group)

    # ------------------------------------------------------------------ arguments
    def _check_group(self, group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
        check_group(group, factorized)
        low = sorted({str(p.dtype) for p in factorized if rounds(group, p) and not compensates(group, p)})
        if low:
            why = "with capturable=True" if group["compensate"] else "with compensate=False"
            warnings.warn(f"geomopt: lean mode (store_base=False) {why} rounds a {', '.join(low)} weight at every "
                          "step, so the rounding errors add up and its singular values drift (0.14 relative over "
                          "2,000 steps in BENCHMARKS.md, against 7.5e-4 in paper mode); keep store_base=True or "
                          "compensate=True for low-precision weights", UserWarning, stacklevel=4)
        if group["capturable"]:
            check_capturable(group, self.nonfinite, self.external_edits, self._inner)

    # ------------------------------------------------------------------ step
    def _factor_step(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                     lr: float, device: DeviceFlags | None = None) -> None:
        """Step the weights in runs (``batching.chunks``): the weights that take the tile pipeline (``_tiled``: its
        kernels on a GPU) in runs of ``_tiled_run``, the others on the staged pipeline (``_step_run``): within a run,
        every block of one side and size is mapped, inverted, differentiated and bounded in one batched call, and
        with ``foreach`` the weights of one shape share their dense calls."""
        works = [self._work(p, g, group) for p, g in zip(params, grads)]
        tiled = [device is None and (id(w.p) in self._step_checks or self._tiled(group, w.p)) for w in works]
        self._runs(group, [w for w, t in zip(works, tiled) if not t], lr, device, self._together(group, params))
        self._runs(group, [w for w, t in zip(works, tiled) if t], lr, None, True, tiled=True)

    def _runs(self, group: dict[str, Any], works: list[Work], lr: float, device: DeviceFlags | None, together: bool,
              tiled: bool = False) -> None:
        keys = [group_key(w) for w in works] if together else [None] * len(works)
        if together:  # weights of one key next to each other, in the order their keys first appear
            first: dict[tuple, int] = {}
            order = sorted(range(len(works)), key=lambda i: first.setdefault(keys[i], len(first)))
            works, keys = [works[i] for i in order], [keys[i] for i in order]
        sizes = [(sum(idx.numel() * idx.shape[1] for idx in w.rows + w.cols), to_local(w.p).numel() if together
                  else 0) for w in works]
        if tiled:  # the run layouts this group used last step, and those it uses now (``_tiled_layout``)
            self._tile_seen = {}
            self._tile_cache = self._tile_caches.get(id(group), {})
            self._tile_caches[id(group)] = self._tile_seen
        else:
            cache, self._stack_cache = self._stack_cache, {}
        for run in chunks(list(zip(works, keys)), sizes, (batching.BATCH_ELEMENTS, batching.DENSE_ELEMENTS)):
            if tiled:
                self._tiled_run(group, [w for w, _ in run], lr)
            else:
                self._step_run(group, make_groups(run, cache, self._stack_cache), lr, device=device)

    def _work(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any]) -> Work:
        st = self.state[p]  # a row-sharded weight (FSDP2) works on its local rows: every row tensor is local
        shard, rows, cols = self._blocks(p, st, group)
        if not compensates(group, p):
            st.pop("comp", None)
        elif "comp" not in st:  # an older state_dict, or compensate turned on: nothing dropped yet
            st["comp"] = self._zero_comp(p, group)
        elif st["comp"].dtype != CODE_DTYPE:  # an older state_dict's bf16 buffer: its codes for the weight as it is
            codes = self._zero_comp(p, group)
            to_local(codes).copy_(codes_of(to_local(st["comp"]), to_local(p)))
            st["comp"] = codes
        return Work(p, g, st, shard, rows, cols, [to_local(q) for q in st["q_row"]] + st["q_col"],
                    [local_state(s) for s in st["inner_row"]], factor_dtype(p))

    def _step_run(self, group: dict[str, Any], groups: list[Group], lr: float, adaptive: bool = False,
                  device: DeviceFlags | None = None) -> None:
        """One batched step of the weights of ``groups``: new generators out of place, new rotations, then per
        group the new weights (out of place, or prepared in place) and their new state, committed together. The
        block inverses run a fixed number of Newton-Schulz iterations where the safeguard bounds their starting
        residual (no host read; whether they converged is read with the safeguard's flags); ``adaptive`` (or no
        bound) iterates to convergence. ``device``: a capturable step's flags, applied on the device
        (``poet_capture``)."""
        works = [w for gr in groups for w in gr.works]
        rmap = settings.rotation_map(group)
        batch = ByKey([(side, idx.shape[1], q.dtype, q.device) for w in works
                       for (side, idx), q in zip(w.sides(), w.qs)], [q.shape[0] for w in works for q in w.qs])
        bound = group["max_q_norm"] or 0.0
        if device is None:  # the bound the safeguard read last step
            bound = max((w.st.get("q_bound", bound) for w in works), default=0.0)
        iterations = None if adaptive else inverse_iterations(group, works[0].fdtype, bound)
        old, inv, grads, converged, bases = generator_grads(groups, batch, rmap, iterations, keep_weights=(
            not group["store_base"] or device is not None))  # paper mode's capturable step keeps W where it must
        new_qs, new_inner = self._inner_update(group, works, grads, lr, device)
        plan = self._decide(group, works, batch, new_qs, new_inner, (old, inv), rmap, converged, bound, device)
        if plan is None:  # a state from elsewhere broke the bound the iterations assumed: nothing is
            return self._step_run(group, groups, lr, adaptive=True)  # committed yet, so run again
        del old, inv
        self._commit_groups(group, groups, bases, batch, plan, new_qs, new_inner)

    def _inner_update(self, group: dict[str, Any], works: list[Work], grads: list, lr: Any,
                      device: DeviceFlags | None) -> tuple[list, list]:
        """New generators and inner states, out of place: one call of the inner rule per distinct factor lr
        (``lr_ref_block`` scales it per side's block size; without it, one call)."""
        qs = [q for w in works for q in w.qs]
        inner = [s for w in works for s in w.inner_row + w.st["inner_col"]]
        foreach, fused = self._inner_flags(group)
        found_inf = None if device is None else (~device.ok).float()
        by_scale: dict[float, list[int]] = {}
        for i, scale in enumerate(settings.lr_scales(group, works)):
            by_scale.setdefault(scale, []).append(i)
        new_qs, new_inner = [None] * len(qs), [None] * len(qs)
        for scale, at in by_scale.items():
            out_q, out_s = self._inner.updated([qs[i] for i in at], [grads[i] for i in at], [inner[i] for i in at],
                                               lr if scale == 1.0 else lr * scale, foreach=foreach, fused=fused,
                                               found_inf=found_inf)
            for i, q, s in zip(at, out_q, out_s):
                new_qs[i], new_inner[i] = q, s
        return new_qs, new_inner

    def _decide(self, group: dict[str, Any], works: list[Work], batch: ByKey, new_qs: list, new_inner: list,
                olds: tuple, rmap: settings.RotationMap | None, converged: torch.Tensor | None, bound: float,
                device: DeviceFlags | None) -> "_Decided | None":
        """The new rotations (lean mode: the incremental ones) and what each weight does, read on the host
        (``poet_step.host_rotations``; None: the inverses did not converge) or decided on the device (``poet_capture``:
        the zeroed factors of the weights merged there are written into ``new_qs`` / ``new_inner``)."""
        old, inv = olds
        take = rebased = merged = resets = None
        due = [group["exact_merge"] and rmap is not None and w.st["since_merge"] + 1 >= group["merge_every"]
               for w in works]  # a scheduled merge follows: exact rotations
        if device is None:
            new = host_rotations(group["max_q_norm"], works, batch, batch.cat(new_qs), rmap, converged)
            if new is None:
                return None
            mats, flags, bounds = new
        else:
            mats, take, merged = device_safeguard(group["max_q_norm"], works, batch, batch.cat(new_qs), rmap,
                                                  device.ok, converged, due)
            if group["store_base"]:  # a weight changed from outside is re-based, not moved
                edited = device.edited([w.p for w in works])
                take, merged, rebased = take & ~edited, merged & ~edited, device.ok & edited
            flags, bounds = [False] * len(works), [bound] * len(works)  # max_q_norm bounds every weight's Q now
        if not group["store_base"]:  # D_new D_old^-1 = I + (D_new - D_old) D_old^-1: exactly I when Q did not move
            mats = {k: delta(k[0], mats[k], old[k], inv[k]) for k in mats}
        if device is not None:
            if not group["store_base"]:
                mats = keep_unless(mats, take, works, batch)
            resets = device_resets(works, merged, rebased, new_qs, new_inner)
        per = batch.split(mats)  # views: what the safeguard writes into them ``mats`` shows
        exact = [f or d for f, d in zip(flags, due)]
        if device is None and any(exact):
            exact_for_flagged(group["store_base"], works, exact, batch, per, new_qs, old, inv)
        if rebased is None:  # the take and W0 flags serve paper mode's capturable step only
            return _Decided(mats, per, flags, bounds, None, None, resets)
        return _Decided(mats, per, flags, bounds, take, merged | rebased, resets)  # merged or re-based: W0 <- W

    def _update_of(self, group: dict[str, Any], w: Work, qs: list, inner: list, early: bool,
                   bound: Any) -> tuple[dict[str, Any], bool]:
        """Weight ``w``'s new state entries from its new generators and inner states, and whether it merges (the
        safeguard fired, ``early``, or its cycle is over); ``bound`` is where the next step's inverses start."""
        up = dict(step=w.st["step"] + 1, since_merge=w.st["since_merge"] + 1, **new_factors(w, qs, inner))
        if group["max_q_norm"] is not None and settings.rotation_map(group) is not None:
            up["q_bound"] = bound
        return up, early or up["since_merge"] >= group["merge_every"]

    def _commit_groups(self, group: dict[str, Any], groups: list[Group], bases: list, batch: ByKey,
                       plan: "_Decided", new_qs: list, new_inner: list) -> None:
        """Per group: its weights' new state entries, the rewrite of W (and W0 where ``plan`` sets it), scheduled
        and early merges, committed together; then the fingerprints of what was written."""
        starts = batch.starts()
        pos, wi = 0, 0  # the first entry and the position (in bounds) of the group's first weight
        for gr, base in zip(groups, bases):
            ups, merges = [], []
            for w in gr.works:
                up, merge = self._update_of(group, w, new_qs[pos: pos + len(w.qs)], new_inner[pos: pos + len(w.qs)],
                                            plan.flags[wi], None if plan.bounds is None else plan.bounds[wi])
                pos += len(w.qs)
                ups.append(up)
                merges.append(merge)
                if plan.resets is not None:
                    ups[-1].update(plan.resets[wi])
                wi += 1
            mine = slice(wi - len(gr.works), wi)
            side_mats = group_mats(gr, batch, plan.mats, plan.per, starts, pos - sum(len(w.qs) for w in gr.works))
            nrow = len(gr.rows)
            write, kept, stacked = rewrite(gr, side_mats[:nrow], side_mats[nrow:], group["store_base"],
                                           [m and group["store_base"] for m in merges], base,
                                           None if plan.take is None else plan.take[mine])
            if plan.take is not None:  # paper mode, merged or re-based on the device: W0 <- the new weight
                write = base_reset(gr.works, write, stacked, plan.merged[mine])
            for w, up, merge, k, early in zip(gr.works, ups, merges, kept, plan.flags[mine]):
                if merge:
                    up.update(self._merged(w.p, {**w.st, **up}, group, k, early))
            ps = [w.p for w in gr.works]
            self._commit_many(ps, write, ups)
            if (stacked is not None and len(ps) > 1 and self._overwrites(group) and stacked.dtype == ps[0].dtype
                    and not any(id(p) in self._origin for p in ps)):  # the fingerprints from what was written
                self._edits.record_stacked(ps, stacked)


POET = POETOptimizer
