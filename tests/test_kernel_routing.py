"""The optimizers reach the kernels through the one dispatch point: with the device check patched to
accept CPU tensors (the kernels run under TRITON_INTERPRET=1), POET's step takes the tile pipeline (its three
kernels) and DLRAMomentum's retraction the CholeskyQR2 kernel, and both end where the torch references end. Without
the patch (a CPU tensor), only the references run."""
import pytest
import torch
from conftest import rel_err
from torch import nn

import geomopt
from geomopt.geometry import dispatch

triton = pytest.importorskip("triton")
pytest.importorskip("geomopt.kernels")

POET_KERNELS = {"tile_grads", "factor_update", "tile_rewrite"}


def model(seed=0):
    torch.manual_seed(seed)
    # 40 = 2 x 16 + 8, 37 = 2 x 16 + 5 and 21 = 16 + 5: ragged remainder blocks on both sides
    return nn.Sequential(nn.Linear(37, 40), nn.Tanh(), nn.Linear(40, 21))


def train(make_opt, steps=4):
    net = model()
    opt = make_opt(net)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 37, generator=g), torch.randn(16, 21, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel calls by name; the kernels are enabled but CPU tensors still go to the references
    unless the test also patches the device check."""
    import geomopt.kernels  # noqa: F401  (registers the kernels)

    counts = {}
    for name, fn in list(dispatch._KERNELS.items()):
        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(dispatch._KERNELS, name, counted)
    monkeypatch.setenv("GEOMOPT_KERNELS", "1")
    return counts


POET_CONFIGS = {
    "paper": dict(block_size=16, merge_every=3),
    "lean": dict(block_size=16, merge_every=3, store_base=False),
    "fs": dict(block_size=16, mode="fs", merge_every=3),
}


@pytest.mark.parametrize("cfg", list(POET_CONFIGS))
def test_poet_step_on_the_kernel_device_runs_the_tile_kernels_and_matches_the_reference(cfg, calls, monkeypatch):
    def make(net):
        return geomopt.POET(net, lr=3e-2, **POET_CONFIGS[cfg])

    want = train(make)
    assert calls == {}  # CPU tensors: the references ran
    monkeypatch.setattr(dispatch, "_on_kernel_device", lambda x: True)
    got = train(make)
    # lean mode's safeguard steps also map the old generators again (the map's kernel) for the exact rotations
    assert POET_KERNELS <= set(calls) <= POET_KERNELS | {"cayley_neumann"} and min(calls.values()) > 0
    # fp32: the kernels evaluate the Cayley-Neumann polynomial by Horner's scheme, the reference in powers of Q^2
    # (the same polynomial, other rounding), and Adam's normalized steps carry that rounding through 4 steps
    for a, b in zip(got, want):
        assert rel_err(a, b) < 3e-5
    assert any(rel_err(a, b) > 1e-3 for a, b in zip(want, [p.detach() for p in model().parameters()]))


def test_dlra_retraction_on_the_kernel_device_runs_cholesky_qr2_and_matches_the_reference(calls, monkeypatch):
    def make(net):
        return geomopt.DLRAMomentum(net, lr=5e-2, rank=4, stabilize_every=2)

    want = train(make)
    assert calls == {}
    monkeypatch.setattr(dispatch, "_on_kernel_device", lambda x: True)
    got = train(make)
    assert set(calls) == {"tall_qr"} and calls["tall_qr"] > 0
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_float64_stays_on_the_references_even_on_the_kernel_device(calls, monkeypatch, float64):
    monkeypatch.setattr(dispatch, "_on_kernel_device", lambda x: True)
    train(lambda net: geomopt.POET(net, lr=3e-2, block_size=16))
    assert calls == {}
