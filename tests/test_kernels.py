"""Triton kernels against their torch references (on CPU through TRITON_INTERPRET=1, set in conftest)."""
import pytest
import torch

from geomopt.geometry import blocks as ref
from geomopt.geometry import dispatch
from geomopt.geometry.dispatch import REFERENCES, kernel_for

triton = pytest.importorskip("triton")
ops = pytest.importorskip("geomopt.kernels.block_ops")

# (rows, cols, b): b in {16, 32, 64}, ragged remainders (5, 37), odd sizes (63, 37)
CASES = [(64, 48, 16), (63, 37, 16), (96, 80, 32), (128, 70, 64), (37, 29, 5), (80, 63, 37)]
IDS = [f"{m}x{n}-b{b}" for m, n, b in CASES]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def layouts(m, n, b, g):
    """Full blocks plus the ragged remainder, as the optimizer cuts them."""
    return [ref.block_layout(torch.randperm(d, generator=g), b, False) for d in (m, n)]


def inputs(m, n, b, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g)
    up = torch.randn(m, n, generator=g)  # a random upstream gradient
    rows, cols = layouts(m, n, b, g)
    blocks_r = [torch.randn(i.shape[0], i.shape[1], i.shape[1], generator=g) for i in rows]
    blocks_c = [torch.randn(i.shape[0], i.shape[1], i.shape[1], generator=g) for i in cols]
    return x, up, rows, cols, blocks_r, blocks_c


def outputs(mod, x, up, rows, cols, blocks_r, blocks_c):
    out = []
    for idx, d in zip(rows, blocks_r):
        out += [mod.rotate_rows(x, idx, d), mod.row_block_grad(up, x, idx)]
    for idx, e in zip(cols, blocks_c):
        out += [mod.rotate_cols(x, idx, e), mod.col_block_grad(x, up, idx)]
    return out


@pytest.mark.parametrize("m,n,b", CASES, ids=IDS)
def test_block_kernels_match_reference_fp32(m, n, b):
    x, up, rows, cols, br, bc = inputs(m, n, b, 0)
    for got, want in zip(outputs(ops, x, up, rows, cols, br, bc), outputs(ref, x, up, rows, cols, br, bc)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("m,n,b", CASES[:3] + CASES[4:5], ids=IDS[:3] + IDS[4:5])
def test_block_kernels_bf16_within_twice_the_bf16_reference_error(m, n, b):
    x, up, rows, cols, br, bc = inputs(m, n, b, 1)
    exact = outputs(ref, x, up, rows, cols, br, bc)
    bf = torch.bfloat16
    args = [x.to(bf), up.to(bf), rows, cols, [t.to(bf) for t in br], [t.to(bf) for t in bc]]
    for got, ref_bf16, want in zip(outputs(ops, *args), outputs(ref, *args), exact):
        assert got.dtype == torch.bfloat16
        # twice the bf16 reference's error, or two bf16 roundings (2^-7) for blocks of a few numbers
        assert rel(got, want) <= max(2 * rel(ref_bf16, want), 2.0**-7) and rel(got, want) < 2e-2


def test_rows_outside_the_blocks_are_copied_and_inputs_untouched():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 24, generator=g)
    before = x.clone()
    idx = torch.randperm(40, generator=g)[:16].view(1, 16)  # one block, as in the fully stochastic mode
    d = torch.randn(1, 16, 16, generator=g)
    y = ops.rotate_rows(x, idx, d)
    rest = torch.ones(40, dtype=torch.bool)
    rest[idx.flatten()] = False
    assert torch.equal(y[rest], x[rest]) and torch.equal(x, before)
    assert rel(y, ref.rotate_rows(x, idx, d)) < 1e-6


def test_registered_kernels_are_used_for_cuda_tensors_only(monkeypatch):
    from geomopt import kernels  # noqa: F401  (registers the kernels)

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    cpu = torch.zeros(4, 4)
    fake = cpu.as_subclass(FakeCuda)
    fake64 = cpu.double().as_subclass(FakeCuda)
    from geomopt.kernels import cayley, retract

    # no kernel: the exact Cayley map (a batched solve), what only the references can do (dispatch.can), and the
    # column side of weights stepped together (their kernels come with the grouped launches), and the official
    # code's series form of the Neumann map (neumann_form="series", kept for comparison, not for speed)
    names = set(REFERENCES) - {"cayley_exact", "rotate_rows_", "rotate_cols_", "cayley_neumann_with_bound",
                               "col_block_grads", "rotate_cols_stacked_", "cayley_series"}
    registered = {name: getattr(mod, name) for mod in (ops, cayley, retract) for name in mod.__all__}
    assert set(registered) == names
    assert all(kernel_for(name, fake) is REFERENCES[name] for name in names)  # opt-in: off by default
    monkeypatch.setenv("GEOMOPT_KERNELS", "1")
    for name in names:
        assert kernel_for(name, cpu) is REFERENCES[name]
        assert kernel_for(name, fake) is registered[name]
        assert kernel_for(name, fake64) is REFERENCES[name]  # float64 stays on the reference
    assert dispatch.can("rotate_rows", cpu, "in_place") and not dispatch.can("rotate_rows", fake, "in_place")
    assert dispatch.can("cayley_neumann", cpu, "with_bound")
    assert not dispatch.can("cayley_neumann", fake, "with_bound")
    monkeypatch.setenv("GEOMOPT_KERNELS", "0")
    assert all(kernel_for(name, fake) is REFERENCES[name] for name in names)
