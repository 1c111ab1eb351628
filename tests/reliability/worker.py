"""A training loop for the reliability tests, run in fresh processes.

    python worker.py NAME OUT --steps A:B [--save-at 4,5] [--resume CKPT ...]   # torch.save of model + optimizer
    python worker.py NAME OUT --steps 0:T --every K --crash-safe  # geomopt.checkpoint every K steps, resumes

Batches depend only on the step index, so any split of the steps sees the same data.
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from optim_table import methods  # noqa: E402

from geomopt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

# one optimizer per method of the registry; small cycles, so that the resume points land before, on and after a
# merge / reset
MAKERS = methods(5, block_size=8, rank=3, alpha=6, restart_warmup_steps=2)


def make_model():
    torch.manual_seed(0)
    # 21 = 2 x 8 + 5, 13 = 8 + 5: ragged blocks; the LayerNorm and biases go to AdamW
    return nn.Sequential(nn.Linear(13, 21), nn.Tanh(), nn.LayerNorm(21), nn.Linear(21, 13), nn.Tanh(),
                         nn.Linear(13, 4))


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 13, generator=g), torch.randn(16, 4, generator=g)


def train_step(model, opt, step):
    x, y = batch(step)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=list(MAKERS))
    p.add_argument("out")
    p.add_argument("--steps", required=True)
    p.add_argument("--resume", nargs="*", default=[], help="checkpoints to resume from, one after another; "
                   "each resumed run is saved to OUT.<i>")
    p.add_argument("--save-at", default="", help="also save the plain checkpoint OUT.at<step> after these steps")
    p.add_argument("--every", type=int, default=0)
    p.add_argument("--crash-safe", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start, end = (int(v) for v in args.steps.split(":"))
    model = make_model()
    opt = MAKERS[args.name](model)
    if args.crash_safe:
        if os.path.exists(args.out):
            start = load_checkpoint(args.out, model, opt)["step"]
            print(f"resumed at {start}", flush=True)
        for step in range(start, end):
            train_step(model, opt, step)
            if args.every and (step + 1) % args.every == 0:
                save_checkpoint(args.out, model, opt, step=step + 1)
            print(f"step {step + 1}", flush=True)
        torch.save([q.detach() for q in model.parameters()], args.out + ".final")
        return
    for i, path in enumerate(args.resume):  # each from a model and optimizer that never trained here
        model = make_model()
        opt = MAKERS[args.name](model)
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        for step in range(ckpt["step"], end):
            train_step(model, opt, step)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"{args.out}.{i}")
    if args.resume:
        return
    save_at = {int(v) for v in args.save_at.split(",") if v}
    for step in range(start, end):
        train_step(model, opt, step)
        if step + 1 in save_at:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1},
                       f"{args.out}.at{step + 1}")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, args.out)


if __name__ == "__main__":
    sys.exit(main())
