"""DLRA momentum: geometric heavy-ball and Adam on the fixed-rank manifold, as an optimizer."""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from ..geometry.lowrank import retract, retract_qr, robust_svd, stabilize, tangent_project, transport
from ..geometry.qr import tall_qr
from ..grow.resize import old_mask, pad_dim
from ..nn.lowrank import lowrank_role
from . import state as layout
from .base import FactorOptimizer
from .batching import dense_stack, key_runs
from .checks import check_number, check_rank
from .dlra_layers import FactoredLayers
from .sharded import all_reduce, like, row_shard, to_local, tsqr
from .shared_args import base_args, common_args, group_defaults, shared_args
from .state import factor_dtype

__all__ = ["DLRAMomentum", "METHODS", "RETRACTIONS"]

METHODS = ("heavy_ball", "adam")
RETRACTIONS = ("svd", "qr")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The reduction over ranks of a weight that is not sharded: none."""
    return t


@shared_args
class DLRAMomentum(FactoredLayers, FactorOptimizer):
    r"""Momentum on the fixed-rank manifold (Schotthöfer, Klein, Kusch, arXiv 2506.17475).

    Every routed weight is held as :math:`W = U S V^\top` (U, V orthonormal, rank r), initialized from
    the truncated SVD of the weight at the first step. Each step:

    1. Riemannian gradient: the tangent projection
       :math:`\xi = P_W(G) = UU^\top G + G VV^\top - UU^\top G VV^\top`, kept in factored coordinates
       :math:`(U^\top G V,\ (I - UU^\top) G V,\ (I - VV^\top) G^\top U)`.
    2. Heavy-ball: :math:`M \leftarrow \beta M + \xi` (torch's SGD convention, no dampening), direction M.
       Adam: :math:`m \leftarrow \beta_1 m + (1-\beta_1)\xi` in tangent coordinates and, per coordinate
       block b in {S, U, V}, :math:`v_b \leftarrow \beta_2 v_b + (1-\beta_2)\,\mathrm{mean}(\xi_b^2)`;
       with bias correction the direction is :math:`\hat m_b / (\sqrt{\hat v_b} + \epsilon)`.
    3. Retraction of :math:`W - \mathrm{lr}\cdot\mathrm{direction}` through the augmented bases (QR of
       [U, K] and [V, L], SVD of the 2r x 2r core), truncated to rank r, or with ``rank_tol`` to the
       smallest rank whose discarded singular values have relative norm <= ``rank_tol``, clamped to
       [``min_rank``, ``max_rank``] (default max: 2 r, what the augmented basis holds).
    4. Momentum transport to the new tangent space by projection (factored, O((m + n) r^2)); W is
       rewritten as U S V^T in place. With lr = 0 (a schedule at zero) W and the factors stay as they are.

    Choices the paper does not fix (its code is not public): the momentum convention above; Adam's
    second moment is one scalar per coordinate block (S, U and V parts), which is invariant under the
    change of basis, needs no transport and keeps the direction tangent (a per-coordinate second moment
    is not basis-invariant, and transporting it by projection lets entries cancel: measured here to
    blow up a small quadratic at lr 3e-2); the weight
    is truncated to rank r at the first step (the state is created lazily; a step with lr = 0 and
    zero gradients creates it without touching W); no weight decay on the factors; U, S, V are
    fp32 for bf16/fp16 weights; ``stabilize_every`` re-orthonormalizes U and V by QR.

    Args:
<COMMON_ARGS_NO_INNER>
        rank: r, the rank of every routed weight (<= min(m, n)); with ``rank_tol`` the starting rank.
        momentum: beta of heavy-ball, or beta1 of Adam.
        method: ``"heavy_ball"`` or ``"adam"``.
        beta2: Adam's second-moment decay (``method="adam"``); Adam's epsilon is ``eps``.
        rank_tol, min_rank, max_rank: rank adaptivity (see 3. above); ``rank_tol=None`` keeps r fixed.
        stabilize_every: re-orthonormalize U, V every N steps (0: never).
        retraction: ``"svd"`` (default): 3. above, the best rank-r approximation of W - lr * direction, from thin
            QRs of m x 2r and n x 2r and a 2r x 2r SVD; ``"qr"``: a first-order retraction at fixed rank without the
            SVD (``geometry.lowrank.retract_qr``: thin QRs of m x r and n x r; S' not diagonal), which agrees with
            the SVD's to O(lr^2). With ``rank_tol``, ``"qr"`` needs ``svd_every``.
        svd_every: with ``retraction="qr"`` and ``rank_tol``: every N steps the SVD retraction runs, and the rank
            may change there.

    Example:
        >>> import torch, geomopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> opt = geomopt.DLRAMomentum(model, lr=1e-2, rank=4)
        >>> x, y = torch.randn(64, 16), torch.randn(64, 4)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     opt.step()
    """

    INNER_RULE = False  # its own momentum: no inner optimizer (``inner`` is not an argument)

    STATE_MARKER = "U"
    KEEPS_RANK = True
    TRAINED_KEYS = ("U", "S", "V")
    STRUCTURAL = ("method",)
    FIXED = ("rank",)
    ADDED_SETTINGS = ("retraction", "svd_every")

    def __init__(self, params: Any, lr: float = 1e-3, *, rank: int = 64, momentum: float = 0.9,
                 method: str = "heavy_ball", beta2: float = 0.999, rank_tol: float | None = None,
                 min_rank: int = 1, max_rank: int | None = None, stabilize_every: int = 0, retraction: str = "svd",
                 svd_every: int = 0, **common: Any):
        args = common_args(type(self), common)
        own = dict(rank=rank, momentum=momentum, method=method, beta2=beta2, rank_tol=rank_tol, min_rank=min_rank,
                   max_rank=max_rank, stabilize_every=stabilize_every, retraction=retraction, svd_every=svd_every)
        super().__init__(params, group_defaults(lr, args, own), **base_args(args))

    def _overwrites(self, group: dict[str, Any]) -> bool:
        return True  # W is rewritten as U S V^T

    def _check_group(self, group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
        check_rank(group, [p for p in factorized if lowrank_role(p) is None])  # a layer's factors: its own rank
        if group["method"] not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {group['method']!r}")
        for key in ("momentum", "beta2"):
            check_number(key, group[key], low=0.0)
            if group[key] >= 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {group[key]!r}")
        if group["rank_tol"] is not None:
            check_number("rank_tol", group["rank_tol"], low=0.0)
            if group["rank_tol"] >= 1.0:
                raise ValueError(f"rank_tol must be in [0, 1), got {group['rank_tol']!r}")
        check_number("min_rank", group["min_rank"], low=1, integer=True)
        if group["max_rank"] is not None:
            check_number("max_rank", group["max_rank"], low=group["min_rank"], integer=True)
        check_number("stabilize_every", group["stabilize_every"], low=0, integer=True)
        if group.get("retraction", "svd") not in RETRACTIONS:
            raise ValueError(f"retraction must be one of {RETRACTIONS}, got {group['retraction']!r}")
        check_number("svd_every", group.get("svd_every", 0), low=0, integer=True)
        if group.get("retraction") == "qr" and group["rank_tol"] is not None and not group.get("svd_every"):
            raise ValueError("rank_tol adapts the rank in the SVD retraction: with retraction='qr' pass svd_every >= 1 "
                             f"(got {group.get('svd_every')!r}), or retraction='svd'")

    # ------------------------------------------------------------------ state
    def _steps_shard(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Row-sharded weights keep U's rows local (V, S replicated); see ``geometry.lowrank``."""
        return row_shard(p) is not None

    def _is_factor_state(self, st: dict[str, Any]) -> bool:
        return "U" in st or "factored" in st  # a dense weight's factors, or a LowRankLinear's factor

    def _init_factor_state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        part = self._part_state(p, group)
        self.state[p].update(part if part is not None else self._factors_of(p, group["rank"], group["method"]))

    def _factors_of(self, p: torch.Tensor, r: int, method: str) -> dict[str, Any]:
        """U, S, V of the truncated SVD of the weight as it is, zero momentum, step 0."""
        shard = row_shard(p)
        w = p.full_tensor() if shard is not None else p  # FSDP2: the one gather, for the starting SVD
        u, sigma, vh = robust_svd(w.detach().to(factor_dtype(p)), full_matrices=False)
        u = u[:, :r] if shard is None else u[shard.offset: shard.offset + shard.rows, :r]
        st: dict[str, Any] = dict(step=0, U=u.contiguous(), S=torch.diag(sigma[:r]), V=vh[:r].T.contiguous())
        st.update(self._zero_momentum(st, method, shard))
        if shard is not None:
            st["U"] = like(st["U"], shard)
        return st

    @staticmethod
    def _zero_momentum(st: dict[str, Any], method: str, shard: Any) -> dict[str, Any]:
        u, r = to_local(st["U"]), st["S"].shape[0]
        zeros = [torch.zeros(r, r, dtype=u.dtype, device=u.device), torch.zeros_like(u), torch.zeros_like(st["V"])]
        if shard is not None:
            zeros[1] = like(zeros[1], shard)
        out: dict[str, Any] = dict(exp_avg=zeros, step=0)
        if method == "adam":
            out["exp_avg_sq"] = torch.zeros(3, dtype=u.dtype, device=u.device)  # one per block: S, U, V parts
        return out

    @torch.no_grad()
    def _resize_factors(self, p: torch.Tensor, st: dict[str, Any], group: dict[str, Any], resize: Any,
                        growth: Any) -> None:
        """The rank stays. U and V gain rows (random where the transform leaves new entries arbitrary, zero where
        it needs them zero) and are re-orthonormalized, their triangular factors absorbed into S, so the old
        entries of U S V^T are the old weight (times the transform's scale) and the new ones lie on the rank-r
        manifold; the weight's new entries are set from the factors. The momentum is zero-padded and carried to
        the new tangent space."""
        m, n = p.shape
        u, s, v = st["U"], st["S"], st["V"]
        rank, maps = s.shape[0], resize.maps
        bases = []
        for basis, dim, size in ((u, 0, m), (v, 1, n)):
            fresh = None
            if maps[dim] is not None and resize.fills[dim] != "zero" and growth.init == "random":
                fresh = torch.randn(size, rank, generator=growth.gen, dtype=torch.float64).to(basis) / math.sqrt(size)
            padded = pad_dim(basis, 0, maps[dim], size, fresh)
            bases.append((padded, *tall_qr(padded)))
        (u_pad, u_new, ru), (v_pad, v_new, rv) = bases
        keep = old_mask(tuple(p.shape), maps, p.device)
        p.copy_(torch.where(keep, p, (u_pad @ (s * resize.scale) @ v_pad.T).to(p.dtype)))
        xs, xu, xv = st["exp_avg"]
        u0, v0 = pad_dim(u, 0, maps[0], m), pad_dim(v, 0, maps[1], n)
        moved = (xs, pad_dim(xu, 0, maps[0], m), pad_dim(xv, 0, maps[1], n))
        st["exp_avg"] = list(transport(u0, v0, u_new, v_new, moved))
        st["U"], st["S"], st["V"] = u_new, ru @ (s * resize.scale) @ rv.T, v_new

    def _rebuild(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        """A new ``method``: the momentum of the other method means something else, so it restarts at zero."""
        st.pop("exp_avg_sq", None)
        part = self._part_state(p, group)
        st.update(part if part is not None else self._zero_momentum(st, group["method"], row_shard(p)))

    def _rebase(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        """The weight changed outside the optimizer: factors of the weight as it is, at the current rank (the next
        write is its rank-r truncation, as the first step's is)."""
        st.pop("exp_avg_sq", None)
        st.update(self._factors_of(p, st["S"].shape[0], group["method"]))

    def _state_layout(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
        part = self._part_layout(p, group)
        if part is not None:
            return part
        m, n = p.shape
        s = st.get("S")
        r = s.shape[0] if isinstance(s, torch.Tensor) and s.dim() == 2 else group["rank"]
        out: dict[str, Any] = dict(U=layout.Floats((m, r)), S=layout.Floats((r, r)), V=layout.Floats((n, r)),
                                   exp_avg=layout.FloatsList([(r, r), (m, r), (n, r)]), step=layout.Count(),
                                   built_with=layout.Optional(layout.Settings()))
        if group["method"] == "adam":
            out["exp_avg_sq"] = layout.Floats((3,))
        return out

    # ------------------------------------------------------------------ step
    def _factor_step(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                     lr: float) -> None:
        """Weight by weight, or on the multi-tensor path (``_together``) the weights of one shape, dtype, rank
        and step count stacked (``_step_many``: one batched call per stage); rank adaptivity (``rank_tol``) and
        row-sharded weights step alone; the factors of ``LowRankLinear`` layers three by three (``_step_layers``)."""
        layers = self._layers(group)
        if layers:
            self._step_layers(group, {id(p): g for p, g in zip(params, grads) if id(p) in layers}, lr)
            pairs = [(p, g) for p, g in zip(params, grads) if id(p) not in layers]
            params, grads = [p for p, _ in pairs], [g for _, g in pairs]

        def key(i: int) -> Any:
            p, st = params[i], self.state[params[i]]
            if group["rank_tol"] is not None or row_shard(p) is not None:
                return i
            return (tuple(p.shape), p.dtype, st["U"].dtype, p.device, st["S"].shape[0], st["step"])

        keys = [key(i) for i in range(len(params))]
        for run in key_runs(keys, [p.numel() for p in params], self._together(group, params)):
            if len(run) == 1:
                self._step_one(params[run[0]], grads[run[0]], group, lr)
            else:
                self._step_many([params[i] for i in run], [grads[i] for i in run], group, lr)

    def _step_many(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any],
                   lr: float) -> None:
        """``_step_one`` of weights of one shape, dtype, rank and step count, their factors and momenta stacked:
        the projection, the direction, the retraction (QR, SVD), the transport and U S V^T are one batched call
        each; the new weights are written by one multi-tensor copy."""
        sts = [self.state[p] for p in params]
        u, s, v = (torch.stack([st[k] for st in sts]) for k in ("U", "S", "V"))
        stacked = dict(step=sts[0]["step"], exp_avg=[torch.stack([st["exp_avg"][j] for st in sts]) for j in range(3)])
        if "exp_avg_sq" in sts[0]:
            stacked["exp_avg_sq"] = torch.stack([st["exp_avg_sq"] for st in sts])
        xi = tangent_project(u, v, dense_stack(grads, u.dtype))
        direction, new = self._direction(xi, stacked, group, params[0].shape[0], _local)
        write = None
        if lr != 0:  # else nothing moves (a schedule at zero): no retraction and its rounding
            u2, s2, v2, exp_avg = self._move(u, s, v, direction, new, group, lr, params[0].shape)
            new.update(exp_avg=exp_avg, U=u2, S=s2, V=v2)
            weights = torch.bmm(u2 @ s2, v2.mT).to(params[0].dtype)
            write = functools.partial(torch._foreach_copy_, [to_local(p) for p in params], list(weights.unbind(0)))
        parts = {k: (list(zip(*(x.unbind(0) for x in val))) if k == "exp_avg" else val.unbind(0))
                 for k, val in new.items() if k != "step"}  # one view op per stacked tensor, not per weight
        ups = [dict(step=new["step"], **{k: (list(x[i]) if k == "exp_avg" else x[i]) for k, x in parts.items()})
               for i in range(len(params))]
        self._commit_many(params, write, ups)
        if write is not None and not any(id(p) in self._origin for p in params):
            self._edits.record_stacked(params, weights)  # the fingerprints from what was written

    @staticmethod
    def _move(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, direction: tuple, new: dict[str, Any],
              group: dict[str, Any], lr: float, shape: tuple[int, ...], row_qr: Any = None, reduce: Any = _local):
        """The retraction of ``lr * direction`` (re-orthonormalized when ``stabilize_every`` is due at ``new``'s
        step) and ``new``'s momentum transported to the new tangent space: (U', S', V', momentum). One weight, or
        weights of one rank stacked (``rank_tol`` None); ``row_qr`` / ``reduce``: a row-sharded weight's."""
        r = s.shape[-1]
        max_rank = group["max_rank"] if group["max_rank"] is not None else 2 * r
        every = group.get("svd_every", 0)
        if group.get("retraction", "svd") == "qr" and not (group["rank_tol"] is not None and new["step"] % every == 0):
            u2, s2, v2 = retract_qr(u, s, v, direction, lr, row_qr=row_qr, reduce=reduce)
        else:
            u2, s2, v2 = retract(u, s, v, direction, lr, rank=r, rank_tol=group["rank_tol"],
                                 min_rank=group["min_rank"], max_rank=min(max_rank, *shape), row_qr=row_qr)
        if group["stabilize_every"] and new["step"] % group["stabilize_every"] == 0:
            u2, s2, v2 = stabilize(u2, s2, v2, row_qr=row_qr)
        return u2, s2, v2, list(transport(u, v, u2, v2, tuple(new["exp_avg"]), reduce))

    def _direction(self, xi: tuple, st: dict[str, Any], group: dict[str, Any], m_rows: int, reduce: Any):
        """(direction, new momentum entries) from the tangent gradient ``xi``, out of place."""
        beta, step = group["momentum"], st["step"] + 1
        exp_avg = [to_local(x) for x in st["exp_avg"]]
        if group["method"] != "adam":
            m = [mi * beta + x for mi, x in zip(exp_avg, xi)]
            return tuple(m), dict(exp_avg=m, step=step)
        b2, eps = group["beta2"], group["eps"]
        m = [torch.add(mi * beta, x, alpha=1 - beta) for mi, x in zip(exp_avg, xi)]
        means = torch.stack([x.square().sum((-2, -1)) for x in xi], -1)  # (3,), or (L, 3) for stacked weights
        means[..., 1] = reduce(means[..., 1:2].clone())[..., 0]  # xu's rows are spread over the ranks
        r = xi[0].shape[-1]
        means /= torch.tensor([r * r, m_rows * r, xi[2].shape[-2] * r], dtype=means.dtype, device=means.device)
        sq = torch.add(st["exp_avg_sq"] * b2, means, alpha=1 - b2)
        c1, c2 = 1 - beta**step, 1 - b2**step
        denom = (sq / c2).sqrt().add_(eps)
        scales = denom[..., None, None].unbind(-3)  # per block a scalar (per stacked weight): still tangent
        direction = tuple((mi / c1) / d for mi, d in zip(m, scales))
        return direction, dict(exp_avg=m, exp_avg_sq=sq, step=step)

    def _step_one(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any], lr: float) -> None:
        st = self.state[p]
        shard = row_shard(p)  # FSDP2: U, xu and the gradient are this rank's rows
        reduce = (lambda t: all_reduce(t, shard)) if shard is not None else _local
        row_qr = (lambda x: tsqr(x, shard)) if shard is not None else None
        u, s, v = to_local(st["U"]), st["S"], st["V"]
        xi = tangent_project(u, v, g.to(u.dtype), reduce)
        direction, updates = self._direction(xi, st, group, p.shape[0], reduce)
        if lr == 0:  # nothing moves (a schedule at zero): skip the retraction and its rounding
            if shard is not None:
                updates["exp_avg"][1] = like(updates["exp_avg"][1], shard)
            self._commit(p, None, updates)
            return
        u2, s2, v2, exp_avg = self._move(u, s, v, direction, updates, group, lr, p.shape, row_qr, reduce)
        target, us = to_local(p), u2 @ s2
        if target.dtype == us.dtype and target.is_contiguous():  # the product written into W itself, in the commit
            write = functools.partial(torch.mm, us, v2.T, out=target)
        else:
            write = functools.partial(target.copy_, us @ v2.T)
        if shard is not None:
            u2, exp_avg[1] = like(u2, shard), like(exp_avg[1], shard)
        updates.update(exp_avg=exp_avg, U=u2, S=s2, V=v2)
        self._commit(p, write, updates)

    @property
    def ranks(self) -> list[int]:
        """Current rank of every factorized weight, in parameter order, then of every ``LowRankLinear``."""
        return [st["S"].shape[0] for g in self.param_groups for p in g["params"]
                if (st := self.state.get(p)) and "S" in st] + self._layer_ranks()
