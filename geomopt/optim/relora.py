"""ReLoRA: high-rank training through low-rank updates, as an optimizer."""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from ..grow.resize import pad_dim, pad_like
from . import state as layout
from .base import FactorOptimizer
from .batching import dense_stack, key_runs
from .checks import check_number, check_rank
from .inner import AdamRule
from .sharded import all_reduce, is_dtensor, like, local_state, put_back, row_shard, shard_state, to_local
from .shared_args import base_args, common_args, group_defaults, shared_args
from .state import factor_dtype, mix_seed

__all__ = ["ReLoRAReset", "PRUNE_MODES", "prune_state_"]

PRUNE_MODES = ("magnitude", "random", "reset")


def keep_count(numel: int, prune_ratio: float) -> int:
    """Entries a factor keeps after pruning: ceil((1 - prune_ratio) * numel)."""
    return min(numel, math.ceil((1.0 - prune_ratio) * numel - 1e-9))


def prune_state_(state: dict[str, Any], like: torch.Tensor, prune_ratio: float, mode: str,
                 generator: torch.Generator) -> None:
    """Prune one factor's inner optimizer state in place with ONE mask shared by all its moments.

    Every state tensor shaped like the factor (Adam's exp_avg and exp_avg_sq, ...) is multiplied by
    the same 0/1 mask, so no entry keeps a first moment with a zeroed second moment (its next Adam
    update would be m / eps). ``"magnitude"`` keeps the ceil((1 - p) n) entries of largest
    |exp_avg| (or of the first such tensor when there is no exp_avg); ``"random"`` keeps as many
    entries drawn from ``generator``; ``"reset"`` empties the state. Scalars (``step``) are kept.
    Row-sharded moments (DTensors, FSDP2) get the mask of the whole factor, so the result is the same as
    unsharded: the score (m x r for B) is all-gathered, the factor itself never.
    """
    if mode == "reset":
        state.clear()
        return
    moments = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == like.shape}
    if not moments:
        return
    n = like.numel()
    keep = keep_count(n, prune_ratio)
    if mode == "magnitude":
        score = moments.get("exp_avg", next(iter(moments.values())))
        score = (score.full_tensor() if is_dtensor(score) else score).abs().flatten()
        idx = torch.topk(score.float(), keep, sorted=False).indices
    else:
        idx = torch.randperm(n, generator=generator)[:keep].to(like.device)
    mask = torch.zeros(n, dtype=torch.bool, device=like.device)
    mask[idx] = True
    mask = mask.view(like.shape)
    shard = row_shard(like)
    if shard is not None:
        mask = mask[shard.offset: shard.offset + shard.rows]
    for v in moments.values():  # masked_fill, not a product: an overflowed (inf) moment must not become NaN
        to_local(v).masked_fill_(~mask, 0)


