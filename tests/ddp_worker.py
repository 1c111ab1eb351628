"""A DDP training run (gloo, CPU) for tests/test_distributed.py: every rank trains on its half of each global
batch and saves its final parameters; with world size 1 it trains on the whole batch. Mode "in_backward":
geomopt.step_in_backward on the DDP module, each rank's half in two micro-batches (the first under no_step)."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from grow_models import llama  # noqa: E402
from optim_table import methods  # noqa: E402

import geomopt  # noqa: E402
from geomopt.data import load_corpus, sample_batch  # noqa: E402

METHODS = methods(3, block_size=8, rank=4, alpha=8)  # one optimizer per method of the registry
MAKERS = {
    **METHODS,
    # one process with the row permutation scope of a 2-rank FSDP2 run (row blocks inside each half)
    "poet-rows2": lambda m: METHODS["poet"](m, row_shards=2),
    # the multi-tensor path: the weights of one shape stepped together
    "poet-grouped": lambda m: METHODS["poet"](m, foreach=True),
    # lean mode on bf16 weights, with its rounding buffer (the FSDP2 test builds the model in bf16)
    "poet-lean-bf16": lambda m: METHODS["poet"](m, store_base=False),
}


def main(rank: int, world: int, name: str, out: str, init_file: str, mode: str = "step") -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # the comparison with one process is to 1e-6: keep rounding out of it
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = llama()
    model.train()
    opt = MAKERS[name](model)  # built on the plain module: the same routing and seeds on every rank
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    train, _ = load_corpus(max_bytes=100_000)
    gen = torch.Generator().manual_seed(0)
    handle = geomopt.step_in_backward(net, opt) if mode == "in_backward" else None
    for _ in range(7):
        batch = sample_batch(train % 64, 8, 16, gen)
        part = batch.chunk(world)[rank]
        if handle is None:
            opt.zero_grad()
            net(part, labels=part).loss.backward()
            opt.step()
            continue
        first, last = part.chunk(2)
        with handle.no_step():
            (net(first, labels=first).loss / 2).backward()
        (net(last, labels=last).loss / 2).backward()
        assert all(p.grad is None for p in model.parameters()), "a gradient was left after the stepping backward"
    torch.save([p.detach() for p in model.parameters()], out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, name, out, init_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    main(rank, world, name, out, init_file, *sys.argv[6:])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it once the peer has gone
