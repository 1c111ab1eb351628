"""DLRA momentum: geometric heavy-ball and Adam on the fixed-rank manifold, as an optimizer."""
from __future__ import annotations

from typing import Any

import torch

from ..geometry.lowrank import retract, stabilize, tangent_project, transport
from .base import FactorOptimizer, _check_number, check_rank, factor_dtype, fill_args_doc
from .sharded import all_reduce, like, row_shard, to_local, tsqr

__all__ = ["DLRAMomentum", "METHODS"]

METHODS = ("heavy_ball", "adam")


@fill_args_doc
class DLRAMomentum(FactorOptimizer):
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

    def __init__(self, params: Any, lr: float = 1e-3, *, rank: int = 64, momentum: float = 0.9,
                 method: str = "heavy_ball", beta2: float = 0.999, rank_tol: float | None = None,
                 min_rank: int = 1, max_rank: int | None = None, stabilize_every: int = 0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 seed: int = 0, nonfinite: str = "skip"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, factorize=True, rank=rank,
                        momentum=momentum, method=method, beta2=beta2, rank_tol=rank_tol, min_rank=min_rank,
                        max_rank=max_rank, stabilize_every=stabilize_every)
        super().__init__(params, defaults, seed=seed, nonfinite=nonfinite)

    def _check_group(self, group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
        check_rank(group, factorized)
        if group["method"] not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {group['method']!r}")
        for key in ("momentum", "beta2"):
            _check_number(key, group[key], low=0.0)
            if group[key] >= 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {group[key]!r}")
        if group["rank_tol"] is not None:
            _check_number("rank_tol", group["rank_tol"], low=0.0)
            if group["rank_tol"] >= 1.0:
                raise ValueError(f"rank_tol must be in [0, 1), got {group['rank_tol']!r}")
        _check_number("min_rank", group["min_rank"], low=1, integer=True)
        if group["max_rank"] is not None:
            _check_number("max_rank", group["max_rank"], low=group["min_rank"], integer=True)
        _check_number("stabilize_every", group["stabilize_every"], low=0, integer=True)

    # ------------------------------------------------------------------ state
    def _steps_shard(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Row-sharded weights keep U's rows local (V, S replicated); see ``geometry.lowrank``."""
        return row_shard(p) is not None

    def _init_factor_state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        st = self.state[p]
        r = group["rank"]
        shard = row_shard(p)
        w = p.full_tensor() if shard is not None else p  # FSDP2: the one gather, for the starting SVD
        u, sigma, vh = torch.linalg.svd(w.detach().to(factor_dtype(p)), full_matrices=False)
        u = u[:, :r] if shard is None else u[shard.offset: shard.offset + shard.rows, :r]
        st.update(step=0, U=u.contiguous(), S=torch.diag(sigma[:r]), V=vh[:r].T.contiguous())
        zeros = [torch.zeros(r, r, dtype=u.dtype, device=u.device), torch.zeros_like(st["U"]),
                 torch.zeros_like(st["V"])]
        if shard is not None:
            st["U"], zeros[1] = like(st["U"], shard), like(zeros[1], shard)
        st["exp_avg"] = zeros
        if group["method"] == "adam":
            st["exp_avg_sq"] = torch.zeros(3, dtype=u.dtype, device=u.device)  # one per block: S, U, V parts

    def _check_loaded_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        for key in ("U", "S", "V", "exp_avg", "step"):
            if key not in state:
                raise ValueError(f"DLRA state of a {tuple(p.shape)} weight lacks {key!r}: "
                                 "the state_dict comes from another optimizer")
        m, n = p.shape
        r = state["S"].shape[0]
        if tuple(state["U"].shape) != (m, r) or tuple(state["V"].shape) != (n, r):
            raise ValueError(f"U, V of a {(m, n)} weight have shapes {tuple(state['U'].shape)}, "
                             f"{tuple(state['V'].shape)}: the state_dict comes from another model")

    # ------------------------------------------------------------------ step
    def _factor_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, beta, adam = group["lr"], group["momentum"], group["method"] == "adam"
        for p in params:
            st = self.state[p]
            shard = row_shard(p)  # FSDP2: U, xu and the gradient are this rank's rows
            reduce = (lambda t: all_reduce(t, shard)) if shard is not None else (lambda t: t)
            row_qr = (lambda x: tsqr(x, shard)) if shard is not None else None
            u, s, v = to_local(st["U"]), st["S"], st["V"]
            exp_avg = [to_local(x) for x in st["exp_avg"]]
            xi = tangent_project(u, v, to_local(p.grad).to(u.dtype), reduce)
            st["step"] += 1
            if adam:
                t, b2, eps = st["step"], group["beta2"], group["eps"]
                m = [mi.mul_(beta).add_(x, alpha=1 - beta) for mi, x in zip(exp_avg, xi)]
                means = torch.stack([x.square().sum() for x in xi])
                means[1] = reduce(means[1:2].clone())[0]  # xu's rows are spread over the ranks
                means /= torch.tensor([xi[0].numel(), p.shape[0] * xi[1].shape[1], xi[2].numel()], dtype=means.dtype,
                                      device=means.device)
                sq = st["exp_avg_sq"].mul_(b2).add_(means, alpha=1 - b2)
                c1, c2 = 1 - beta**t, 1 - b2**t
                denom = (sq / c2).sqrt().add_(eps)
                direction = tuple((mi / c1) / denom[i] for i, mi in enumerate(m))  # a scalar per block: still tangent
            else:
                direction = tuple(mi.mul_(beta).add_(x) for mi, x in zip(exp_avg, xi))
            if lr == 0:  # nothing moves (a schedule at zero): skip the retraction and its rounding
                continue
            r = s.shape[0]
            max_rank = group["max_rank"] if group["max_rank"] is not None else 2 * r
            u2, s2, v2 = retract(u, s, v, direction, lr, rank=r, rank_tol=group["rank_tol"],
                                 min_rank=group["min_rank"], max_rank=min(max_rank, *p.shape), row_qr=row_qr)
            if group["stabilize_every"] and st["step"] % group["stabilize_every"] == 0:
                u2, s2, v2 = stabilize(u2, s2, v2, row_qr=row_qr)
            exp_avg = list(transport(u, v, u2, v2, tuple(exp_avg), reduce))
            to_local(p).copy_((u2 @ s2 @ v2.T).to(p.dtype))
            if shard is not None:
                u2, exp_avg[1] = like(u2, shard), like(exp_avg[1], shard)
            st["exp_avg"] = exp_avg
            st["U"], st["S"], st["V"] = u2, s2, v2

    @property
    def ranks(self) -> list[int]:
        """Current rank of every factorized weight, in parameter order."""
        return [st["S"].shape[0] for g in self.param_groups for p in g["params"]
                if (st := self.state.get(p)) and "S" in st]
