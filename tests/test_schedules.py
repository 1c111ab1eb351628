"""The one cosine-with-warm-up schedule (``geomopt.schedules.warmup_cosine``): equal to transformers' cosine
schedule, the warm-up offset, the jagged cosine built on it, and ``make_optimizer``'s schedulers, which all start
the same way."""
import math

import pytest
import torch
from torch import nn

from geomopt import registry
from geomopt.integrations import make_optimizer
from geomopt.schedules import jagged_cosine, warmup_cosine


def test_offset_0_equals_transformers_cosine_schedule():
    transformers = pytest.importorskip("transformers")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=50)
    ours = warmup_cosine(total_steps=50, warmup_steps=7, min_lr_ratio=0.0)
    for step in range(51):
        assert math.isclose(ours(step), theirs.lr_lambdas[0](step), rel_tol=1e-15, abs_tol=1e-15)


def test_offset_1_shifts_the_warm_up_only():
    zero = warmup_cosine(total_steps=40, warmup_steps=8, min_lr_ratio=0.1)
    one = warmup_cosine(total_steps=40, warmup_steps=8, min_lr_ratio=0.1, warmup_offset=1)
    assert [one(t) for t in range(8)] == [zero(t + 1) if t < 7 else 1.0 for t in range(8)]
    assert one(0) == 1 / 8 and zero(0) == 0.0
    assert all(one(t) == zero(t) for t in range(8, 60))
    assert zero(40) == zero(59) == pytest.approx(0.1, abs=1e-15)


def test_jagged_cosine_is_warmup_cosine_between_restarts():
    plain = warmup_cosine(total_steps=100, warmup_steps=10, warmup_offset=1)
    jagged = jagged_cosine(total_steps=100, warmup_steps=10, restart_every=30, restart_warmup_steps=5,
                           warmup_offset=1)
    for t in range(100):
        since = t % 30
        if t >= 30 and since < 5:
            assert jagged(t) == plain(t) * (since / 5)
        else:
            assert jagged(t) == plain(t)


@pytest.mark.parametrize("value", [2, -1, True, 0.5])
def test_warmup_offset_is_checked(value):
    with pytest.raises(ValueError, match="warmup_offset must be 0 or 1"):
        warmup_cosine(total_steps=10, warmup_offset=value)


@pytest.mark.filterwarnings("ignore:geomopt")
@pytest.mark.parametrize("name", registry.names())
def test_make_optimizer_schedulers_start_at_lr_over_warmup(name):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    extra = "".join(f",{k}={v}" for k, v in registry.get(name).test_kwargs.items() if k != "lr")
    opt, sched = make_optimizer(model, f"{name}:lr=0.5,warmup=4{extra}", total_steps=40)
    firsts = []
    for _ in range(5):
        firsts.append(opt.param_groups[0]["lr"])
        sched.step()
    assert firsts == [0.5 / 4, 0.5 * 2 / 4, 0.5 * 3 / 4, 0.5, 0.5]
