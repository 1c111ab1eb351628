"""Invariants of POET's math: preserved spectrum, parameter counts, permutations, the safeguard."""

import pytest
import torch
from torch import nn

import geomopt


def train_linear(opt, lin, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, lin.in_features, generator=g, dtype=lin.weight.dtype)
    y = torch.randn(64, lin.out_features, generator=g, dtype=lin.weight.dtype)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(lin(x), y).backward()
        opt.step()


@pytest.mark.parametrize("store_base", [True, False], ids=["paper", "lean"])
@pytest.mark.parametrize("shape,block,mode", [((48, 40), 8, "bs"), ((37, 29), 8, "bs"), ((40, 30), 0.5, "fs")],
                         ids=["bs-even", "bs-ragged", "fs-half"])
def test_singular_values_preserved_after_three_merges(float64, store_base, shape, block, mode):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    sv0 = torch.linalg.svdvals(lin.weight.detach())
    w_start = lin.weight.detach().clone()
    opt = geomopt.POET([("w", lin.weight)], lr=1e-2, block_size=block, mode=mode, exact_cayley=True,
                       merge_every=10, store_base=store_base)
    train_linear(opt, lin, 35)
    assert opt.stats["merges"] == 3
    assert (lin.weight.detach() - w_start).norm() > 1e-2 * w_start.norm()  # it did train
    sv = torch.linalg.svdvals(lin.weight.detach())
    assert ((sv - sv0).abs() / sv0).max() < 1e-5


@pytest.mark.parametrize("m,n,b", [(32, 16, 8), (64, 64, 16), (24, 48, 4)])
def test_parameter_count_bs(m, n, b):
    lin = nn.Linear(n, m, bias=False)
    opt = geomopt.POET([("w", lin.weight)], block_size=b)
    lin.weight.grad = torch.randn(m, n)
    opt.step()
    st = opt.state[lin.weight]
    count = sum(q.numel() for q in st["q_row"] + st["q_col"])
    assert count == (m + n) * (b - 1) // 2


def test_permutations_redrawn_at_merge_and_seeded():
    def perms(seed, steps):
        torch.manual_seed(0)
        lin = nn.Linear(20, 30, bias=False)
        opt = geomopt.POET([("w", lin.weight)], block_size=4, merge_every=3, seed=seed)
        out = []
        for _ in range(steps):
            lin.weight.grad = torch.randn(30, 20)
            opt.step()
            out.append((opt.state[lin.weight]["perm_row"].clone(), opt.state[lin.weight]["perm_col"].clone()))
        return out

    a, b, c = perms(0, 7), perms(0, 7), perms(1, 7)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert torch.equal(a[0][0], a[1][0])  # unchanged inside a cycle
    assert not torch.equal(a[1][0], a[2][0])  # step 3 merged: new permutation
    for p, d in zip(a[-1], (30, 20)):
        assert torch.equal(p.sort().values, torch.arange(d))


def test_merge_every_parameter_gets_its_own_permutations():
    lins = [nn.Linear(16, 16, bias=False) for _ in range(2)]
    opt = geomopt.POET([(f"w{i}", l.weight) for i, l in enumerate(lins)], block_size=4)
    for l in lins:
        l.weight.grad = torch.randn(16, 16)
    opt.step()
    assert not torch.equal(opt.state[lins[0].weight]["perm_row"], opt.state[lins[1].weight]["perm_row"])


def spectrum_drift(max_q_norm, terms=5):
    torch.manual_seed(0)
    lin = nn.Linear(24, 24, bias=False)
    sv0 = torch.linalg.svdvals(lin.weight.detach())
    opt = geomopt.POET([("w", lin.weight)], lr=0.05, block_size=8, merge_every=10_000, neumann_terms=terms,
                       max_q_norm=max_q_norm)
    train_linear(opt, lin, 60)
    sv = torch.linalg.svdvals(lin.weight.detach())
    return float(((sv - sv0).abs() / sv0).max()), opt.stats["early_merges"]


def test_safeguard_merges_early_and_keeps_the_spectrum():
    unguarded, n0 = spectrum_drift(None)
    guarded, n1 = spectrum_drift(0.5)
    assert n0 == 0 and n1 > 0
    assert unguarded > 0.05  # the Neumann series has stopped being a rotation
    assert guarded < unguarded / 10


