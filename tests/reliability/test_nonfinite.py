"""NaN / Inf injected into random gradients at random steps over 1000 steps: each such parameter's step is
skipped ("skip") or the step raises before changing anything ("raise"); no weight, factor or moment ever
holds a non-finite value; the skips are counted in the optimizer's stats; the final loss is finite."""
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import worker  # noqa: E402


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def all_finite(model, opt):
    return all(bool(torch.isfinite(t).all()) for t in [*model.parameters(), *tensors(opt.state)]
               if t.is_floating_point())


@pytest.mark.parametrize("name", list(worker.MAKERS))
def test_injected_nonfinite_gradients_are_skipped_for_the_affected_parameter(name):
    model = worker.make_model()
    opt = worker.MAKERS[name](model)
    params = list(model.parameters())
    rng = random.Random(name)
    injected = 0
    for step in range(1000):
        x, y = worker.batch(step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        hit = rng.sample(range(len(params)), rng.randint(1, 2)) if rng.random() < 0.1 else []
        before = {i: params[i].detach().clone() for i in hit}
        for i in hit:
            g = params[i].grad.view(-1)
            g[rng.randrange(g.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        injected += len(hit)
        opt.step()
        for i in hit:
            assert torch.equal(params[i].detach(), before[i])  # the affected parameter did not move
        if step % 50 == 0 or hit:
            assert all_finite(model, opt), step
    assert all_finite(model, opt)
    assert opt.stats["nonfinite_skips"] == injected > 50
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(worker.batch(0)[0]), worker.batch(0)[1])
    assert torch.isfinite(final)


@pytest.mark.parametrize("name", list(worker.MAKERS))
def test_raise_policy_raises_and_changes_nothing(name):
    model = worker.make_model()
    opt = worker.MAKERS[name](model)
    opt.nonfinite = "raise"
    for step in range(7):  # past a merge / reset, so the state is not fresh
        worker.train_step(model, opt, step)
    x, y = worker.batch(7)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    list(model.parameters())[3].grad[0] = float("nan")
    weights = [p.detach().clone() for p in model.parameters()]
    state = [t.clone() for t in tensors(opt.state)]
    with pytest.raises(FloatingPointError, match="non-finite gradient in 1 parameter"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(state, tensors(opt.state)))
