"""Long-run drift over 10,000 steps with 50 merges on a 256 x 256 fp32 weight (benchmarks/long_run_drift.py), at
POET's defaults with ``exact_merge=True``:
right after every merge the weight keeps every singular value of W0 to 1e-4 relative (the merges
go through the exact Cayley map, ``exact_merge``; merging the polynomial's blocks instead drifts to 8e-4, since
each merge keeps the polynomial's non-orthogonality at ||Q|| up to the safeguard's 0.5: BENCHMARKS.md), and
DLRAMomentum's bases stay orthonormal to 1e-5."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import long_run_drift  # noqa: E402


def test_poet_keeps_the_spectrum_over_50_merges_with_exact_merges():
    res = long_run_drift.poet_drift(10_000, 200, 1e-3, exact_merge=True)
    assert len(res.merges) >= 50 and res.moved > 0.5  # the weight travelled far from W0
    assert max(d for *_, d in res.merges) < 1e-4
    assert long_run_drift.slope(res.merges) < 1e-7  # growth per merge


def test_polynomial_merges_keep_their_error():
    """The same run with ``exact_merge=False``, 2,000 steps: the drift after merges grows past 1e-4 (what the
    exact merges remove)."""
    res = long_run_drift.poet_drift(2_000, 200, 1e-3, exact_merge=False)
    assert max(d for *_, d in res.merges) > 1e-4


def test_dlra_bases_stay_orthonormal_over_the_run():
    assert long_run_drift.dlra_orthonormality(10_000, 1e-3) < 1e-5