def test_explicit_merge_keeps_the_weight(float64):
    torch.manual_seed(0)
    lin = nn.Linear(12, 10, bias=False)
    opt = geomopt.POET([("w", lin.weight)], lr=1e-2, block_size=4, merge_every=100)
    train_linear(opt, lin, 5)
    w = lin.weight.detach().clone()
    opt.merge()
    st = opt.state[lin.weight]
    assert torch.allclose(st["w0"], w, atol=1e-12) and all(q.abs().max() == 0 for q in st["q_row"] + st["q_col"])
    assert opt.stats["merges"] == 1


@pytest.mark.parametrize("store_base", [True, False], ids=["paper", "lean"])
@pytest.mark.parametrize("shape,parts", [((48, 40), 2), ((60, 20), 3), ((37, 29), 2)], ids=["2", "3", "odd-rows"])
def test_row_shards_keep_every_row_block_inside_its_part(float64, store_base, shape, parts):
    """row_shards=k (the permutation scope of a k-rank FSDP2 run): each row permutation maps every part of
    m / k consecutive rows to itself, so no row block crosses a part; a row count that k does not divide keeps
    one part. The step is still a rotation: the spectrum is preserved through merges."""
    torch.manual_seed(0)
    m, n = shape
    lin = nn.Linear(n, m, bias=False)
    sv0 = torch.linalg.svdvals(lin.weight.detach())
    opt = geomopt.POET([("w", lin.weight)], lr=1e-2, block_size=8, exact_cayley=True, merge_every=4,
                       store_base=store_base, row_shards=parts)
    chunked = m % parts == 0
    crossed = False
    for _ in range(3):
        train_linear(opt, lin, 4)
        perm = opt.state[lin.weight]["perm_row"]
        assert torch.equal(perm.sort().values, torch.arange(m))
        inside = all(bool(((c >= i * (m // parts)) & (c < (i + 1) * (m // parts))).all())
                     for i, c in enumerate(perm.chunk(parts)))
        assert inside or not chunked
        crossed |= not inside
    assert crossed or chunked  # one part: the permutation is free to mix the halves (and does)
    assert opt.stats["merges"] == 3
    sv = torch.linalg.svdvals(lin.weight.detach())
    assert ((sv - sv0).abs() / sv0).max() < 1e-5

    def generators(d):  # b(b-1)/2 numbers per block of 8, and the ragged remainder's block
        return (d // 8) * 28 + (d % 8) * (d % 8 - 1) // 2
    want = parts * generators(m // parts) if chunked else generators(m)
    assert sum(q.numel() for q in opt.state[lin.weight]["q_row"]) == want


@pytest.mark.parametrize("value,exc", [(0, ValueError), (2.0, TypeError), ("2", TypeError), (True, TypeError)])
def test_row_shards_is_validated(value, exc):
    lin = nn.Linear(8, 8, bias=False)
    with pytest.raises(exc, match="row_shards"):
        geomopt.POET([("w", lin.weight)], block_size=4, row_shards=value)


@pytest.mark.parametrize("store_base", [True, False], ids=["paper", "lean"])
def test_exact_merge_keeps_the_spectrum_of_a_coarse_polynomial(float64, store_base):
    """k = 1 (orthogonality error O(||Q||^2)) with no safeguard: merging through the exact Cayley map keeps W0's
    singular values to rounding over 4 merges; merging the polynomial's blocks does not."""
    def drift(exact_merge):
        torch.manual_seed(0)
        lin = nn.Linear(24, 24, bias=False)
        sv0 = torch.linalg.svdvals(lin.weight.detach())
        opt = geomopt.POET([("w", lin.weight)], lr=0.02, block_size=8, merge_every=5, neumann_terms=1,
                           max_q_norm=None, exact_merge=exact_merge, store_base=store_base)
        train_linear(opt, lin, 20)
        assert opt.stats["merges"] == 4
        sv = torch.linalg.svdvals(lin.weight.detach())
        return float(((sv - sv0).abs() / sv0).max())

    assert drift(True) < 1e-10
    assert drift(False) > 1e-4
