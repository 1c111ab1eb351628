"""DLRA momentum: manifold invariants, the projected-gradient step, the paper's claim, rank adaptivity."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import geomopt
from geomopt import sensing
from geomopt.geometry.lowrank import check_point, retract, stabilize, tangent_project, tangent_to_dense, transport

f64 = torch.float64


def random_point(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=f64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=f64))
    s = torch.diag(torch.rand(r, generator=g, dtype=f64) + 0.5)
    return u, s, v, g


def dense_projection(u, v, x):
    pu, pv = u @ u.T, v @ v.T
    return pu @ x + x @ pv - pu @ x @ pv


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), r=st.integers(1, 6), seed=st.integers(0, 999))
def test_projection_is_idempotent_and_tangent(m, n, r, seed):
    r = min(r, m, n)
    u, s, v, g = random_point(m, n, r, seed)
    x = torch.randn(m, n, generator=g, dtype=f64)
    xi = tangent_project(u, v, x)
    dense = tangent_to_dense(u, v, xi)
    assert torch.allclose(dense, dense_projection(u, v, x), atol=1e-12)
    assert torch.allclose(tangent_to_dense(u, v, tangent_project(u, v, dense)), dense, atol=1e-12)  # idempotent
    assert (u.T @ xi[1]).abs().max() < 1e-12 and (v.T @ xi[2]).abs().max() < 1e-12  # tangent coordinates


@settings(max_examples=30, deadline=None)
@given(m=st.integers(3, 30), n=st.integers(3, 30), r=st.integers(1, 5), seed=st.integers(0, 999),
       step=st.floats(1e-3, 1.0))
def test_retraction_lands_on_the_manifold_and_is_the_truncated_svd(m, n, r, seed, step):
    r = min(r, m // 2, n // 2) or 1
    u, s, v, g = random_point(m, n, r, seed)
    xi = tangent_project(u, v, torch.randn(m, n, generator=g, dtype=f64))
    u2, s2, v2 = retract(u, s, v, xi, step, rank=r)
    assert check_point(u2, s2, v2, tol=1e-10)
    y = u @ s @ v.T - step * tangent_to_dense(u, v, xi)
    uu, ss, vh = torch.linalg.svd(y)
    best = uu[:, :r] @ torch.diag(ss[:r]) @ vh[:r]
    assert torch.allclose(u2 @ s2 @ v2.T, best, atol=1e-10)


def test_transport_equals_dense_projection_and_stabilize_keeps_w():
    u, s, v, g = random_point(20, 15, 3, 0)
    u2, s2, v2, _ = random_point(20, 15, 4, 1)
    xi = tangent_project(u, v, torch.randn(20, 15, generator=g, dtype=f64))
    moved = transport(u, v, u2, v2, xi)
    assert torch.allclose(tangent_to_dense(u2, v2, moved), dense_projection(u2, v2, tangent_to_dense(u, v, xi)),
                          atol=1e-12)
    qu, qs, qv = stabilize(u * 1.001, s, v)
    assert check_point(qu, qs, qv, tol=1e-12) and torch.allclose(qu @ qs @ qv.T, 1.001 * u @ s @ v.T, atol=1e-12)
    ok, why = check_point(u * 2, s, v, explain=True)
    assert not ok and "exceed" in why


def test_zero_momentum_step_is_projected_gradient_plus_retraction(float64):
    torch.manual_seed(0)
    m, n, r, lr = 12, 9, 3, 0.1
    u, s, v, g = random_point(m, n, r, 0)
    w = nn.Parameter(u @ s @ v.T)
    opt = geomopt.DLRAMomentum([("w", w)], lr=lr, rank=r, momentum=0.0)
    target = torch.randn(m, n, generator=g)
    for _ in range(3):
        w0 = w.detach().clone()
        opt.zero_grad()
        (w - target).square().sum().backward()
        grad = w.grad.clone()
        opt.step()
        uu, ss, vh = torch.linalg.svd(w0)
        ub, vb = uu[:, :r], vh[:r].T
        y = w0 - lr * dense_projection(ub, vb, grad)
        yu, ys, yvh = torch.linalg.svd(y)
        assert torch.allclose(w.detach(), yu[:, :r] @ torch.diag(ys[:r]) @ yvh[:r], rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["heavy_ball", "adam"])
def test_manifold_invariants_after_200_steps(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 8))
    opt = geomopt.DLRAMomentum(model, lr=1e-2 if method == "adam" else 5e-2, rank=4, method=method)
    x, y = torch.randn(128, 24), torch.randn(128, 8)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.9 * first
    for lin in (model[0], model[2]):
        st = opt.state[lin.weight]
        u, s, v = st["U"], st["S"], st["V"]
        eye = torch.eye(4)
        assert torch.linalg.matrix_rank(lin.weight.detach()) <= 4
        assert (u.T @ u - eye).abs().max() <= 1e-5 and (v.T @ v - eye).abs().max() <= 1e-5
        assert (lin.weight.detach() - u @ s @ v.T).abs().max() <= 1e-6


def test_paper_claim_geometric_heavy_ball_needs_half_the_steps():
    """Condition number 100: DLRA heavy-ball reaches 1e-4 in at most half the steps of heavy-ball on
    balanced factors at its best learning rate from a grid over several decades."""
    prob = sensing.make_problem(cond=100.0)
    dlra = sensing.sweep(prob, "dlra", [10.0, 31.6, 100.0, 316.0], steps=600)
    factors = sensing.sweep(prob, "factors", [10.0, 31.6, 100.0, 316.0, 1000.0], steps=1200)
    best_dlra = min(n for n, _ in dlra.values() if n is not None)
    reached = [n for n, _ in factors.values() if n is not None]
    best_factors = min(reached) if reached else math.inf
    assert 2 * best_dlra <= best_factors, (dlra, factors)


def test_rank_adapts_to_the_target_rank():
    g = torch.Generator().manual_seed(0)
    m, n = 30, 24
    target = torch.randn(m, 5, generator=g, dtype=f64) @ torch.randn(5, n, generator=g, dtype=f64)
    w = nn.Parameter(torch.randn(m, n, generator=g, dtype=f64) * 0.01)
    opt = geomopt.DLRAMomentum([("w", w)], lr=0.05, rank=2, momentum=0.5, rank_tol=1e-3, max_rank=16)
    ranks = []
    for _ in range(300):
        opt.zero_grad()
        (w - target).square().sum().backward()
        opt.step()
        ranks.append(opt.ranks[0])
    assert ranks[-1] == 5 and set(ranks[-50:]) == {5}
    assert float((w.detach() - target).norm() / target.norm()) < 1e-3


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(rank=0), r"rank must be >= 1, got 0"),
    (dict(rank=13), r"rank=13 exceeds min\(m, n\)=12"),
    (dict(method="nesterov"), r"method must be one of \('heavy_ball', 'adam'\), got 'nesterov'"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (dict(rank_tol=-1.0), r"rank_tol must be >= 0.0, got -1.0"),
    (dict(max_rank=0), r"max_rank must be >= 1, got 0"),
])
def test_bad_arguments(kwargs, pattern):
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16))
    with pytest.raises(ValueError, match=pattern):
        geomopt.DLRAMomentum(model, **{"rank": 4, **kwargs})
