"""The tile kernels (``tile_grads``, ``tile_rewrite``) against their torch references in ``geometry.tiles``, under
TRITON_INTERPRET=1: block gradients of both sides, finite flags and row checksums from one launch over several
weights; the two-sided rewrite in paper and lean mode, bf16 / fp16 weights with fp32 factors and their rounding
buffers, new W0s; b in {16, 32, 64, 128}, ragged blocks, the fully stochastic mode."""
import pytest
import torch
from tile_cases import CASES, IDS, layout, rel

from geomopt.geometry import tiles as ref
from geomopt.geometry.rounding import dropped_of
from geomopt.geometry.tiles import checksum_probe, row_checksums

triton = pytest.importorskip("triton")
grads_mod = pytest.importorskip("geomopt.kernels.tile_grads")
rewrite_mod = pytest.importorskip("geomopt.kernels.tile_rewrite")

HALF = [torch.bfloat16, torch.float16]


def grads_inputs(case, seed, dtype=torch.float32):
    count, m, n, b, fs = case
    g = torch.Generator().manual_seed(seed)
    lay, total = layout(count, m, n, b, fs, g)
    gs = [torch.randn(m, n, generator=g).to(dtype) for _ in range(count)]
    ws = [torch.randn(m, n, generator=g).to(dtype) for _ in range(count)]
    return lay, total, gs, ws


