"""The kernels reach the optimizers only through the one dispatch point: every registered kernel has a torch
reference of the same name, takes CUDA tensors only (CPU ones inside ``kernels_on_cpu``), is off until enabled,
declares what it can do and what it takes at most; and a launch is noted with the bytes of its arguments."""
import pytest
import torch

from geomopt.geometry import dispatch
from geomopt.geometry.dispatch import REFERENCES, kernel_for

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("geomopt.kernels")


class FakeCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


def test_registered_kernels_are_used_for_cuda_tensors_only(monkeypatch):
    cpu = torch.zeros(4, 4)
    fake = cpu.as_subclass(FakeCuda)
    fake64 = cpu.double().as_subclass(FakeCuda)
    registered = {name: getattr(mod, name) for mod in kernels.OPS for name in mod.__all__}
    # no kernel: the exact Cayley map (a batched Cholesky), what only the references do (the in-place rotations,
    # the map with its bound, the stacked column side of the staged pipeline) and the per-op block passes, which
    # the tile kernels replace on the kernel path
    assert set(registered) == {"cayley_neumann", "cayley_series", "tile_grads", "tile_rewrite", "factor_update",
                               "tall_qr"}
    assert set(registered) <= set(REFERENCES)
    assert all(kernel_for(name, fake) is REFERENCES[name] for name in registered)  # opt-in: off by default
    monkeypatch.setenv("GEOMOPT_KERNELS", "1")
    for name in registered:
        assert kernel_for(name, cpu) is REFERENCES[name]
        assert kernel_for(name, fake) is registered[name]
        assert kernel_for(name, [fake, cpu]) is registered[name]  # a grouped stage: its first tensor decides
        assert kernel_for(name, fake64) is REFERENCES[name]  # float64 stays on the reference
    assert dispatch.can("rotate_rows", cpu, "in_place") and dispatch.can("cayley_neumann", cpu, "with_bound")
    assert not dispatch.can("cayley_neumann", fake, "with_bound")
    assert dispatch.can("tile_grads", fake, "tiled") and not dispatch.can("tile_grads", cpu, "tiled")
    assert dispatch.limit("tile_rewrite", fake, "block") == dispatch.limit("factor_update", fake, "block") == 64
    assert dispatch.limit("tile_grads", fake, "block") is None and dispatch.limit("tile_rewrite", cpu, "block") is None
    monkeypatch.setenv("GEOMOPT_KERNELS", "0")
    assert all(kernel_for(name, fake) is REFERENCES[name] for name in registered)


def test_kernels_on_cpu_routes_cpu_tensors_and_restores_the_setting(monkeypatch):
    monkeypatch.delenv("GEOMOPT_KERNELS", raising=False)
    with dispatch.kernels_on_cpu():
        assert kernel_for("tile_grads", torch.zeros(2)) is kernels.tile_grads.tile_grads
    assert kernel_for("tile_grads", torch.zeros(2)) is REFERENCES["tile_grads"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with dispatch.kernels_on_cpu():
            pass


def test_a_launch_is_recorded_with_the_bytes_of_its_arguments():
    q = torch.randn(3, 120)  # three 16 x 16 skew blocks
    with dispatch.record_launches() as launches:
        kernels.cayley.cayley_neumann(q, 16, 4)
    assert [x.name for x in launches] == ["cayley_neumann"]
    assert launches[0].bytes == 3 * 120 * 4 + 3 * 16 * 16 * 4  # q read once, the blocks written once
    with dispatch.record_launches() as none:
        pass
    assert none == []
