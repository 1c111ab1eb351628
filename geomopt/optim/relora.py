"""ReLoRA: high-rank training through low-rank updates, as an optimizer."""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import FactorOptimizer, _check_number, check_rank, factor_dtype, fill_args_doc
from .sharded import all_reduce, is_dtensor, like, local_state, put_back, row_shard, to_local

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
    for v in moments.values():
        to_local(v).mul_(mask)


@fill_args_doc
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
    For frozen-base compute savings, keep peft LoRA layers and use ``geomopt.relora.merge_and_reinit``.

    Args:
<COMMON_ARGS>
    rank: r of the update in each cycle (<= min(m, n) of every routed weight).
    alpha: LoRA scale numerator; s = alpha / rank.
    reset_every: steps per cycle.
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

    def __init__(self, params: Any, lr: float = 1e-3, *, rank: int = 128, alpha: float = 32.0,
                 reset_every: int = 2000, prune_ratio: float = 0.99, prune: str = "magnitude",
                 warm_start_steps: int = 0, restart_warmup_steps: int = 100,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 inner: type = torch.optim.AdamW, inner_kwargs: dict[str, Any] | None = None,
                 seed: int = 0, nonfinite: str = "skip"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, factorize=True, rank=rank,
                        alpha=alpha, reset_every=reset_every, prune_ratio=prune_ratio, prune=prune,
                        warm_start_steps=warm_start_steps, restart_warmup_steps=restart_warmup_steps)
        super().__init__(params, defaults, inner=inner, inner_kwargs=inner_kwargs, seed=seed, nonfinite=nonfinite)

    def _check_group(self, group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
        check_rank(group, factorized)
        _check_number("alpha", group["alpha"], low=0.0, low_open=True)
        _check_number("reset_every", group["reset_every"], low=1, integer=True)
        _check_number("prune_ratio", group["prune_ratio"], low=0.0)
        if group["prune_ratio"] >= 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {group['prune_ratio']!r}")
        if group["prune"] not in PRUNE_MODES:
            raise ValueError(f"prune must be one of {PRUNE_MODES}, got {group['prune']!r}")
        _check_number("warm_start_steps", group["warm_start_steps"], low=0, integer=True)
        _check_number("restart_warmup_steps", group["restart_warmup_steps"], low=0, integer=True)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _next_generator(state: dict[str, Any]) -> torch.Generator:
        """A generator for the weight's next draw, seeded from its seed and the count of earlier draws: the
        state holds two ints instead of a generator's state (5 KB), and every rank and resumed run draws
        the same."""
        seed = (state["seed"] * 0x9E3779B97F4A7C15 + state["draws"] * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
        state["draws"] += 1
        return torch.Generator().manual_seed(seed)

    def _draw_a(self, p: torch.Tensor, state: dict[str, Any], rank: int) -> torch.Tensor:
        """Kaiming uniform with a = sqrt(5) on an (r x n) matrix: U(-1/sqrt(n), 1/sqrt(n))."""
        n = p.shape[1]
        a = (torch.rand(rank, n, generator=self._next_generator(state), dtype=torch.float64) * 2 - 1) / math.sqrt(n)
        return a.to(dtype=factor_dtype(p), device=p.device)

    def _init_factor_state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[p]
        state.update(step=0, cycle_step=0, resets=0, restarted=False, seed=self._param_seed(index), draws=0)
        if group["warm_start_steps"] > 0:
            state["inner_full"] = self._fresh_inner(p)
        else:
            self._start_low_rank(p, state, group)

    def _start_low_rank(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state.pop("inner_full", None)
        r = group["rank"]
        state["A"] = self._draw_a(p, state, r)
        shard = row_shard(p)
        if shard is None:
            state["B"] = torch.zeros(p.shape[0], r, dtype=factor_dtype(p), device=p.device)
        else:  # FSDP2: B's rows live with W's rows; A is replicated
            state["B"] = like(torch.zeros(shard.rows, r, dtype=factor_dtype(p), device=p.device), shard)
        state["inner_A"], state["inner_B"] = self._fresh_inner(state["A"]), self._fresh_inner(state["B"])

    def _check_loaded_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        for key in ("seed", "draws", "step", "cycle_step"):
            if key not in state:
                raise ValueError(f"ReLoRA state of a {tuple(p.shape)} weight lacks {key!r}: the state_dict comes "
                                 "from another optimizer (or from a geomopt version that saved a generator state)")
        if "A" in state:
            m, n = p.shape
            r = group["rank"]
            if tuple(state["A"].shape) != (r, n) or tuple(state["B"].shape) != (m, r):
                raise ValueError(f"A/B of a {(m, n)} weight have shapes {tuple(state['A'].shape)}, "
                                 f"{tuple(state['B'].shape)}; rank={r} needs {(r, n)}, {(m, r)}")

    # ------------------------------------------------------------------ step
    def _steps_shard(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Row-sharded weights step locally: dL/dB = s G A^T needs local rows only; dL/dA = s B^T G is
        all-reduced (r x n); W += s (B' A' - B A) is local again."""
        return row_shard(p) is not None

    def _lr_scale(self, state: dict[str, Any], group: dict[str, Any]) -> float:
        warm = group["restart_warmup_steps"]
        if not state["restarted"] or warm == 0:
            return 1.0
        return min(1.0, state["cycle_step"] / warm)

    def _factor_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        full = [p for p in params if "inner_full" in self.state[p]]
        if full:
            self._inner_step(group, full, [self.state[p]["inner_full"] for p in full], clear_grads=False)
            for p in full:
                st = self.state[p]
                st["step"] += 1
                if st["step"] >= group["warm_start_steps"]:
                    self._start_low_rank(p, st, group)
        low = [p for p in params if not any(p is q for q in full)]
        if not low:
            return
        s = group["alpha"] / group["rank"]
        by_scale: dict[float, tuple[list, list]] = {}
        old = []
        locals_ = []  # FSDP2 shards: B, its inner state and W are the local rows (views of the DTensors)
        for p in low:
            st = self.state[p]
            g = to_local(p.grad).to(st["A"].dtype)
            a, b = st["A"], to_local(st["B"])
            inner_b = local_state(st["inner_B"])
            locals_.append((b, inner_b))
            old.append(b @ a)
            b.grad = s * (g @ a.T)
            a.grad = s * (b.T @ g)
            shard = row_shard(p)
            if shard is not None:
                all_reduce(a.grad, shard)
            factors, states = by_scale.setdefault(self._lr_scale(st, group), ([], []))
            factors += [a, b]
            states += [st["inner_A"], inner_b]
        for scale, (factors, states) in by_scale.items():
            self._inner_step(group, factors, states, lr_scale=scale)
        for p, ba_old, (b, inner_b) in zip(low, old, locals_):
            st = self.state[p]
            put_back(st["inner_B"], inner_b, row_shard(p), b.shape)
            delta = (b @ st["A"] - ba_old).mul_(s)
            to_local(p).add_(delta.to(p.dtype))
            st["step"] += 1
            st["cycle_step"] += 1
            if st["cycle_step"] >= group["reset_every"]:
                self._reset(p, st, group)

    def _reset(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Merge-and-reinit: W already holds W_start + s B A; A redrawn, B <- 0, inner state pruned."""
        gen = self._next_generator(state)  # drawn in every prune mode, so the count of draws does not depend on it
        for name in ("A", "B"):
            if group["prune"] == "reset":
                self._reset_inner(state[f"inner_{name}"], state[name])
            else:
                prune_state_(state[f"inner_{name}"], state[name], group["prune_ratio"], group["prune"], gen)
        state["A"].copy_(self._draw_a(p, state, group["rank"]))
        to_local(state["B"]).zero_()
        state["cycle_step"] = 0
        state["resets"] += 1
        state["restarted"] = True
