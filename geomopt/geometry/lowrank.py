"""The fixed-rank manifold {W = U S V^T : U^T U = I, V^T V = I}, torch reference (DLRA momentum).

Every function takes leading batch dimensions too (weights of one shape and rank stacked: one batched call each);
rank adaptivity (``rank_tol``) works on one weight at a time.

A tangent vector at W = U S V^T is stored in factored coordinates (xs, xu, xv), xs: r x r, xu: m x r, xv: n x r::

    xi = U xs V^T + xu V^T + U xv^T,   U^T xu = 0,   V^T xv = 0

so nothing m x n is formed except the dense gradient itself.

Row-sharded use (FSDP2): U, xu and G may be this rank's rows only, V and S replicated. Every product that
sums over the m rows then goes through ``reduce`` (an all-reduce sum; by default nothing), and the QR of the
tall [U, xu] through ``row_qr`` (a TSQR), so no m x n or m x r tensor is ever gathered.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from .dispatch import call

__all__ = ["robust_svd", "tangent_project", "tangent_to_dense", "transport", "retract", "retract_qr", "truncation_rank",
           "check_point", "stabilize"]

Tangent = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def tangent_project(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, reduce: Reduce = _same) -> Tangent:
    """P_W(G) = U U^T G + G V V^T - U U^T G V V^T in coordinates: (U^T G V, (I - UU^T) G V, (I - VV^T) G^T U)."""
    gv = g @ v
    xs = reduce(u.mT @ gv)
    xu = gv - u @ xs
    xv = reduce(g.mT @ u) - v @ xs.mT
    return xs, xu, xv


def tangent_to_dense(u: torch.Tensor, v: torch.Tensor, xi: Tangent) -> torch.Tensor:
    """The m x n matrix of a tangent vector (for tests and references)."""
    xs, xu, xv = xi
    return u @ xs @ v.mT + xu @ v.mT + u @ xv.mT


def transport(u: torch.Tensor, v: torch.Tensor, u_new: torch.Tensor, v_new: torch.Tensor, xi: Tangent,
              reduce: Reduce = _same) -> Tangent:
    """Projection transport: P_{W_new}(xi) for a tangent vector xi at W, in the new coordinates.

    O((m + n) r^2); the ranks of W and W_new may differ.
    """
    xs, xu, xv = xi
    a = reduce(u_new.mT @ u)  # r' x r
    b = v.mT @ v_new  # r x r'
    xi_v = u @ (xs @ b) + xu @ b + u @ (xv.mT @ v_new)  # xi V'      (m x r')
    xi_u = v @ (xs.mT @ a.mT) + v @ reduce(xu.mT @ u_new) + xv @ a.mT  # xi^T U'  (n x r')
    s_new = reduce(u_new.mT @ xi_v)
    return s_new, xi_v - u_new @ s_new, xi_u - v_new @ s_new.mT


def robust_svd(x: torch.Tensor, full_matrices: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd``, computed again in float64 (the factors cast back) where the single-precision driver
    fails to converge: MKL's sgesdd does on cores with many near-zero singular values, which DLRA's first steps at a
    small lr give (a 256 x 256 core with 113 singular values under 1e-6 on the ``350m`` shape at rank 128,
    lr 1e-4, one thread)."""
    try:
        return torch.linalg.svd(x, full_matrices=full_matrices)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        out = torch.linalg.svd(x.to(torch.float64), full_matrices=full_matrices)
        return tuple(t.to(x.dtype) for t in out)  # type: ignore[return-value]


def truncation_rank(sigma: torch.Tensor, rank: int, rank_tol: float | None, min_rank: int, max_rank: int) -> int:
    """Fixed ``rank`` when ``rank_tol`` is None; else the smallest r' whose discarded tail has
    ||sigma[r':]|| <= rank_tol * ||sigma||, clamped to [min_rank, max_rank]."""
    if rank_tol is None:
        return min(rank, sigma.shape[-1])
    tail = sigma.flip(0).square().cumsum(0).flip(0).sqrt()  # tail[i] = ||sigma[i:]||
    ok = (tail <= rank_tol * sigma.norm()).nonzero()
    r = int(ok[0]) if ok.numel() else sigma.numel()
    return max(min_rank, min(r, max_rank, sigma.numel()))


