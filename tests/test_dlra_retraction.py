"""DLRAMomentum's cheaper retraction (``retraction="qr"``, ``geometry.lowrank.retract_qr``): it lands on the manifold,
agrees with the SVD retraction to second order in the step, keeps the rank, and with ``rank_tol`` leaves rank
changes to the SVD steps every ``svd_every``."""
import pytest
import torch
from conftest import rel_err

import geomopt
from geomopt.geometry.lowrank import retract, retract_qr, tangent_project
from geomopt.sensing import make_problem, run_dlra


def point(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.diag(torch.linspace(3, 0.5, r, dtype=torch.float64))
    return u, s, v, tangent_project(u, v, torch.randn(m, n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("m,n,r,seed", [(30, 20, 4, 0), (17, 40, 3, 1), (12, 12, 6, 2)])
def test_the_qr_retraction_lands_on_the_manifold_and_agrees_with_the_svd_to_second_order(m, n, r, seed):
    u, s, v, xi = point(m, n, r, seed)
    errs = []
    for h in (1e-2, 1e-3):
        u2, s2, v2 = retract_qr(u, s, v, xi, h)
        eye = torch.eye(r, dtype=torch.float64)
        assert u2.shape == u.shape and s2.shape == s.shape and rel_err(u2.T @ u2, eye) < 1e-13
        a, b, c = retract(u, s, v, xi, h, rank=r)
        errs.append(rel_err(u2 @ s2 @ v2.T, a @ b @ c.T))
    assert errs[1] < errs[0] / 50  # a tenth of the step, at least 50 times closer: O(h^2) or better


def test_batched_qr_retraction_equals_one_by_one():
    pts = [point(20, 15, 3, seed) for seed in range(3)]
    stacked = [torch.stack(t) for t in zip(*[(u, s, v) for u, s, v, _ in pts])]
    xis = tuple(torch.stack(t) for t in zip(*[xi for *_, xi in pts]))
    batched = retract_qr(*stacked, xis, 1e-2)
    for i, (u, s, v, xi) in enumerate(pts):
        for got, want in zip(batched, retract_qr(u, s, v, xi, 1e-2)):
            assert rel_err(got[i], want) < 1e-13


def test_dlra_with_the_qr_retraction_still_solves_matrix_sensing():
    prob = make_problem(cond=100)
    errors = run_dlra(prob, 0.02, 2000, method="adam", retraction="qr")
    assert errors[-1] < 1e-4


def test_rank_changes_only_on_the_svd_steps():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, 16, dtype=torch.float64))
    opt = geomopt.DLRAMomentum([("w", w)], lr=0.2, rank=4, rank_tol=0.5, min_rank=1, max_rank=8, retraction="qr",
                               svd_every=3)
    ranks = []
    for _ in range(9):
        opt.zero_grad()
        (w - 1).square().sum().backward()
        opt.step()
        ranks.append(opt.ranks[0])
    changes = [i + 1 for i in range(1, 9) if ranks[i] != ranks[i - 1]]
    assert changes and all(step % 3 == 0 for step in changes)  # it did change, and only there


@pytest.mark.parametrize("kwargs,match", [
    (dict(retraction="lu"), "retraction must be one of"),
    (dict(retraction="qr", rank_tol=0.1), r"with retraction='qr' pass svd_every >= 1 \(got 0\)"),
    (dict(svd_every=-1), "svd_every"),
])
def test_bad_retraction_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        geomopt.DLRAMomentum([("w", torch.nn.Parameter(torch.zeros(4, 4)))], rank=2, **kwargs)


def test_svd_retraction_survives_a_failing_single_precision_driver(monkeypatch):
    """MKL's sgesdd fails to converge on some cores with many near-zero singular values (DLRA's first steps at a
    small lr); the retraction then computes that SVD in float64 and lands where the float64 retraction does."""
    u, s, v, xi = point(30, 20, 4, 3)
    want = retract(u, s, v, xi, 1e-3, rank=4)
    real_svd = torch.linalg.svd

    def svd(x, *args, **kwargs):
        if x.dtype != torch.float64:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    got = retract(u.float(), s.float(), v.float(), tuple(t.float() for t in xi), 1e-3, rank=4)
    assert all(t.dtype == torch.float32 for t in got)
    assert rel_err(got[0] @ got[1] @ got[2].T, (want[0] @ want[1] @ want[2].T).float()) < 1e-5
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("no")))
    with pytest.raises(torch.linalg.LinAlgError):  # a float64 failure is not hidden
        retract(u, s, v, xi, 1e-3, rank=4)
