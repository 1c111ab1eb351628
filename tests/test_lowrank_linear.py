"""``geomopt.nn.LowRankLinear``: the forward and the input gradient are those of ``nn.Linear`` with W = U S V^T, the
factors' gradients are the projections of the dense gradient the geometry needs (G V, U^T G V, G^T U) without G
being formed, ``from_linear`` / ``to_linear`` round trip, ``convert`` swaps the routed layers, and bad arguments are
refused by name."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from torch import nn

import geomopt
from geomopt.nn import LowRankLinear, convert, lowrank_role

SHAPES = [(37, 21, 5), (64, 64, 16), (13, 40, 13)]  # (in, out, rank)


def pair(n, m, r, dtype, seed=0):
    torch.manual_seed(seed)
    layer = LowRankLinear(n, m, r, dtype=dtype)
    dense = nn.Linear(n, m, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(layer.weight_matrix())
        dense.bias.copy_(layer.bias)
    return layer, dense


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n,m,r", SHAPES, ids=[f"{n}to{m}-r{r}" for n, m, r in SHAPES])
def test_forward_and_input_gradient_equal_the_dense_layer(n, m, r, dtype, tol):
    layer, dense = pair(n, m, r, dtype)
    x = torch.randn(3, 7, n, dtype=dtype, requires_grad=True)  # leading batch dimensions
    x2 = x.detach().clone().requires_grad_()
    up = torch.randn(3, 7, m, dtype=dtype)
    y, y2 = layer(x), dense(x2)
    assert y.shape == y2.shape and rel_err(y, y2) < tol
    y.backward(up)
    y2.backward(up)
    assert rel_err(x.grad, x2.grad) < tol and rel_err(layer.bias.grad, dense.bias.grad) < tol


@pytest.mark.parametrize("n,m,r", SHAPES, ids=[f"{n}to{m}-r{r}" for n, m, r in SHAPES])
def test_factor_gradients_are_the_projections_of_the_dense_gradient(n, m, r):
    layer, dense = pair(n, m, r, torch.float64, seed=1)
    x = torch.randn(11, n, dtype=torch.float64)
    up = torch.randn(11, m, dtype=torch.float64)
    layer(x).backward(up)
    dense(x).backward(up)
    g, u, v = dense.weight.grad, layer.U.detach(), layer.V.detach()
    assert rel_err(layer.U.grad, g @ v) < 1e-12
    assert rel_err(layer.S.grad, u.T @ g @ v) < 1e-12
    assert rel_err(layer.V.grad, g.T @ u) < 1e-12


def test_bf16_autocast_runs_in_bf16_and_gives_fp32_factor_gradients():
    layer, dense = pair(32, 24, 8, torch.float32, seed=2)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y2 = layer(x), dense(x)
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), y2.float()) < 2e-2
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in (layer.U, layer.S, layer.V))


def test_from_linear_and_to_linear_round_trip():
    torch.manual_seed(3)
    linear = nn.Linear(30, 20, dtype=torch.float64)
    full = LowRankLinear.from_linear(linear, 20)  # full rank: the SVD holds the whole weight
    assert rel_err(full.weight_matrix(), linear.weight) < 1e-12
    back = full.to_linear()
    assert type(back) is nn.Linear and rel_err(back.weight, linear.weight) < 1e-12 and torch.equal(back.bias,
                                                                                                  linear.bias)
    low = LowRankLinear.from_linear(linear, 4)  # truncated: the best rank-4 approximation
    u, s, vh = torch.linalg.svd(linear.weight.detach())
    assert rel_err(low.weight_matrix(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4]) < 1e-12
    assert rel_err(LowRankLinear.from_linear(low.to_linear(), 4).weight_matrix(), low.weight_matrix()) < 1e-12
    eye = torch.eye(4, dtype=torch.float64)
    assert rel_err(low.U.T @ low.U, eye) < 1e-12 and rel_err(low.V.T @ low.V, eye) < 1e-12


def test_state_dict_deepcopy_and_a_changed_rank():
    layer = LowRankLinear(16, 12, 4)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(torch.ones(2, 16)), layer(torch.ones(2, 16))) and lowrank_role(twin.S) == "S"
    smaller = LowRankLinear(16, 12, 2)
    layer.load_state_dict(smaller.state_dict())  # a checkpoint saved after a rank change loads
    assert layer.rank == 2 and torch.equal(layer(torch.ones(2, 16)), smaller(torch.ones(2, 16)))
    assert "rank=2" in repr(layer)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)  # a head stays dense

    def forward(self, x):
        return self.head(self.body(x))


def test_convert_swaps_the_routed_linears_and_keeps_the_function_at_full_rank():
    torch.manual_seed(4)
    model = Net()
    x = torch.randn(4, 8)
    before = model(x)
    assert convert(model, rank=8) == ["body.0", "body.2"]
    assert isinstance(model.body[0], LowRankLinear) and type(model.head) is nn.Linear
    assert rel_err(model(x), before) < 1e-5
    model2 = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"rank=4 exceeds min\(out_features, in_features\)=2 of '1'"):
        convert(model2, rank=4)
    assert all(type(m) is nn.Linear for m in model2)  # nothing swapped
    assert convert(model2, rank=4, exclude="1") == ["0"]


@pytest.mark.parametrize("args,match", [
    ((8, 6, 0), r"rank must be an int in \[1, min\(out_features, in_features\)\] = \[1, 6\], got 0"),
    ((8, 6, 7), r"= \[1, 6\], got 7"),
    ((8, 6, 2.0), r"got 2.0"),
    ((0, 6, 2), "in_features must be an int >= 1, got 0"),
])
def test_bad_arguments_are_refused_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        LowRankLinear(*args)


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        LowRankLinear.from_linear(nn.Conv1d(2, 2, 1), 1)
    with pytest.raises(ValueError, match="input of 5 features, the layer takes 8"):
        LowRankLinear(8, 6, 2)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        convert(nn.Linear(4, 4), rank=0)


def test_the_model_compiles():
    torch.manual_seed(5)
    model = nn.Sequential(LowRankLinear(16, 16, 4), nn.Tanh(), LowRankLinear(16, 8, 4))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 16)
    assert rel_err(compiled(x), model(x)) < 1e-6
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_geomopt_exports_the_layer():
    assert geomopt.nn.LowRankLinear is LowRankLinear


def test_a_factor_assigned_anew_is_a_factor():
    """``layer.U = nn.Parameter(...)`` (and FSDP2, which assigns the sharded Parameters the same way) keeps the
    role, so an optimizer still steps the layer's three factors together."""
    layer = LowRankLinear(6, 5, 2)
    new = nn.Parameter(layer.U.detach().clone())
    layer.U = new
    assert lowrank_role(new) == "U" and lowrank_role(layer.S) == "S"
    assert lowrank_role(nn.Parameter(new.detach().clone())) is None


def test_fsdp2_shards_the_factors_exactly_and_dlra_refuses_them_by_name(tmp_path):
    """fully_shard (gloo, 2 processes): the gathered factor gradients equal the unsharded model's bit for bit,
    the sharded factors keep their roles, and DLRAMomentum refuses them with a TypeError naming the layer."""
    pytest.importorskip("torch.distributed.fsdp")
    worker = os.path.join(os.path.dirname(__file__), "fsdp_lowrank_worker.py")
    out, env = tmp_path / "fsdp-lowrank.pt", dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, worker, str(r), "2", str(out), str(tmp_path / "init")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    result = torch.load(out, weights_only=True)
    for a, b in zip(result["sharded"], result["plain"]):
        assert torch.equal(a, b)
    assert result["roles"] == ["U", "S", "V", None] * 2
    assert "LowRankLinear sharded by FSDP2" in result["error"] and "(10, 3)" in result["error"]
