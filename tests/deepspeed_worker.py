"""One process under DeepSpeed (CPU accelerator, gloo): prints a JSON line per case. Run by test_deepspeed.py."""
import json
import os
import sys
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                   ("LOCAL_RANK", "0")):
    os.environ.setdefault(key, value)  # the test sets a free MASTER_PORT
warnings.filterwarnings("ignore")

import deepspeed  # noqa: E402
import torch  # noqa: E402

import geomopt  # noqa: E402

STEPS = 3


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))


def data():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 16, generator=gen) for _ in range(STEPS)]


def make(name, m):
    if name == "poet":
        return geomopt.POET(m, lr=1e-2, block_size=8, merge_every=2)
    if name == "relora":
        return geomopt.ReLoRAReset(m, lr=1e-2, rank=4, reset_every=2)
    return geomopt.DLRAMomentum(m, lr=1e-2, rank=4)


def plain(name):
    m = model()
    opt = make(name, m)
    for x in data():
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    return m


def under_deepspeed(name, stage, bf16=False):
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    opt = make(name, m)
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}}
    engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=cfg)
    try:
        for x in data():
            loss = engine(x.to(torch.bfloat16 if bf16 else torch.float32)).float().square().mean()
            engine.backward(loss)
            engine.step()
    except RuntimeError as err:
        unchanged = all(torch.equal(a, b.to(a.dtype)) for a, b in zip(before, m.parameters()))
        return {"error": str(err), "unchanged": unchanged}
    routed = sum(1 for g in opt.param_groups for p in g["params"] if g["factorize"] and p.dim() == 2)
    changed = not all(torch.equal(a, b.to(a.dtype)) for a, b in zip(before, m.parameters()))
    return {"routed": routed, "model": m, "changed": changed}


def main():
    out = {}
    for name in ("poet", "relora", "dlra"):
        ref = plain(name)
        got = under_deepspeed(name, 0)
        out[f"{name}-stage0"] = {"routed": got["routed"], "equal": all(
            torch.equal(a, b) for a, b in zip(ref.parameters(), got["model"].parameters()))}
        bf = under_deepspeed(name, 0, bf16=True)
        out[f"{name}-stage0-bf16"] = {"routed": bf["routed"], "changed": bf["changed"],
                                      "dtype": str(next(bf["model"].parameters()).dtype)}
        for stage in (1, 2):
            out[f"{name}-stage{stage}"] = under_deepspeed(name, stage)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
