"""Properties of the torch references in geomopt.geometry (float64, several shapes and seeds)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomopt.geometry import (
    block_layout,
    block_sizes,
    cayley_exact,
    cayley_neumann,
    col_block_grad,
    pack_skew,
    rotate_cols,
    rotate_rows,
    row_block_grad,
    skew_norm_bound,
    skew_size,
    unpack_skew,
)
from geomopt.geometry.cayley import normal_inverse, rotation_inverse
from geomopt.geometry.dispatch import REFERENCES, call, kernel_for, register_kernel

f64 = torch.float64


def rand_q(nblk, b, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nblk, skew_size(b), generator=g, dtype=f64) * scale


@settings(max_examples=40, deadline=None)
@given(b=st.integers(2, 40), nblk=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_skew_pack_roundtrip_and_skewness(b, nblk, seed):
    q = rand_q(nblk, b, seed)
    Q = unpack_skew(q, b)
    assert torch.equal(Q, -Q.transpose(1, 2))
    assert torch.equal(pack_skew(Q), q)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 8])
def test_zero_generator_gives_identity_exactly(terms):
    for b in (2, 5, 16):
        q = torch.zeros(3, skew_size(b), dtype=f64)
        eye = torch.eye(b, dtype=f64).expand(3, b, b)
        assert torch.equal(cayley_neumann(q, b, terms), eye)
        assert torch.equal(cayley_exact(q, b), eye)


@pytest.mark.parametrize("b", [2, 7, 33])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_cayley_is_a_rotation(b, seed):
    R = cayley_exact(rand_q(3, b, seed), b)
    eye = torch.eye(b, dtype=f64)
    assert (R.transpose(1, 2) @ R - eye).abs().max() < 1e-12
    assert torch.allclose(torch.linalg.det(R), torch.ones(3, dtype=f64))


@pytest.mark.parametrize("dtype,tol", [(f64, 1e-12), (torch.float32, 2e-5)])
def test_exact_cayley_solves_its_defining_equation_at_b256_on_two_threads(dtype, tol):
    """(I - Q) R = I + Q for batches of 256 x 256 blocks after ``torch.set_num_threads(2)``, where torch 2.13.0's
    CPU build returns invalid pivots from a batched LU (the exact map uses a Cholesky factorization instead)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        b = 256
        q = rand_q(3, b, 7, scale=0.05)
        R = cayley_exact(q.to(dtype), b).to(f64)
    finally:
        torch.set_num_threads(threads)
    Q, eye = unpack_skew(q, b), torch.eye(b, dtype=f64)
    assert ((eye - Q) @ R - (eye + Q)).abs().max() < tol
    assert (R.transpose(1, 2) @ R - eye).abs().max() < tol


def test_inverse_fallback_runs_without_lu_at_b256_on_two_threads(monkeypatch):
    """Blocks too far from orthogonal for Newton-Schulz (a Cayley-Neumann map of a large generator) are inverted
    from the normal equations, with no LU (``torch.linalg.inv`` / ``solve`` made to raise), after
    ``torch.set_num_threads(2)`` at b = 256; a singular block gets its pseudo-inverse."""
    def no_lu(*a, **k):
        raise AssertionError("the inverse must not use a pivoted LU")

    b = 256
    d = cayley_neumann(rand_q(3, b, 11, scale=0.3), b, 1)  # ||I - D D^T|| >= 1: Newton-Schulz diverges
    assert (torch.eye(b, dtype=f64) - d @ d.transpose(1, 2)).abs().amax() >= 1.0
    singular = d.clone()
    singular[1, :, 0] = 0.0
    for name in ("inv", "solve", "inv_ex", "solve_ex", "lu_factor", "lu_factor_ex"):
        monkeypatch.setattr(torch.linalg, name, no_lu)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = rotation_inverse(d)
        y = normal_inverse(singular)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    assert (d @ x - torch.eye(b, dtype=f64)).abs().max() < 1e-9
    assert torch.allclose(y[1], torch.linalg.pinv(singular[1]), atol=1e-9)  # the singular block
    assert (singular[[0, 2]] @ y[[0, 2]] - torch.eye(b, dtype=f64)).abs().max() < 1e-9


def _slope(ts, errs):
    x, y = torch.log(torch.tensor(ts)), torch.log(torch.tensor(errs))
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_neumann_error_slopes(k, seed):
    """||CNP - Cayley|| = O(t^(k+1)); ||R^T R - I|| = O(t^(k+1)) for odd k, O(t^(2k+2)) for even k."""
    b = 6
    q0 = rand_q(1, b, seed)
    q0 = q0 / torch.linalg.matrix_norm(unpack_skew(q0, b), ord=2)  # ||Q0||_2 = 1
    ts = torch.logspace(math.log10(0.05), math.log10(0.2), 6).tolist()
    dist, ortho = [], []
    eye = torch.eye(b, dtype=f64)
    for t in ts:
        R = cayley_neumann(q0 * t, b, k)[0]
        dist.append(float((R - cayley_exact(q0 * t, b)[0]).norm()))
        ortho.append(float((R.T @ R - eye).norm()))
    assert abs(_slope(ts, dist) - (k + 1)) < 0.3
    want = k + 1 if k % 2 else 2 * k + 2
    assert abs(_slope(ts, ortho) - want) < 0.3