def retract(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, xi: Tangent, step: float, *, rank: int,
            rank_tol: float | None = None, min_rank: int = 1, max_rank: int | None = None,
            row_qr: Callable | None = None) -> Tangent:
    """Metric-projection retraction of W - step * xi onto the low-rank manifold.

    W - step xi = [U, xu] C [V, xv]^T with C = [[S - step xs, -step I], [-step I, 0]]; QR of the
    augmented bases, SVD of the 2r x 2r core, truncation. Returns (U', S', V') with S' diagonal: the
    best rank-r' approximation of W - step xi (exact, since that matrix has rank <= 2r).
    """
    xs, xu, xv = xi
    r = s.shape[-1]
    if s.dim() > 2 and rank_tol is not None:
        raise ValueError(f"rank_tol={rank_tol!r}: rank adaptivity takes one weight at a time, got a batch of shape "
                         f"{tuple(s.shape)}")
    qu, ru = (row_qr or functools.partial(call, "tall_qr"))(torch.cat([u, xu], dim=-1))
    qv, rv = call("tall_qr", torch.cat([v, xv], dim=-1))
    eye = torch.eye(r, dtype=s.dtype, device=s.device)
    eye = eye.expand_as(s) if s.dim() > 2 else eye
    core = torch.cat([torch.cat([s - step * xs, -step * eye], -1),
                      torch.cat([-step * eye, torch.zeros_like(s)], -1)], -2)
    p, sigma, qt = robust_svd(ru @ core @ rv.mT)
    k = truncation_rank(sigma, rank, rank_tol, min_rank, max_rank if max_rank is not None else 2 * r)
    return qu @ p[..., :k], torch.diag_embed(sigma[..., :k]), qv @ qt[..., :k, :].mT


def retract_qr(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, xi: Tangent, step: float,
               row_qr: Callable | None = None, reduce: Reduce = _same) -> Tangent:
    """A first-order retraction of W - step * xi at fixed rank without an SVD: with A = S - step xs, the new bases
    span K = U A - step xu and L = V A^T - step xv (thin QRs of m x r and n x r, where ``retract`` takes m x 2r and
    n x 2r and a 2r x 2r SVD), and S' = U'^T (W - step xi) V', formed from r x r products:

        U' = qr(K), V' = qr(L), S' = (U'^T U) A (V^T V') - step (U'^T xu)(V^T V') - step (U'^T U)(xv^T V')

    W' = U' S' V'^T is the projection of W - step xi onto the span of U' and V', which differs from ``retract``'s
    (the best rank-r approximation) by O(step^2). S' is not diagonal."""
    xs, xu, xv = xi
    a = s - step * xs
    qu, _ = (row_qr or functools.partial(call, "tall_qr"))(u @ a - step * xu)
    qv, _ = call("tall_qr", v @ a.mT - step * xv)
    uu, uxu = reduce(qu.mT @ u), reduce(qu.mT @ xu)  # sums over the m rows
    vv = v.mT @ qv
    return qu, uu @ a @ vv - step * (uxu @ vv) - step * (uu @ (xv.mT @ qv)), qv


def check_point(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, tol: float = 1e-5, explain: bool = False):
    """Whether (U, S, V) is a point of the manifold: orthonormal U, V (to ``tol``), matching shapes.

    With ``explain``, returns (ok, reason) like geoopt's ``check_point``.
    """
    reason = None
    r = s.shape[0]
    if u.shape[1] != r or v.shape[1] != r or s.shape != (r, r):
        reason = f"shapes U {tuple(u.shape)}, S {tuple(s.shape)}, V {tuple(v.shape)} do not match"
    else:
        eye = torch.eye(r, dtype=u.dtype, device=u.device)
        eu, ev = float((u.T @ u - eye).abs().max()), float((v.T @ v - eye).abs().max())
        if max(eu, ev) > tol:
            reason = f"U^T U - I = {eu:.1e}, V^T V - I = {ev:.1e} exceed {tol:.0e}"
    return (reason is None, reason) if explain else reason is None


def stabilize(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, row_qr: Callable | None = None) -> Tangent:
    """Re-orthonormalize U and V against numerical drift (QR), absorbing R factors into S: same W."""
    qu, ru = (row_qr or functools.partial(call, "tall_qr"))(u)
    qv, rv = call("tall_qr", v)
    return qu, ru @ s @ rv.mT, qv
