"""The step torch.distributed.checkpoint runs to create state (zero gradients, lr = 0) changes nothing, and a
run that went through it is bit-identical to one that did not; bf16 weights keep fp32 factors through
save/load, and a 200-step bf16 run tracks the fp32 run's loss within 2%."""
import io
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import worker  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from grow_models import llama  # noqa: E402
from optim_table import methods  # noqa: E402

from geomopt.data import load_corpus, sample_batch  # noqa: E402

state_dict_mod = pytest.importorskip("torch.distributed.checkpoint.state_dict")


@pytest.mark.parametrize("name", list(worker.MAKERS))
def test_the_distributed_checkpoint_init_step_leaves_the_run_bit_identical(name):
    plain, primed = worker.make_model(), worker.make_model()
    opt_plain, opt_primed = worker.MAKERS[name](plain), worker.MAKERS[name](primed)
    before = [p.detach().clone() for p in primed.parameters()]
    state_dict_mod._init_optim_state(opt_primed)  # what get_optimizer_state_dict does to a fresh optimizer
    assert len(opt_primed.state) == len(list(primed.parameters()))  # every tensor has state now
    assert all(torch.equal(a, b) for a, b in zip(before, primed.parameters()))
    for step in range(12):  # across two merges / resets
        worker.train_step(plain, opt_plain, step)
        worker.train_step(primed, opt_primed, step)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), primed.parameters()))


MAKERS = methods(50, lr=3e-3, block_size=8, rank=8, alpha=8, restart_warmup_steps=5)


@pytest.mark.parametrize("name", list(MAKERS))
def test_bf16_run_tracks_fp32_and_factors_stay_fp32_through_save_load(name):
    train, val = load_corpus(max_bytes=200_000)
    held_out = sample_batch(val % 64, 16, 32, torch.Generator().manual_seed(5))
    finals = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = llama().to(dtype)
        opt = MAKERS[name](model)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(200):
            batch = sample_batch(train % 64, 8, 32, gen)
            opt.zero_grad()
            model(batch, labels=batch).loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            finals[dtype] = model(held_out, labels=held_out).loss.float().item()
        if dtype is torch.bfloat16:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            twin = MAKERS[name](model)
            twin.load_state_dict(torch.load(buf, weights_only=True))
            factors = [t for st in twin.state.values() for key in ("q_row", "q_col", "w0", "A", "B", "U", "S", "V")
                       for t in (st[key] if isinstance(st.get(key), list) else [st.get(key)]) if t is not None]
            assert factors and all(t.dtype == torch.float32 for t in factors)
    assert finals[torch.float32] < 3.9  # it learned (log 64 = 4.16)
    assert abs(finals[torch.bfloat16] - finals[torch.float32]) <= 0.02 * finals[torch.float32], finals