@shared_args
class ReLoRAReset(FactorOptimizer):
    r"""ReLoRA (Lialin et al., arXiv 2307.05695) as a drop-in replacement for ``torch.optim.AdamW``.

    Every routed weight is trained as :math:`W = W_{start} + s\,B A` with :math:`s = \alpha / r`,
    :math:`A \in \mathbb{R}^{r\times n}`, :math:`B \in \mathbb{R}^{m\times r}`. From the dense gradient G:

    .. math:: \partial L/\partial B = s\,G A^\top,\qquad \partial L/\partial A = s\,B^\top G

    The inner optimizer updates A, B and the weight is rewritten in place,
    :math:`W \leftarrow W + s\,(B' A' - B A)`: no dense copy of :math:`W_{start}` is kept. Every
    ``reset_every`` steps of a cycle (the paper's merge-and-reinit): A is redrawn (Kaiming uniform,
    a = sqrt 5, from a generator seeded by the weight's seed and its count of draws), B <- 0 (the
    official code zeroes both, so nothing trains until the next reset; here B alone is zeroed), and the
    inner state of A and B is pruned (``prune_ratio`` per tensor, one mask shared by a factor's
    moments). After each reset the factors' lr is scaled from 0 back to 1 over
    ``restart_warmup_steps`` inside the optimizer, so any ordinary scheduler works unchanged (with
    ``geomopt.schedules.jagged_cosine`` set it to 0).

    Differences from module LoRA: there is no LoRA dropout and the forward stays dense (W is a plain
    weight), so there are no compute savings in the forward; the optimizer-state saving is the point.
    For frozen-base compute savings, keep peft LoRA layers and use ``geomopt.peft_lora.merge_and_reinit``.

    Args:
<COMMON_ARGS>
        rank: r of the update in each cycle (<= min(m, n) of every routed weight).
        alpha: LoRA scale numerator; s = alpha / rank.
        reset_every: steps per cycle.
        reset_offset: the first reset comes this many steps later, the rest keep to ``reset_every`` (default 0:
            resets after steps k R of the low-rank phase; the official loop resets after steps k R + 1, which is
            ``reset_offset=1``).
        prune_ratio: fraction of each factor's inner state zeroed at a reset, in [0, 1) (paper: 0.99).
        prune: ``"magnitude"`` (default), ``"random"`` or ``"reset"`` (drop the whole state).
        warm_start_steps: the first steps train routed weights full-rank with the inner optimizer; then
            that state is freed and the low-rank cycles begin.
        restart_warmup_steps: steps of the post-reset lr warm-up (0 turns it off).

    Example:
        >>> import torch, geomopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> opt = geomopt.ReLoRAReset(model, lr=1e-2, rank=4, alpha=8, reset_every=20)
        >>> x, y = torch.randn(64, 16), torch.randn(64, 4)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     opt.step()
    """

    STAT_KEYS = ("resets",)
    CYCLE_SETTING, CYCLE_STAT = "reset_every", "resets"
    TRAINED_KEYS = ("A", "B")
    STATE_MARKER = "draws"
    STRUCTURAL = ("rank",)
    ADDED_SETTINGS = ("reset_offset",)

    def __init__(self, params: Any, lr: float = 1e-3, *, rank: int = 128, alpha: float = 32.0,
                 reset_every: int = 2000, reset_offset: int = 0, prune_ratio: float = 0.99, prune: str = "magnitude",
                 warm_start_steps: int = 0, restart_warmup_steps: int = 100, **common: Any):
        args = common_args(type(self), common)
        own = dict(rank=rank, alpha=alpha, reset_every=reset_every, reset_offset=reset_offset, prune_ratio=prune_ratio,
                   prune=prune, warm_start_steps=warm_start_steps, restart_warmup_steps=restart_warmup_steps)
        super().__init__(params, group_defaults(lr, args, own), **base_args(args))

    def _check_group(self, group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
        check_rank(group, factorized)
        check_number("alpha", group["alpha"], low=0.0, low_open=True)
        check_number("reset_every", group["reset_every"], low=1, integer=True)
        check_number("reset_offset", group.get("reset_offset", 0), low=0, integer=True)
        check_number("prune_ratio", group["prune_ratio"], low=0.0)
        if group["prune_ratio"] >= 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {group['prune_ratio']!r}")
        if group["prune"] not in PRUNE_MODES:
            raise ValueError(f"prune must be one of {PRUNE_MODES}, got {group['prune']!r}")
        check_number("warm_start_steps", group["warm_start_steps"], low=0, integer=True)
        check_number("restart_warmup_steps", group["restart_warmup_steps"], low=0, integer=True)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _next_generator(state: dict[str, Any]) -> torch.Generator:
        """A generator for the weight's next draw, seeded from its seed and the count of earlier draws: the
        state holds two ints instead of a generator's state (5 KB), and every rank and resumed run draws
        the same."""
        seed = mix_seed(state["seed"], state["draws"], 0xBF58476D1CE4E5B9)
        state["draws"] += 1
        return torch.Generator().manual_seed(seed)

    def _draw_a(self, p: torch.Tensor, state: dict[str, Any], rank: int) -> torch.Tensor:
        """Kaiming uniform with a = sqrt(5) on an (r x n) matrix: U(-1/sqrt(n), 1/sqrt(n)) (counts a draw)."""
        n = p.shape[1]
        a = (torch.rand(rank, n, generator=self._next_generator(state), dtype=torch.float64) * 2 - 1) / math.sqrt(n)
        return a.to(dtype=factor_dtype(p), device=p.device)

    def trained_numel(self, p: torch.Tensor) -> int:
        return p.numel() if "inner_full" in self.state.get(p, {}) else super().trained_numel(p)  # warm start

    def _resize_factors(self, p: torch.Tensor, st: dict[str, Any], group: dict[str, Any], resize: Any,
                        growth: Any) -> None:
        """A gains columns for new input dims (drawn like a fresh A, from its seed), B zero rows for new output
        dims; their inner state (and the warm start's) is padded with zeros."""
        m, n = p.shape
        if "A" in st:
            a, b = st["A"], st["B"]
            st["A"] = pad_dim(a, 1, resize.maps[1], n, self._draw_a(p, st, a.shape[0]))
            st["B"] = pad_dim(b, 0, resize.maps[0], m)
            for key, dim, size in (("inner_A", 1, n), ("inner_B", 0, m)):
                for k, v in list(st[key].items()):
                    if isinstance(v, torch.Tensor) and v.dim() == 2:
                        st[key][k] = pad_dim(v, dim, resize.maps[dim], size)
        if "inner_full" in st:
            pad_like(st["inner_full"], resize)

    def _init_factor_state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[p]
        state.update(step=0, cycle_step=0, resets=0, restarted=False, seed=self._param_seed(index), draws=0)
        if group["warm_start_steps"] > 0:
            state["inner_full"] = self._inner.fresh(to_local(p), foreach=group["foreach"], fused=False)
        else:
            state.update(self._low_rank_start(p, state, group))

    def _low_rank_start(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """A new cycle's factors as state entries: A drawn (counting the draw in ``draws``), B = 0, fresh inner
        state (``state`` is read, not changed)."""
        r = group["rank"]
        count = {"seed": state["seed"], "draws": state["draws"]}
        a = self._draw_a(p, count, r)
        shard = row_shard(p)
        b = torch.zeros(p.shape[0] if shard is None else shard.rows, r, dtype=factor_dtype(p), device=p.device)
        kw = dict(foreach=group["foreach"], fused=group["fused"])
        inner_b = self._inner.fresh(b, **kw)
        if shard is not None:  # FSDP2: B's rows live with W's rows; A is replicated
            b, inner_b = like(b, shard), shard_state(inner_b, shard, b.shape)
        return dict(A=a, B=b, inner_A=self._inner.fresh(a, **kw), inner_B=inner_b, draws=count["draws"])

    def _rebuild(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        """A new rank: W already holds W_start + s B A, so a new cycle starts at the new rank (warm start: nothing
        to rebuild yet)."""
        if "A" in st:
            st.update(self._low_rank_start(p, st, group), cycle_step=0)

    def _state_layout(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
        m, n = p.shape
        r = group["rank"]
        keys = layout.ADAM_KEYS if isinstance(self._inner, AdamRule) else None
        out: dict[str, Any] = dict(seed=layout.Seed(), draws=layout.Count(), step=layout.Count(),
                                   cycle_step=layout.Count(), resets=layout.Count(), restarted=layout.Flag(),
                                   built_with=layout.Optional(layout.Settings()))
        if "inner_full" in st:
            out["inner_full"] = layout.Inner((m, n), keys)
        else:
            out.update(A=layout.Floats((r, n)), B=layout.Floats((m, r)), inner_A=layout.Inner((r, n), keys),
                       inner_B=layout.Inner((m, r), keys))
        return out

    # ------------------------------------------------------------------ step
    def _steps_shard(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Row-sharded weights step locally: dL/dB = s G A^T needs local rows only; dL/dA = s B^T G is
        all-reduced (r x n); W += s (B' A' - B A) is local again."""
        return row_shard(p) is not None

    @staticmethod
    def _cycle_length(state: dict[str, Any], group: dict[str, Any]) -> int:
        """Steps of the current cycle: ``reset_every``, and ``reset_offset`` more before the first reset."""
        return group["reset_every"] + (0 if state["resets"] else group.get("reset_offset", 0))

    def _lr_scale(self, state: dict[str, Any], group: dict[str, Any]) -> float:
        warm = group["restart_warmup_steps"]
        if not state["restarted"] or warm == 0:
            return 1.0
        return min(1.0, state["cycle_step"] / warm)

    def _factor_step(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                     lr: float) -> None:
        pairs = list(zip(params, grads))
        full = [(p, g) for p, g in pairs if "inner_full" in self.state[p]]
        low = [(p, g) for p, g in pairs if "inner_full" not in self.state[p]]
        for p, g in full:  # a weight whose warm start ends here begins its low-rank cycles next step
            self._full_rank_step(p, g, group, lr)
        if low:
            self._low_rank_step(group, low, lr)

    def _full_rank_step(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any], lr: float) -> None:
        """A warm-start step: the inner rule on the weight itself; the low-rank cycles begin after the last."""
        st = self.state[p]
        view = local_state(st["inner_full"])
        commit = self._inner.update_([to_local(p)], [g], [view], lr, foreach=group["foreach"], fused=False)
        updates = dict(step=st["step"] + 1)
        if updates["step"] >= group["warm_start_steps"]:
            updates.update(self._low_rank_start(p, st, group))

        def write() -> None:
            commit()
            put_back(st["inner_full"], view, row_shard(p), to_local(p).shape)  # a converted step count, new entries
            if "A" in updates:
                del st["inner_full"]

        self._commit(p, write, updates)

    def _low_rank_step(self, group: dict[str, Any], low: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> None:
        """The factors' gradients, their inner update and W's rewrite: per run of ``key_runs`` (with the
        multi-tensor path, the weights of one shape share stacked products and one multi-tensor write; else one
        weight each), committed run by run."""
        s = group["alpha"] / group["rank"]
        keys = [(tuple(to_local(p).shape), p.dtype, self.state[p]["A"].shape, self.state[p]["A"].dtype,
                 row_shard(p) is None) for p, _ in low]
        runs = key_runs(keys, [to_local(p).numel() for p, _ in low], self._together(group, [p for p, _ in low]))
        factors, fgrads, states = [], [None] * (2 * len(low)), []
        by_scale: dict[float, list[int]] = {}
        for i, (p, _) in enumerate(low):  # FSDP2 shards: B, its inner state and W are the local rows
            st = self.state[p]
            factors += [st["A"], to_local(st["B"])]
            states += [st["inner_A"], local_state(st["inner_B"])]
            by_scale.setdefault(self._lr_scale(st, group), []).append(i)
        for ix in runs:
            grad_a, grad_b = self._factor_grads([low[i] for i in ix], s)
            for i, ga, gb in zip(ix, grad_a, grad_b):
                fgrads[2 * i], fgrads[2 * i + 1] = ga, gb
        new: dict[int, tuple] = {}
        for scale, ix in by_scale.items():
            pick = [j for i in ix for j in (2 * i, 2 * i + 1)]
            f, fs = self._inner.updated([factors[j] for j in pick], [fgrads[j] for j in pick],
                                        [states[j] for j in pick], lr * scale, foreach=group["foreach"],
                                        fused=group["fused"])
            for k, i in enumerate(ix):
                new[i] = (f[2 * k], f[2 * k + 1], fs[2 * k], fs[2 * k + 1])
        for ix in runs:
            ps = [low[i][0] for i in ix]
            if len(ix) == 1:
                st, (a, b, _, _) = self.state[ps[0]], new[ix[0]]
                write = self._rewrite(to_local(ps[0]), a, b, st["A"], to_local(st["B"]), s)
            else:
                write = self._rewrite_many(ps, [new[i] for i in ix], s)
            ups = []
            for p, i in zip(ps, ix):
                st, (a, b, inner_a, inner_b) = self.state[p], new[i]
                shard = row_shard(p)
                ups.append(dict(A=a, B=b if shard is None else like(b, shard), inner_A=inner_a,
                                inner_B=shard_state(inner_b, shard, b.shape), step=st["step"] + 1,
                                cycle_step=st["cycle_step"] + 1))
                if ups[-1]["cycle_step"] >= self._cycle_length(st, group):
                    ups[-1].update(self._reset(p, {**st, **ups[-1]}, group))
            self._commit_many(ps, write, ups)

    def _factor_grads(self, low: list[tuple[torch.Tensor, torch.Tensor]], s: float):
        """s B^T G and s G A^T of weights of one key: stacked products for several (lists of views), the plain
        ones for one. A row-sharded weight's A gradient sums over its ranks."""
        sts = [self.state[p] for p, _ in low]
        dtype = sts[0]["A"].dtype
        if len(low) == 1:
            g, a, b = low[0][1].to(dtype), sts[0]["A"], to_local(sts[0]["B"])
            grad_a, grad_b = [s * (b.T @ g)], [s * (g @ a.T)]
        else:
            g = dense_stack([g for _, g in low], dtype)
            a, b = torch.stack([st["A"] for st in sts]), torch.stack([to_local(st["B"]) for st in sts])
            grad_a = list(torch.bmm(b.mT, g).mul_(s).unbind(0))
            grad_b = list(torch.bmm(g, a.mT).mul_(s).unbind(0))
        for (p, _), ga in zip(low, grad_a):
            shard = row_shard(p)
            if shard is not None:
                all_reduce(ga, shard)
        return grad_a, grad_b

    def _rewrite_many(self, ps: list[torch.Tensor], new: list[tuple], s: float):
        """``_rewrite`` of weights of one key: the stacked products [B' - B, B] [A'; A' - A] computed now, added
        into the weights by one multi-tensor add (in the weights' dtype, from the factors' products)."""
        sts = [self.state[p] for p in ps]
        b_new, b_old = torch.stack([n[1] for n in new]), torch.stack([to_local(st["B"]) for st in sts])
        a_new, a_old = torch.stack([n[0] for n in new]), torch.stack([st["A"] for st in sts])
        left, right = torch.cat([b_new - b_old, b_old], 2), torch.cat([a_new, a_new - a_old], 1)
        deltas = list(torch.bmm(left, right).unbind(0))
        return functools.partial(torch._foreach_add_, [to_local(p) for p in ps], deltas, alpha=s)

    @staticmethod
    def _rewrite(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_old: torch.Tensor, b_old: torch.Tensor,
                 s: float):
        """The write of W <- W + s (B' A' - B A), as W + s [B' - B, B] [A'; A' - A]: one product of width 2r added
        into W in place (no m x n temporary) when W has the factors' dtype, else computed and cast first. Every
        term is exactly 0 where the factors did not move (an lr of 0 leaves W as it is), and the factors are
        copied here, so a reset that zeroes B' before the commit does not reach the write."""
        left, right = torch.cat([b - b_old, b_old], 1), torch.cat([a, a - a_old], 0)
        if w.dtype == left.dtype:
            return functools.partial(w.addmm_, left, right, alpha=s)
        return functools.partial(w.add_, (left @ right).mul_(s).to(w.dtype))

    def _reset(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """Merge-and-reinit as state entries: W already holds W_start + s B A; A redrawn, B <- 0, inner state
        pruned. ``state`` holds this step's new factors and states, which are the step's own (not committed
        yet), so they are changed in place."""
        count = {"seed": state["seed"], "draws": state["draws"]}
        gen = self._next_generator(count)  # drawn in every prune mode, so the count of draws does not depend on it
        out: dict[str, Any] = {}
        for name in ("A", "B"):
            key = f"inner_{name}"
            if group["prune"] == "reset":
                out[key] = self._inner.fresh(to_local(state[name]), foreach=group["foreach"], fused=group["fused"])
                out[key] = shard_state(out[key], row_shard(p) if name == "B" else None, to_local(state[name]).shape)
            else:
                prune_state_(state[key], state[name], group["prune_ratio"], group["prune"], gen)
        out["A"] = self._draw_a(p, count, group["rank"])
        to_local(state["B"]).zero_()
        out.update(cycle_step=0, resets=state["resets"] + 1, restarted=True, draws=count["draws"])
        return out
