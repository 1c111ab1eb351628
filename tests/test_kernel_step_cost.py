"""What a POET step on the kernels moves, counted from the launch arguments (``benchmarks/step_cost.py``'s meter with
the kernel launches, under TRITON_INTERPRET=1): each of the three kernels touches what its design says and nothing
more, and on weights of 512 x 512 at b = 32 a lean step moves at most fused AdamW's bytes, paper mode at most 1.25x
(the floor of this count: G and W read once and W rewritten in place, 0.75x; paper mode reads W0 too, 1.0x)."""
import os
import sys

import pytest
import torch
from torch import nn

import geomopt
from geomopt.geometry import dispatch

pytest.importorskip("triton")
pytest.importorskip("geomopt.kernels")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import step_cost  # noqa: E402

SIDE, B = 512, 32


def metered(make):
    """(bytes of one plain step, its launches by name, parameter bytes): the third step of two linear layers of one
    shape, stepped together (one launch per stage)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(SIDE, SIDE, bias=False), nn.Linear(SIDE, SIDE, bias=False))
    opt = make(net)
    x = torch.randn(4, SIDE)
    with dispatch.kernels_on_cpu():
        for step in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            if step < 2:
                opt.step()
                continue
            meter = step_cost.StepCost()
            with meter:
                opt.step()
    by_name = {}
    for launch in meter.launches:
        by_name.setdefault(launch.name, []).append(launch.bytes)
    return meter.bytes, by_name, sum(p.numel() * 4 for p in net.parameters())


@pytest.fixture(scope="module")
def adamw_bytes():
    return metered(lambda net: torch.optim.AdamW(net.parameters(), fused=True))[0]


@pytest.mark.parametrize("store_base,ceiling", [(False, 1.0), (True, 1.25)], ids=["lean", "paper"])
def test_a_kernel_step_moves_what_its_design_says(store_base, ceiling, adamw_bytes):
    total, launches, param_bytes = metered(lambda net: geomopt.POET(net, lr=1e-3, block_size=B, merge_every=100,
                                                                     store_base=store_base))
    assert {k: len(v) for k, v in launches.items() if k != "copy_to_device"} == {
        "tile_grads": 1, "factor_update": 1, "tile_rewrite": 1}  # one launch per stage for both weights
    blocks = 2 * 2 * SIDE * B * 4  # the b x b matrices of both sides of both weights, fp32
    packed = blocks * (B - 1) // (2 * B)  # their packed generators
    orders = 2 * 2 * SIDE * 8  # the permutations as int64 index vectors
    tables = 2 * 8 + (2 * SIDE) * 4 * 2  # small tables: flags, the checksums of paper mode, segments, offsets
    [grads] = launches["tile_grads"]  # G and W once, the block gradients, no copies
    assert 2 * param_bytes + blocks <= grads <= 2 * param_bytes + blocks + orders + tables + 4096
    [update] = launches["factor_update"]  # the blocks in place, generators and moments in and out
    assert blocks + 6 * packed <= update <= blocks + 6 * packed + 4096
    [rewrite] = launches["tile_rewrite"]  # W in place (paper mode: W0 read, W written) and the blocks
    weights = (2 if store_base else 1) * param_bytes
    assert weights + blocks <= rewrite <= weights + blocks + orders + tables + 4096
    assert total / adamw_bytes <= ceiling
    assert total / adamw_bytes >= (1.0 if store_base else 0.75)  # the floor of the count
