"""A LowRankLinear model under FSDP2 (fully_shard, gloo, CPU), for tests/test_lowrank_linear.py: rank 0 saves the
gathered factor gradients of one sharded forward and backward, those of the same model unsharded, the roles the
sharded factors carry, and the error DLRAMomentum raises on them."""
import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import geomopt
from geomopt.nn import LowRankLinear
from geomopt.nn.lowrank import lowrank_role


def main(rank: int, world: int, out: str, init_file: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(LowRankLinear(12, 10, 3), torch.nn.Tanh(), LowRankLinear(10, 8, 2))
    plain = copy.deepcopy(model)
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh)
    x = torch.randn(6, 12)
    model(x).square().sum().backward()
    plain(x).square().sum().backward()
    sharded = [p.grad.full_tensor() for p in model.parameters()]
    roles = [lowrank_role(p) for p in model.parameters()]
    try:
        geomopt.DLRAMomentum(model, lr=1e-2, rank=2)
        error = ""
    except TypeError as e:
        error = str(e)
    if rank == 0:
        torch.save({"sharded": sharded, "plain": [p.grad for p in plain.parameters()], "roles": roles,
                    "error": error}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
