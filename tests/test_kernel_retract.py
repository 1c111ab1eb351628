"""The CholeskyQR2 kernel of DLRAMomentum's retraction against the Householder reference (TRITON_INTERPRET=1)."""
import pytest
import torch
from conftest import rel_err

from geomopt.geometry.qr import tall_qr as reference

triton = pytest.importorskip("triton")
kernel = pytest.importorskip("geomopt.kernels.retract").tall_qr

# (m, r): the augmented basis [U, xu] is m x 2r; ragged widths 10, 74 (and 5 for an odd c)
SHAPES = [(300, 5), (100, 16), (257, 32), (96, 37), (1000, 64)]


def augmented(m, r, scale, seed, dtype=torch.float32):
    """[U, xu] as the retraction builds it: U orthonormal, xu orthogonal to U, of gradient size."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    xu = torch.randn(m, r, generator=g, dtype=torch.float64) * scale
    xu -= u @ (u.T @ xu)
    return torch.cat([u, xu], 1).to(dtype)


def check(q, r, q_ref, r_ref, tol):
    assert q.shape == q_ref.shape and r.shape == r_ref.shape and q.dtype == q_ref.dtype
    assert rel_err(q.double(), q_ref.double()) < tol
    # R column by column: the xu columns are 1e-4 of the U ones and must be right on their own scale
    for j in range(r.shape[1]):
        assert rel_err(r[:, j].double(), r_ref[:, j].double()) < tol
    assert torch.allclose(torch.triu(r), r)


@pytest.mark.parametrize("m,r", SHAPES, ids=[f"{m}x{2 * r}" for m, r in SHAPES])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_matches_the_reference_fp32(m, r, scale):
    x = augmented(m, r, scale, seed=m + r)
    q, rr = kernel(x)
    check(q, rr, *reference(x), 1e-5)
    assert float((q.T @ q - torch.eye(2 * r)).abs().max()) < 1e-5


def test_odd_width_and_bf16_input():
    x = augmented(200, 3, 1.0, seed=1)[:, :5].contiguous()  # c = 5
    check(*kernel(x), *reference(x), 1e-5)
    xb = augmented(256, 8, 1.0, seed=2, dtype=torch.bfloat16)
    q, r = kernel(xb)
    assert q.dtype == torch.bfloat16
    q_ref, r_ref = reference(xb.double())
    assert rel_err(q.double(), q_ref) < 2e-2 and rel_err(r.double(), r_ref) < 2e-2


def test_rank_deficient_or_wide_input_falls_back_to_the_reference():
    x = augmented(64, 4, 1.0, seed=3)
    x[:, 5] = 0  # a zero column of xu: the Gram matrix is singular
    q, r = kernel(x)
    q_ref, r_ref = reference(x)
    assert torch.equal(q, q_ref) and torch.equal(r, r_ref)
    wide = augmented(400, 72, 1.0, seed=4)  # c = 144 > 128 columns
    assert all(torch.equal(a, b) for a, b in zip(kernel(wide), reference(wide)))