def run_grads(fn, lay, total, gs, ws, probe=None, expected=None):
    out = torch.zeros(total)
    verdict = torch.zeros(2, len(ws))
    sums = fn(gs, ws, lay, out, verdict, probe, expected)
    return out, verdict, sums


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tile_grads_matches_the_reference_fp32(case):
    lay, total, gs, ws = grads_inputs(case, 0)
    probe = checksum_probe(case[2], torch.float32, torch.device("cpu"))
    got, v_got, s_got = run_grads(grads_mod.tile_grads, lay, total, gs, ws, probe)
    want, v_want, s_want = run_grads(ref.tile_grads, lay, total, gs, ws, probe)
    assert rel(got, want) < grads_mod.TOLERANCE[torch.float32]
    assert torch.equal(s_got, s_want) and torch.equal(v_got, v_want) and not v_got.any()
    again = run_grads(grads_mod.tile_grads, lay, total, gs, ws, probe)[0]
    assert torch.equal(again, got)  # reductions in a fixed order: a rerun agrees to the bit


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES[:3] + CASES[4:5], ids=IDS[:3] + IDS[4:5])
def test_tile_grads_half_weights_accumulate_in_fp32(case, dtype):
    lay, total, gs, ws = grads_inputs(case, 1, dtype)
    probe = checksum_probe(case[2], dtype, torch.device("cpu"))
    got, _, s_got = run_grads(grads_mod.tile_grads, lay, total, gs, ws, probe)
    want, _, s_want = run_grads(ref.tile_grads, lay, total, gs, ws, probe)
    assert rel(got, want) < grads_mod.TOLERANCE[dtype]
    assert torch.equal(s_got, s_want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter computes NaN - NaN
def test_tile_grads_flags_nonfinite_gradients_and_changed_weights():
    lay, total, gs, ws = grads_inputs(CASES[1], 2)  # three weights
    probe = checksum_probe(37, torch.float32, torch.device("cpu"))
    record = [row_checksums(w, probe) for w in ws]
    gs[0][5, 7] = float("inf")
    gs[2][62, 0] = float("nan")
    ws[1][30, 36] += 1e-6  # one entry of one weight changed since its record
    got = run_grads(grads_mod.tile_grads, lay, total, gs, ws, probe, record)[1]
    want = run_grads(ref.tile_grads, lay, total, gs, ws, probe, record)[1]
    assert got.tolist() == want.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    no_record = run_grads(grads_mod.tile_grads, lay, total, gs, ws, probe, [None, None, record[2]])[1]
    assert no_record[1].tolist() == [0.0, 0.0, 0.0]  # a weight without a record is not checked


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_every_entry_is_checked_in_the_fully_stochastic_mode():
    lay, total, gs, ws = grads_inputs(CASES[-1], 3)  # most rows and columns are in no block
    corner = [i for i in range(80) if i not in lay.rows.order[0, :32].tolist()][-1]
    gs[0][corner, int(lay.cols.order[0, -1])] = float("nan")  # outside every block on both sides
    assert run_grads(grads_mod.tile_grads, lay, total, gs, ws)[1][0].tolist() == [1.0, 0.0]


def rewrite_inputs(case, seed, dtype, lean, comp):
    count, m, n, b, fs = case
    g = torch.Generator().manual_seed(seed)
    lay, total = layout(count, m, n, b, fs, g)
    mats = torch.randn(total, generator=g) * 0.3
    xs = [torch.randn(m, n, generator=g).to(dtype) for _ in range(count)]
    w0 = [torch.randn(m, n, generator=g) for _ in range(count)]
    comps = [torch.randint(-127, 128, (m, n), generator=g, dtype=torch.int8) for _ in range(count)] if comp else None
    return lay, mats, xs, (None if lean else w0), comps


def run_rewrite(fn, lay, mats, xs, w0, comps, take, merging):
    xs = [x.clone() for x in xs]
    comps = [c.clone() for c in comps] if comps else None
    keeps = [torch.zeros(x.shape) if merging and w0 is not None and i == 0 else None for i, x in enumerate(xs)]
    probe = checksum_probe(xs[0].shape[1], xs[0].dtype, torch.device("cpu"))
    write, sums = fn(xs, w0 if w0 is not None else xs, comps, keeps, lay, mats, take, probe)
    write()
    return xs, comps, keeps, sums, probe


@pytest.mark.parametrize("lean", [False, True], ids=["paper", "lean"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tile_rewrite_matches_the_reference_fp32(case, lean):
    lay, mats, xs, w0, _ = rewrite_inputs(case, 4, torch.float32, lean, False)
    take = [True] * len(xs)
    take[-1] = len(xs) == 1  # a weight not taken is left as it is
    got = run_rewrite(rewrite_mod.tile_rewrite, lay, mats, xs, w0, None, take, True)
    want = run_rewrite(ref.tile_rewrite, lay, mats, xs, w0, None, take, True)
    for a, b, x, t in zip(got[0], want[0], xs, take):
        assert rel(a, b) < rewrite_mod.TOLERANCE[torch.float32]
        assert t or torch.equal(a, x)
    if not lean:
        assert rel(got[2][0], want[2][0]) < rewrite_mod.TOLERANCE[torch.float32]
    for a, s, t in zip(got[0], got[3], take):  # the checksums are those of what was written
        assert torch.equal(s, row_checksums(a, got[4])) if t else not s.any()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("lean", [False, True], ids=["paper", "lean+buffer"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[-1]], ids=[IDS[0], IDS[4], IDS[-1]])
def test_tile_rewrite_half_weights_with_fp32_factors(case, lean, dtype):
    lay, mats, xs, w0, comps = rewrite_inputs(case, 5, dtype, lean, lean)
    take = [True] * len(xs)
    got = run_rewrite(rewrite_mod.tile_rewrite, lay, mats, xs, w0, comps, take, True)
    want = run_rewrite(ref.tile_rewrite, lay, mats, xs, w0, comps, take, True)
    for a, b in zip(got[0], want[0]):
        assert a.dtype == dtype and rel(a, b) < rewrite_mod.TOLERANCE[dtype]
    if lean:  # the weight plus its buffer carries the fp32 rotation (the two differ by the rounding of fp32 products)
        for a, c, b, d in zip(got[0], got[1], want[0], want[1]):
            assert c.dtype == torch.int8
            assert rel(a.float() + dropped_of(c, a), b.float() + dropped_of(d, b)) < 1e-4
    for a, s in zip(got[0], got[3]):
        assert torch.equal(s, row_checksums(a, got[4]))


def test_lean_mode_leaves_the_tiles_no_block_touches_and_refuses_a_new_w0():
    lay, mats, xs, _, _ = rewrite_inputs(CASES[-1], 6, torch.float32, True, False)
    got = run_rewrite(rewrite_mod.tile_rewrite, lay, mats, xs, None, None, [True, True], False)[0]
    rows, cols = lay.rows.order[0, 32:], lay.cols.order[0, 32:]  # in no block on either side
    assert torch.equal(got[0][rows][:, cols], xs[0][rows][:, cols])
    with pytest.raises(ValueError, match="keeps no W0"):
        rewrite_mod.tile_rewrite(xs, xs, None, [torch.zeros(80, 63), None], lay, mats, [True, True])


def test_bad_arguments_raise_before_anything_is_launched():
    lay, total, gs, ws = grads_inputs(CASES[0], 7)
    with pytest.raises(ValueError, match="gs must share one of"):
        grads_mod.tile_grads([gs[0], gs[1].double()], ws, lay, torch.zeros(total), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"ws must be \(64, 48\) with contiguous rows"):
        grads_mod.tile_grads(gs, [ws[0], ws[1][:, :40]], lay, torch.zeros(total), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"verdict must be a \(2, 2\) fp32 tensor"):
        grads_mod.tile_grads(gs, ws, lay, torch.zeros(total), torch.zeros(3, 2))


def test_rounding_buffers_of_another_dtype_or_layout_are_refused():
    lay, mats, xs, _, comps = rewrite_inputs(CASES[0], 8, torch.bfloat16, True, True)
    with pytest.raises(ValueError, match="comps must be torch.int8 codes shaped and strided as their weights"):
        rewrite_mod.tile_rewrite(xs, xs, [c.bfloat16() for c in comps], [None] * len(xs), lay, mats,
                                 [True] * len(xs))
    with pytest.raises(ValueError, match=r"got torch.int8 \(48, 64\)"):
        rewrite_mod.tile_rewrite(xs, xs, [c.t().contiguous() for c in comps], [None] * len(xs), lay, mats,
                                 [True] * len(xs))