@settings(max_examples=30, deadline=None)
@given(b=st.integers(2, 24), seed=st.integers(0, 10_000), scale=st.floats(0.01, 3.0))
def test_norm_bound_is_an_upper_bound(b, seed, scale):
    q = rand_q(3, b, seed, scale)
    Q = unpack_skew(q, b)
    spectral = torch.linalg.matrix_norm(Q, ord=2)
    bound = skew_norm_bound(q, b)
    assert torch.all(bound >= spectral * (1 - 1e-9))
    assert torch.all(bound <= torch.linalg.matrix_norm(Q) * (1 + 1e-9))


def dense_rotation(dim, idxs, blocks):
    R = torch.eye(dim, dtype=f64)
    for idx, D in zip(idxs, blocks):
        for k in range(idx.shape[0]):
            R[idx[k][:, None], idx[k][None, :]] = D[k]
    return R


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), b=st.integers(2, 12), fs=st.booleans(), seed=st.integers(0, 999))
def test_block_rotation_equals_dense_product(m, n, b, fs, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g, dtype=f64)
    rows = block_layout(torch.randperm(m, generator=g), b, fs)
    cols = block_layout(torch.randperm(n, generator=g), b, fs)
    def rand_rotations(idxs):
        return [cayley_exact(torch.randn(i.shape[0], skew_size(i.shape[1]), generator=g, dtype=f64), i.shape[1])
                for i in idxs]

    ds, es = rand_rotations(rows), rand_rotations(cols)
    y = x
    for idx, d in zip(rows, ds):
        y = rotate_rows(y, idx, d)
    for idx, e in zip(cols, es):
        y = rotate_cols(y, idx, e)
    want = dense_rotation(m, rows, ds) @ x @ dense_rotation(n, cols, es)
    assert torch.allclose(y, want, rtol=0, atol=1e-12)
    # rotations preserve the singular values
    if min(m, n) > 0:
        assert torch.allclose(torch.linalg.svdvals(y), torch.linalg.svdvals(x), atol=1e-10)


@pytest.mark.parametrize("m,n,b", [(24, 16, 8), (37, 5, 6), (63, 20, 16)], ids=["even", "ragged-37x5", "ragged-63x20"])
def test_block_grads_equal_autograd(m, n, b):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g, dtype=f64)
    up = torch.randn(m, n, generator=g, dtype=f64)  # random upstream gradient
    for idx in block_layout(torch.randperm(m, generator=g), b, False):
        d = torch.randn(idx.shape[0], idx.shape[1], idx.shape[1], generator=g, dtype=f64, requires_grad=True)
        assert torch.allclose(torch.autograd.grad((rotate_rows(x, idx, d) * up).sum(), d)[0],
                              row_block_grad(up, x, idx), atol=1e-12)
    for idx in block_layout(torch.randperm(n, generator=g), b, False):
        e = torch.randn(idx.shape[0], idx.shape[1], idx.shape[1], generator=g, dtype=f64, requires_grad=True)
        assert torch.allclose(torch.autograd.grad((rotate_cols(x, idx, e) * up).sum(), e)[0],
                              col_block_grad(x, up, idx), atol=1e-12)


def test_block_sizes_cover_every_shape():
    assert block_sizes(64, 16, False) == [(4, 16)]
    assert block_sizes(37, 16, False) == [(2, 16), (1, 5)]
    assert block_sizes(33, 16, False) == [(2, 16)]  # a remainder of 1 is the identity
    assert block_sizes(10, 16, False) == [(1, 10)]
    assert block_sizes(64, 16, True) == [(1, 16)]
    assert block_sizes(1, 16, False) == []


def test_dispatch_uses_reference_on_cpu_and_kernel_only_on_cuda():
    x = torch.zeros(4, 4)
    for name, ref in REFERENCES.items():
        assert kernel_for(name, x) is ref
    from geomopt.geometry import dispatch
    calls = []
    saved = dict(dispatch._KERNELS)
    register_kernel("rotate_rows", lambda *a: calls.append(a))
    try:
        idx = torch.arange(4).view(2, 2)
        call("rotate_rows", x, idx, torch.eye(2).expand(2, 2, 2))
        assert calls == []  # a CPU tensor never reaches a registered kernel
    finally:
        dispatch._KERNELS.clear()
        dispatch._KERNELS.update(saved)
    with pytest.raises(ValueError, match="name must be one of"):
        register_kernel("nope", lambda: None)
