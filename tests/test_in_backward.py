"""geomopt.step_in_backward: each weight steps inside backward and its gradient is freed; the result equals
the ordinary backward-then-step loop (with and without gradient accumulation)."""
import pytest
import torch
from conftest import rel_err
from grow_models import llama

import geomopt
from geomopt.data import load_corpus, sample_batch

MAKERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01),
    "poet-lean": lambda m: geomopt.POET(m, lr=1e-2, block_size=8, merge_every=3, store_base=False),
    "relora": lambda m: geomopt.ReLoRAReset(m, lr=1e-2, rank=4, alpha=8, reset_every=3),
    "dlra": lambda m: geomopt.DLRAMomentum(m, lr=3e-3, rank=4, method="adam"),
}


def batches(n, micro=1):
    train, _ = load_corpus(max_bytes=100_000)
    gen = torch.Generator().manual_seed(0)
    return [sample_batch(train % 64, 8, 16, gen).chunk(micro) for _ in range(n)]


def train(name, in_backward, micro=1, steps=7):
    torch.manual_seed(0)
    model = llama()
    opt = MAKERS[name](model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    handle = geomopt.step_in_backward(model, opt) if in_backward else None
    seen_grads = []
    for parts in batches(steps, micro):
        for i, part in enumerate(parts):
            loss = model(part, labels=part).loss / micro
            if handle is not None and i < micro - 1:
                with handle.no_step():
                    loss.backward()
                seen_grads.append(sum(p.grad is not None for p in model.parameters()))
            else:
                loss.backward()
        if handle is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            seen_grads.append(sum(p.grad is not None for p in model.parameters()))
            opt.step()  # a no-op in this mode: no gradient is left
        sched.step()
    return model, seen_grads


@pytest.mark.parametrize("micro", [1, 2], ids=["plain", "accumulate2"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_same_weights_as_the_ordinary_step_and_no_gradient_left(name, micro, float64):
    ref, _ = train(name, False, micro)
    got, seen = train(name, True, micro)
    n = sum(1 for _ in got.parameters())
    # after a stepping backward no gradient is left; after a no_step backward every one is there
    assert seen == ([0] * 7 if micro == 1 else [n, 0] * 7)
    for (key, a), b in zip(got.named_parameters(), ref.parameters()):
        assert rel_err(a, b) < 1e-6, key
    torch.manual_seed(0)
    start = llama()
    assert any(rel_err(a, b) > 1e-3 for a, b in zip(got.parameters(), start.parameters()))  # it trained


def test_remove_restores_the_ordinary_loop():
    model = llama()
    opt = geomopt.POET(model, lr=1e-2, block_size=8)
    handle = geomopt.step_in_backward(model, opt)
    with pytest.raises(RuntimeError, match="already active"):
        geomopt.step_in_backward(model, opt)
    handle.remove()
    before = [p.detach().clone() for p in model.parameters()]
    part = batches(1)[0][0]
    model(part, labels=part).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))  # nothing stepped in backward
    geomopt.step_in_backward(model, opt).remove()  # can be registered again


def test_bad_arguments_name_what_is_wrong():
    model = llama()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        geomopt.step_in_backward(model, [1])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        geomopt.step_in_backward("model", torch.optim.SGD(model.parameters(), lr=0.1))
    other = torch.optim.SGD(torch.nn.Linear(3, 5).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"not parameters of model \(first of shape \(5, 3\)\)"):
        geomopt.step_in_backward(model, other)
