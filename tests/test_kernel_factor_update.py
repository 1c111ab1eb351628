"""The fused factor update (``geomopt.kernels.factor_update``) against its torch reference
(``geomopt.optim.factor_update``) under TRITON_INTERPRET=1: every output (the rotations the rewrite applies, the new
generators, moments and step counts, the bounds and convergence per owner), b in {5, 16, 32, 37, 64, 128}, both
modes, the paper's and the series form of the map, AdamW and Adam with L2 decay."""
import pytest
import torch
from tile_cases import rel

from geomopt.optim.factor_update import AdamHyper, Entries
from geomopt.optim.factor_update import factor_update as reference
from geomopt.optim.poet_settings import RotationMap

triton = pytest.importorskip("triton")
mod = pytest.importorskip("geomopt.kernels.factor_update")

CASES = [(16, False, RotationMap(4), True), (16, True, RotationMap(4), True), (5, True, RotationMap(5), True),
         (32, True, RotationMap(1), True), (37, False, RotationMap(5, "series"), False),
         (64, True, RotationMap(3), True), (128, True, RotationMap(4), False)]
IDS = [f"b{b}-{'lean' if lean else 'paper'}-{r.form}{r.terms}-{'adamw' if dec else 'adam'}"
       for b, lean, r, dec in CASES]


def inputs(b, seed, norm=0.1):
    g = torch.Generator().manual_seed(seed)
    nq = b * (b - 1) // 2
    counts = [3, 2, 1]
    qs = [torch.randn(c, nq, generator=g) * norm / b ** 0.5 for c in counts]
    states = [dict(step=torch.tensor(float(i + 2)), exp_avg=torch.randn(c, nq, generator=g) * 1e-3,
                   exp_avg_sq=torch.rand(c, nq, generator=g) * 1e-5) for i, c in enumerate(counts)]
    entries = Entries(qs, states, [1e-2, 2e-2, 5e-3], [True, False, True], [0, 0, 1])
    return entries, torch.randn(sum(counts), b, b, generator=g)


def run(fn, entries, blocks, rmap, lean, iterations, adam):
    blocks, verdict = blocks.clone(), torch.zeros(2, 2)
    out = fn(blocks, entries, rmap, lean, iterations, adam, verdict)
    return blocks, verdict, out


@pytest.mark.parametrize("b,lean,rmap,decoupled", CASES, ids=IDS)
def test_every_output_matches_the_reference(b, lean, rmap, decoupled):
    entries, blocks = inputs(b, b)
    adam = AdamHyper(0.9, 0.999, 1e-8, 0.01, decoupled)
    got = run(mod.factor_update, entries, blocks, rmap, lean, 2, adam)
    want = run(reference, entries, blocks, rmap, lean, 2, adam)
    tol = mod.TOLERANCE[torch.float32]
    assert rel(got[0], want[0]) < tol and rel(got[1], want[1]) < tol
    for a, r in zip(got[2], want[2]):
        assert a.shape == r.shape and rel(a, r) < 2 * tol  # q after an Adam step: its rounding shows at 1e-6
    assert got[2].steps.tolist() == [3.0, 4.0, 5.0] and got[1][1].tolist() == [0.0, 0.0]
    for s, e in zip(entries.states, [2.0, 3.0, 4.0]):  # the inputs are left as they were
        assert float(s["step"]) == e


def test_an_inverse_that_has_not_converged_is_reported_for_its_owner():
    entries, blocks = inputs(16, 1, norm=3.0)  # far from orthogonal: one Newton-Schulz step is not enough
    adam = AdamHyper(0.9, 0.999, 1e-8, 0.0, True)
    got = run(mod.factor_update, entries, blocks, RotationMap(1), False, 1, adam)[1]
    want = run(reference, entries, blocks, RotationMap(1), False, 1, adam)[1]
    assert got[1].tolist() == want[1].tolist() == [1.0, 1.0]


def test_bad_arguments_raise():
    entries, blocks = inputs(16, 2)
    adam = AdamHyper(0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        mod.factor_update(blocks, entries, RotationMap(4), True, 0, adam, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="the entries hold 6 blocks, blocks has 5"):
        mod.factor_update(blocks[:5].contiguous(), entries, RotationMap(4), True, 2, adam, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="contiguous fp32"):
        mod.factor_update(blocks.double(), entries, RotationMap(4), True, 2, adam, torch.zeros(2, 2))
