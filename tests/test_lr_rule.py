"""``lr_ref_block``: the factors' lr scaled by sqrt(ref / b) keeps ||Q||_2 of the blocks in one range from b = 16 to
b = 128 on one problem (without it ||Q||_2 grows about like sqrt(b)); each side takes its own block size; None
is the old behaviour, bit for bit; 32 is the default; bad values are refused by name."""
import math

import pytest
import torch

import geomopt
from geomopt.geometry.skew import unpack_skew


def largest_q(opt, w):
    st = opt.state[w]
    return max(float(torch.linalg.matrix_norm(unpack_skew(q, (1 + math.isqrt(1 + 8 * q.shape[-1])) // 2), ord=2).max())
               for q in st["q_row"] + st["q_col"])


def fit(b, steps=10, n=128, m=128, lr_ref_block=None, **kw):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(m, n, generator=gen) / math.sqrt(n))
    x = torch.randn(256, n, generator=gen)
    y = x @ torch.randn(m, n, generator=gen).T / math.sqrt(n)
    opt = geomopt.POET([("w", w)], lr=1e-3, block_size=b, merge_every=10**6, max_q_norm=None,
                       lr_ref_block=lr_ref_block, **kw)
    for _ in range(steps):
        opt.zero_grad()
        ((x @ w.T - y) ** 2).mean().backward()
        opt.step()
    return opt, w


def test_the_rule_keeps_q_in_one_range_across_block_sizes():
    plain = {b: largest_q(*fit(b)) for b in (16, 128)}
    ruled = {b: largest_q(*fit(b, lr_ref_block=32)) for b in (16, 128)}
    assert plain[128] / plain[16] > 2.0  # the growth the rule corrects
    assert 1 / 1.5 < ruled[128] / ruled[16] < 1.5


def test_each_side_scales_by_its_own_block_size_and_none_is_the_old_step():
    # 128 x 32 with b = 64: the rows have blocks of 64 (scale 0.5 at ref 16), the columns one block of 32
    # (clamped; scale sqrt(0.5)); the same generators as a plain run at lr 0.5e-3 and sqrt(0.5) * 1e-3
    ruled, w_ruled = fit(64, steps=1, m=128, n=32, lr_ref_block=16)
    for lr, side in ((0.5e-3, "q_row"), (math.sqrt(0.5) * 1e-3, "q_col")):
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(128, 32, generator=gen) / math.sqrt(32))
        x = torch.randn(256, 32, generator=gen)
        y = x @ torch.randn(128, 32, generator=gen).T / math.sqrt(32)
        plain = geomopt.POET([("w", w)], lr=lr, block_size=64, merge_every=10**6, max_q_norm=None, lr_ref_block=None)
        ((x @ w.T - y) ** 2).mean().backward()
        plain.step()
        for a, b in zip(ruled.state[w_ruled][side], plain.state[w][side]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert geomopt.POET([("w", torch.nn.Parameter(torch.randn(8, 8)))]).defaults["lr_ref_block"] == 32
    old, w_old = fit(32, steps=3)
    same, w_same = fit(32, steps=3, lr_ref_block=32)  # b = ref: scale 1, the same call
    assert torch.equal(w_old, w_same)


@pytest.mark.parametrize("value,err", [(0, ValueError), (2.5, TypeError), ("32", TypeError)])
def test_bad_values_are_refused_by_name(value, err):
    with pytest.raises(err, match="lr_ref_block"):
        geomopt.POET([("w", torch.nn.Parameter(torch.randn(8, 8)))], lr_ref_block=value)
