"""An FSDP2 run (fully_shard, gloo, CPU) for tests/test_distributed.py: 7 steps on the global batch, with a
distributed checkpoint after step 4 restored into a fresh model and optimizer; rank 0 saves the full final
parameters of both the uninterrupted and the restored run, the shapes of the DTensors the optimizer's steps
gathered whole (``full_tensor``), and the local shapes of each routed weight's per-rank state."""
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(__file__))
from ddp_worker import MAKERS  # noqa: E402
from grow_models import llama  # noqa: E402

from geomopt.data import load_corpus, sample_batch  # noqa: E402


def build(name, mesh):
    model = llama().to(torch.bfloat16 if name.endswith("-bf16") else torch.float64)
    model.train()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, MAKERS[name](model)


STEPS = [0]  # optimizer steps taken in this process (both runs)
GATHERED = []  # (index of the optimizer step, shape) of every DTensor a step gathered whole


def recording_full_tensor(original, step):
    def full_tensor(self, *args, **kwargs):
        GATHERED.append((step, tuple(self.shape)))
        return original(self, *args, **kwargs)
    return full_tensor


def steps(model, opt, batches, rank, world):
    original = DTensor.full_tensor
    for batch in batches:
        part = batch.chunk(world)[rank]
        opt.zero_grad()
        model(part, labels=part).loss.backward()
        DTensor.full_tensor = recording_full_tensor(original, STEPS[0])
        try:
            opt.step()
        finally:
            DTensor.full_tensor = original
            STEPS[0] += 1


def main(rank: int, world: int, name: str, out: str, init_file: str, ckpt: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    train, _ = load_corpus(max_bytes=100_000)
    gen = torch.Generator().manual_seed(0)
    batches = [sample_batch(train % 64, 8, 16, gen) for _ in range(7)]
    model, opt = build(name, mesh)
    steps(model, opt, batches[:4], rank, world)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    steps(model, opt, batches[4:], rank, world)
    full = [p.full_tensor().detach() for p in model.parameters()]
    local_state = {}  # the routed weights' row-sharded state: (key, local shape), e.g. ReLoRA's B, POET's w0
    for p in model.parameters():
        st = opt.state.get(p, {})
        for key in ("B", "w0", "U", "perm_row", "comp"):
            if isinstance(st.get(key), DTensor):
                local_state.setdefault(key, []).append((tuple(st[key].shape), tuple(st[key].to_local().shape)))
    gathered = list(GATHERED)

    model2, opt2 = build(name, mesh)
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    steps(model2, opt2, batches[4:], rank, world)
    restored = [p.full_tensor().detach() for p in model2.parameters()]
    if rank == 0:
        torch.save({"full": full, "restored": restored, "gathered": gathered, "local_state": local_state,
                    "weights": [tuple(p.shape) for p in model.parameters() if p.dim() == 2]}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it once the peer has gone
