"""Cayley and Cayley-Neumann maps from packed skew generators to (near-)orthogonal blocks.

These are the torch reference implementations; ``geomopt.geometry.dispatch`` may route CUDA tensors
to fused kernels with the same signature.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .skew import _triu_flat_pair, bound_from_powers, skew_norm_bound, unpack_skew

__all__ = ["cayley_exact", "cayley_neumann", "cayley_neumann_horner", "cayley_neumann_with_bound", "cayley_series",
           "rotation_inverse", "normal_inverse", "newton_schulz_inverse", "newton_schulz_iterations"]


def _eye(b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(b, dtype=like.dtype, device=like.device)


def cayley_neumann(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    r"""Cayley-Neumann parameterization (POET, arXiv 2506.08001, Sec. 3.3).

    .. math:: R(Q) = (I + Q)\,(I + Q + Q^2 + \dots + Q^k),\qquad k = \text{terms}

    ``q``: (n_blocks, b(b-1)/2) packed skew generators. Returns (n_blocks, b, b). It differs from the
    exact Cayley map by O(||Q||^(k+1)); ``R^T R = (I - Q^{k+1})(I - (-Q)^{k+1})``, so its orthogonality
    error is O(||Q||^(k+1)) for odd k and O(||Q||^(2k+2)) for even k. Differentiable in ``q``.

    For k <= 5 the polynomial is evaluated in powers of the symmetric :math:`Y = Q^2` (``_SkewPoly``), with a
    backward written by hand that uses the symmetry: 3 batched products forward and 6 backward for k = 5,
    where Horner's scheme through autograd takes 5 and 10. Larger k use Horner's scheme
    (``cayley_neumann_horner``). Both evaluate the same polynomial (equal up to rounding).
    """
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    if terms <= _SkewPoly.MAX_TERMS:
        lead = q.shape[:-1]
        return _SkewPoly.apply(q.reshape(-1, q.shape[-1]), b, terms).view(*lead, b, b)
    return cayley_neumann_horner(q, b, terms)


def cayley_neumann_horner(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    """The Cayley-Neumann map by Horner's scheme, S = I + Q (I + Q (I + ...)), R = S + Q S (k products),
    differentiated by autograd: the plain form of ``cayley_neumann``, for any k."""
    Q = unpack_skew(q, b)
    eye = _eye(b, q)
    s = eye + Q
    for _ in range(terms - 1):
        s = eye + Q @ s
    return s + Q @ s


def cayley_series(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    r"""The Cayley map's Neumann series truncated after :math:`Q^{k-1}` (``neumann_form="series"``):

    .. math:: R(Q) = I + 2\,(Q + Q^2 + \dots + Q^{k-1}),\qquad k = \text{terms} \ge 2

    The convention of the official POET code's torch fallback (k = 5: :math:`I + 2(Q + Q^2 + Q^3 + Q^4)`) and of
    peft's OFT. ``cayley_neumann`` with the same k has one more power: :math:`(I + Q)(I + \dots + Q^k) = I + 2(Q +
    \dots + Q^k) + Q^{k+1}`. Since :math:`R = (I - Q)^{-1}(I + Q) - 2 Q^k (I - Q)^{-1}` and
    :math:`\|(I - Q)^{-1}\|_2 \le 1` for a skew Q, its orthogonality error is at most :math:`4 c^k + 4 c^{2k}`
    for :math:`\|Q\|_2 \le c`. Horner's scheme, differentiated by autograd."""
    if terms < 2:
        raise ValueError(f"terms must be >= 2 for the series form, got {terms}")
    Q = unpack_skew(q, b)
    eye = _eye(b, q)
    s = Q
    for _ in range(terms - 2):
        s = Q @ (eye + s)
    return eye + 2.0 * s


class _SkewPoly(torch.autograd.Function):
    r"""R = p(Q), p(x) = (1 + x)(1 + x + ... + x^k), for skew Q, in powers of Y = Q^2 (symmetric, commuting with Q).

    Odd k: :math:`1 + x + \dots + x^k = (1 + x)\,T(x^2)` with :math:`T(y) = 1 + y + \dots + y^{(k-1)/2}`, so
    :math:`R = A\,T(Y)`, :math:`A = (I + Q)^2 = I + 2Q + Y`. Even k: :math:`R = E(Y) + Q\,O(Y)`, the even and odd
    coefficients of p. Backward: :math:`dA = G T`, :math:`dT = A^\top G` (T, O, Y symmetric); through
    :math:`Y^2 = Y Y`, :math:`dY \mathrel{+}= H Y + Y H`; through :math:`Y = Q Q`, :math:`dQ \mathrel{-}= dY\,Q + Q\,dY`
    (:math:`Q^\top = -Q`); packed, :math:`dq_{ij} = dQ_{ij} - dQ_{ji}` (i < j).
    """

    MAX_TERMS = 5

    @staticmethod
    def forward(ctx, q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
        r, saved, _ = _skew_poly(unpack_skew(q, b), b, terms)
        ctx.save_for_backward(*saved)
        ctx.b, ctx.terms = b, terms
        return r

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        Q, y, second, t = ctx.saved_tensors
        terms = ctx.terms
        h2 = None  # dL/d(Y^2)
        if terms % 2:
            a = second
            d_a = grad if t is None else grad @ t
            d_q = 2.0 * d_a
            d_y = d_a
            if t is not None:
                d_t = a.transpose(-2, -1) @ grad
                d_y = d_y + d_t
                h2 = d_t if terms == 5 else None
        else:
            e, o = _even_odd(terms)
            d_q = grad @ second  # G O(Y)^T, O(Y) symmetric
            d_o = Q.transpose(-2, -1) @ grad
            d_y = torch.add(e[1] * grad, d_o, alpha=o[1])
            h2 = torch.add(e[2] * grad, d_o, alpha=o[2]) if terms == 4 else None
        if h2 is not None:
            d_y = torch.baddbmm(torch.baddbmm(d_y, h2, y), y, h2)
        d_q = torch.baddbmm(torch.baddbmm(d_q, d_y, Q, alpha=-1.0), Q, d_y, alpha=-1.0)
        return _pack_antisym(d_q, ctx.b), None, None


def _skew_poly(Q: torch.Tensor, b: int, terms: int, need_y2: bool = False) -> tuple:
    """``_SkewPoly``'s forward on an unpacked batch Q (1 <= terms <= 5): (R, what the backward needs, Y^2 or None;
    Y^2 is formed when the map needs it or ``need_y2``)."""
    eye = _eye(b, Q)
    y = Q @ Q
    y2 = y @ y if terms in (4, 5) or need_y2 else None
    if terms % 2:  # T = I (k = 1), I + Y (k = 3), I + Y + Y^2 (k = 5)
        eye_y = eye + y
        a = torch.add(eye_y, Q, alpha=2.0)
        t = None if terms == 1 else eye_y if terms == 3 else eye_y + y2
        return (a if t is None else a @ t), (Q, y, a, t), y2
    e, o = _even_odd(terms)  # E, O of degree 1 (k = 2) or 2 (k = 4); coefficients 1 or 2, so alpha is exact
    poly_e, poly_o = torch.add(e[0] * eye, y, alpha=e[1]), torch.add(o[0] * eye, y, alpha=o[1])
    if terms == 4:
        poly_e, poly_o = poly_e.add_(y2, alpha=e[2]), poly_o.add_(y2, alpha=o[2])
    return torch.baddbmm(poly_e, Q, poly_o), (Q, y, poly_o, None), y2


def cayley_neumann_with_bound(q: torch.Tensor, b: int, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cayley_neumann(q, b, terms), skew_norm_bound(q, b))`` for a batch (n_blocks, b(b-1)/2), not differentiable.
    For k <= 5 the bound's Q^4 is the map's Y^2, so the pair costs about what the map alone does."""
    q = q.detach()
    if terms > _SkewPoly.MAX_TERMS or b < 2 or q.dim() != 2:
        return cayley_neumann(q, b, terms), skew_norm_bound(q, b)
    Q = unpack_skew(q, b)
    r, _, y2 = _skew_poly(Q, b, terms, need_y2=True)
    return r, bound_from_powers(q, Q, y2)


def _pack_antisym(d: torch.Tensor, b: int) -> torch.Tensor:
    """dq[i < j] = d[i, j] - d[j, i]: the gradient of ``unpack_skew`` for upstream gradient d."""
    flat = d.reshape(*d.shape[:-2], b * b)
    upper, lower = _triu_flat_pair(b, d.device)
    return flat.index_select(-1, upper) - flat.index_select(-1, lower)


def _even_odd(terms: int) -> tuple[list[float], list[float]]:
    """Coefficients of E(y), O(y) (constant first, padded to 3) with p(x) = E(x^2) + x O(x^2)."""
    c = [1.0] + [2.0] * terms + [1.0]
    e, o = c[0::2], c[1::2]
    return (e + [0.0] * 3)[:3], (o + [0.0] * 3)[:3]


def cayley_exact(q: torch.Tensor, b: int) -> torch.Tensor:
    r"""Exact Cayley map :math:`R = (I - Q)^{-1}(I + Q)`, orthogonal for every skew Q.

    Computed without a pivoted LU: rational functions of Q commute, so :math:`R = A^{-1}(I + Q)^2` with
    :math:`A = (I - Q)(I + Q) = I + Q^\top Q`, symmetric positive definite with eigenvalues in
    :math:`[1, 1 + \|Q\|_2^2]`: a batched Cholesky factorization, which cannot fail for it (no error check, so no
    host read), and two triangular solves."""
    Q = unpack_skew(q, b)
    eye = _eye(b, q)
    plus = eye + Q
    chol, _ = torch.linalg.cholesky_ex(eye + Q.transpose(-2, -1) @ Q)
    return torch.cholesky_solve(plus @ plus, chol)


def rotation_inverse(d: torch.Tensor, max_iters: int = 12) -> torch.Tensor:
    r"""Inverse of a batch of near-orthogonal blocks (n_blocks, b, b): Newton-Schulz from the transpose.

    .. math:: X_0 = D^\top,\qquad X_{j+1} = X_j + X_j (I - D X_j)

    The residual :math:`I - D X_j` squares every iteration, and it starts at :math:`I - D D^\top`, which is
    O(||Q||^(k+1)) for the Cayley-Neumann map (rounding for the exact map): one or two iterations of two
    batched products reach the inverse to rounding, where an LU inverse of many small blocks costs far more.
    Iterates until the largest residual entry, squared, is below the dtype's epsilon (a host read per
    iteration); a batch that does not converge in ``max_iters`` (a block far from orthogonal) is inverted by
    ``normal_inverse`` (no pivoted LU). ``newton_schulz_inverse`` runs a fixed number of iterations with no host
    read.
    """
    if d.shape[-1] == 0 or d.numel() == 0:
        return d.clone()
    if d.dim() != 3:
        return rotation_inverse(d.reshape(-1, *d.shape[-2:]), max_iters).view(d.shape)
    eps = torch.finfo(d.dtype).eps
    eye = _eye(d.shape[-1], d)
    x = d.transpose(-2, -1)
    for _ in range(max_iters):
        res = torch.baddbmm(eye.expand_as(d), d, x, alpha=-1.0)
        worst = float(res.abs().amax())
        if not worst < 1.0:  # diverging (or NaN): not near-orthogonal
            break
        x = torch.baddbmm(x, x, res)
        if worst * worst <= eps:
            return x
    return normal_inverse(d)


def normal_inverse(d: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of square blocks (n_blocks, b, b) from the normal equations, D^-1 = (D^T D)^-1 D^T, by
    a batched Cholesky factorization of D^T D (symmetric positive definite for a nonsingular D): no pivoted LU,
    whose batched CPU solve returns invalid pivots for 256 x 256 blocks after ``torch.set_num_threads(2)`` in
    torch 2.13.0. It squares D's condition number, which is near 1 for the rotation blocks it serves. A block whose
    factorization fails (D singular to working precision) gets its pseudo-inverse (SVD) instead."""
    dt = d.transpose(-2, -1)
    chol, info = torch.linalg.cholesky_ex(dt @ d)
    x = torch.cholesky_solve(dt, chol)
    failed = (info != 0).nonzero().flatten()  # a host read: this path runs only where Newton-Schulz failed
    if failed.numel():
        x[failed] = torch.linalg.pinv(d[failed])
    return x


def newton_schulz_inverse(d: torch.Tensor, iterations: int,
                          per_block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotation_inverse``'s iteration, ``iterations`` times and no host read (``newton_schulz_iterations`` of a
    bound on the starting residual). Returns (X, converged): a 0-d device bool (``per_block``: one per block),
    whether the last residual, squared (the residual X leaves), is within sqrt(eps), the entries of an inverse to
    rounding."""
    if d.numel() == 0:
        shape = d.shape[:-2] if per_block else ()
        return d.clone(), torch.ones(shape, dtype=torch.bool, device=d.device)
    flat = d.reshape(-1, *d.shape[-2:])
    eye = _eye(d.shape[-1], d).expand_as(flat)
    x = flat.transpose(-2, -1)
    res = None
    for _ in range(iterations):
        res = torch.baddbmm(eye, flat, x, alpha=-1.0)
        x = torch.baddbmm(x, x, res)
    res = res if res is not None else torch.baddbmm(eye, flat, x, alpha=-1.0)
    worst = res.abs().amax((-2, -1)).view(d.shape[:-2]) if per_block else res.abs().amax()
    return x.view(d.shape), worst * worst <= math.sqrt(torch.finfo(d.dtype).eps)


def newton_schulz_iterations(residual: float, dtype: torch.dtype) -> int | None:
    """Iterations after which a Newton-Schulz inverse whose starting residual is at most ``residual`` has
    reached ``dtype``'s rounding (the residual squares each time); None when ``residual`` is not below 1 (no
    convergence guaranteed)."""
    eps = torch.finfo(dtype).eps
    if residual <= eps:
        return 1
    if not residual < 1.0:
        return None
    return max(1, math.ceil(math.log2(math.log(eps) / math.log(residual))))
