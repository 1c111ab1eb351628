"""The Cayley-Neumann kernels (forward and backward, the paper's and the series form) against the torch references,
under TRITON_INTERPRET=1."""
import pytest
import torch
from conftest import rel_err

from geomopt.geometry.cayley import cayley_neumann as reference
from geomopt.geometry.cayley import cayley_series as series_reference
from geomopt.geometry.skew import skew_size

triton = pytest.importorskip("triton")
mod = pytest.importorskip("geomopt.kernels.cayley")
kernel = mod.cayley_neumann

CASES = [(b, k) for b in (16, 32, 64) for k in (1, 3, 5)] + [(5, 1), (5, 5), (37, 3), (37, 5)]


def packed(nblk, b, norm, seed, dtype=torch.float32):
    """Blocks with spectral norm about ``norm`` (large enough that a missing or extra Q^j term shows)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(nblk, skew_size(b), generator=g) * norm / (0.5 * b) ** 0.5).to(dtype)


@pytest.mark.parametrize("b,k", CASES, ids=[f"b{b}-k{k}" for b, k in CASES])
def test_forward_and_backward_match_the_reference_fp32(b, k):
    q = packed(3, b, 0.5, seed=b + k).requires_grad_()
    q_ref = q.detach().clone().requires_grad_()
    r, r_ref = kernel(q, b, k), reference(q_ref, b, k)
    assert r.shape == r_ref.shape == (3, b, b) and r.dtype == torch.float32
    assert rel_err(r, r_ref) < mod.TOLERANCE[torch.float32]
    up = torch.randn(3, b, b, generator=torch.Generator().manual_seed(7))
    (gq,) = torch.autograd.grad(r, q, up)
    (gq_ref,) = torch.autograd.grad(r_ref, q_ref, up)
    assert rel_err(gq, gq_ref) < mod.TOLERANCE[torch.float32]


@pytest.mark.parametrize("b,k", [(16, 2), (37, 5), (64, 4)], ids=["b16-k2", "b37-k5", "b64-k4"])
def test_series_form_forward_and_backward_match_the_reference(b, k):
    q = packed(2, b, 0.5, seed=b).requires_grad_()
    q_ref = q.detach().clone().requires_grad_()
    r, r_ref = mod.cayley_series(q, b, k), series_reference(q_ref, b, k)
    assert rel_err(r, r_ref) < mod.TOLERANCE[torch.float32]
    up = torch.randn(2, b, b, generator=torch.Generator().manual_seed(8))
    (gq,), (gq_ref,) = torch.autograd.grad(r, q, up), torch.autograd.grad(r_ref, q_ref, up)
    assert rel_err(gq, gq_ref) < mod.TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="terms must be >= 2 for the series form, got 1"):
        mod.cayley_series(q, b, 1)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_the_polynomial_is_the_references_for_this_k_not_a_neighbour(k):
    # the paper's kernel and its fallback differ by one power of Q; a 1e-5 match must tell k from k +- 1
    b = 32
    q = packed(2, b, 0.5, seed=k)
    r = kernel(q, b, k)
    assert rel_err(r, reference(q, b, k)) < 1e-5
    for other in (k - 1, k + 1):
        if other >= 1:
            assert rel_err(r, reference(q, b, other)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [16, 37, 64])
def test_half_precision_inputs_accumulate_in_fp32(b, dtype):
    q64 = packed(2, b, 0.5, seed=b).double().requires_grad_()
    q = q64.detach().to(dtype).requires_grad_()
    r = kernel(q, b, 5)
    assert r.dtype == dtype
    exact = reference(q.detach().double().requires_grad_(), b, 5)
    assert rel_err(r.double(), exact) < 2e-2
    up = torch.randn(2, b, b, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (gq,) = torch.autograd.grad(r, q, up.to(dtype))
    q_exact = q.detach().double().requires_grad_()
    (g_exact,) = torch.autograd.grad(reference(q_exact, b, 5), q_exact, up.to(dtype).double())
    assert gq.dtype == dtype and rel_err(gq.double(), g_exact) < 2e-2


def test_block_of_128_and_leading_batch_dimensions():
    q = packed(2, 128, 0.4, seed=3).view(1, 2, -1)
    r = kernel(q, 128, 5)
    assert r.shape == (1, 2, 128, 128)
    assert rel_err(r, reference(q, 128, 5)) < 1e-5


def test_zero_generator_gives_the_identity_and_bad_arguments_raise():
    assert torch.equal(kernel(torch.zeros(4, skew_size(16)), 16, 5), torch.eye(16).expand(4, 16, 16))
    with pytest.raises(ValueError, match="terms must be >= 1, got 0"):
        kernel(torch.zeros(1, 6), 4, 0)
    with pytest.raises(ValueError, match="q has 5 packed entries, a 4 x 4 skew matrix has 6"):
        kernel(torch.zeros(1, 5), 4, 3)
