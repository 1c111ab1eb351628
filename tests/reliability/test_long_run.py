"""Long-run drift on a 256 x 256 fp32 weight (benchmarks/long_run_drift.py). At POET's defaults (k = 4, the
polynomial's blocks merged) the weight keeps every singular value of W0 to 1e-4 relative over 10,000 steps and 50
merges, right after every merge and between them: an even k's orthogonality error is O(||Q||^(2k+2)). With the
paper's k = 5 (error O(||Q||^(k+1))) each merge keeps the polynomial's non-orthogonality at ||Q|| up to the
safeguard's 0.5 and the drift passes 1e-4 within 2,000 steps, unless the merges go through the exact Cayley map
(``exact_merge``). DLRAMomentum's bases stay orthonormal to 1e-5."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import long_run_drift  # noqa: E402


def test_poet_keeps_the_spectrum_over_50_merges_at_the_defaults():
    res = long_run_drift.poet_drift(10_000, 200, 1e-3)
    assert len(res.merges) >= 50 and res.moved > 0.5  # the weight travelled far from W0
    assert max(d for *_, d in res.merges) < 1e-4
    assert res.between < 1e-4
    assert long_run_drift.slope(res.merges) < 1e-6  # growth per merge


def test_an_odd_k_keeps_its_error_unless_merges_are_exact():
    """k = 5 over 2,000 steps: merging the polynomial's blocks drifts past 1e-4; exact merges keep W0's singular
    values to 1e-5 (between merges the weight is still the polynomial's)."""
    poly = long_run_drift.poet_drift(2_000, 200, 1e-3, neumann_terms=5)
    exact = long_run_drift.poet_drift(2_000, 200, 1e-3, neumann_terms=5, exact_merge=True)
    assert max(d for *_, d in poly.merges) > 1e-4
    assert max(d for *_, d in exact.merges) < 1e-5


def test_dlra_bases_stay_orthonormal_over_the_run():
    assert long_run_drift.dlra_orthonormality(10_000, 1e-3) < 1e-5
