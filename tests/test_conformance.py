"""torch.optim conventions, for every optimizer in the table."""
import copy
import io

import pytest
import torch
from optim_table import CONFIGS, IDS
from torch import nn


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 12), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6), nn.LayerNorm(6),
                         nn.Linear(6, 11)).to(dtype)


class Head(nn.Module):
    """The last Linear is the LM head: get_output_embeddings tells the optimizer."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def get_output_embeddings(self):
        return self.seq[-1]

    def forward(self, x):
        return self.seq(x)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 11, (16,), generator=g) for _ in range(n)]


def loss_of(model, tokens):
    logits = model(tokens[:-1])
    return nn.functional.cross_entropy(logits.float(), tokens[1:])


def train(model, opt, data, sched=None):
    losses = []
    for tokens in data:
        opt.zero_grad()
        loss = loss_of(model, tokens)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def build(name, model, **over):
    return CONFIGS[name].build(model, **over)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", IDS)
def test_routing_embeddings_and_head_on_adamw(name):
    model = Head(make_model())
    opt = build(name, model)
    train(model, opt, batches(2))
    key = CONFIGS[name].factor_key
    emb, l1, l2, head = model.seq[0].weight, model.seq[1].weight, model.seq[3].weight, model.seq[5].weight
    for p in (l1, l2):
        assert key in opt.state[p]
    for p in (emb, head, model.seq[1].bias, model.seq[4].weight):
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's state, nothing else


@pytest.mark.parametrize("name", IDS)
def test_state_dict_lockstep_roundtrip(name):
    model = Head(make_model())
    opt = build(name, model)
    data = batches(30)
    train(model, opt, data[:20])
    clone = copy.deepcopy(model)
    opt2 = build(name, clone)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    train(model, opt, data[20:])
    train(clone, opt2, data[20:])
    for a, b in zip(weights(model), weights(clone)):
        assert torch.equal(a, b)
    stat = CONFIGS[name].cycle_stat
    assert opt.stats == opt2.stats and (stat is None or opt.stats[stat] > 0)


@pytest.mark.parametrize("name", IDS)
def test_scheduler_drives_factor_lr(name):
    data = batches(12)
    runs = []
    for scale in (0.5, None):
        model = Head(make_model())
        lr = CONFIGS[name].kwargs["lr"]
        if scale is None:
            opt = build(name, model, lr=lr * 0.5)
            sched = None
        else:
            opt = build(name, model, lr=lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
        train(model, opt, data, sched)
        runs.append(weights(model))
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    # a schedule that reaches zero freezes the factorized weights too
    model = Head(make_model())
    opt = build(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 3 else 0.0)
    train(model, opt, data[:3], sched)
    before = model.seq[1].weight.detach().clone()
    train(model, opt, data[3:], sched)
    assert torch.equal(model.seq[1].weight, before)


@pytest.mark.parametrize("name", IDS)
def test_add_param_group_closure_zero_grad(name):
    model = Head(make_model())
    opt = build(name, model)
    extra = nn.Linear(11, 11)
    opt.add_param_group({"params": [extra.weight], "lr": 5e-3, "custom_key": "kept"})
    assert opt.param_groups[-1]["custom_key"] == "kept"
    assert all(opt.param_groups[-1][k] == v for k, v in opt.defaults.items() if k != "lr")
    tokens = batches(1)[0]
    before = extra.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(extra(model(tokens[:-1])), tokens[1:])
        loss.backward()
        return loss

    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and calls == ["pre", "post"]
    key = CONFIGS[name].factor_key
    assert key in opt.state[extra.weight] and not torch.equal(extra.weight, before)
    opt.zero_grad()
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])
    sd = roundtrip(opt.state_dict())
    assert sd["param_groups"][-1]["custom_key"] == "kept"


@pytest.mark.parametrize("name", IDS)
def test_zero_lr_zero_grad_step_is_a_noop(name):
    data = batches(15)
    ref_model = Head(make_model())
    ref = build(name, ref_model)
    train(ref_model, ref, data)

    model = Head(make_model())
    opt = build(name, model)
    lr = opt.param_groups[0]["lr"]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    snapshot = weights(model)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot, weights(model)))
    assert len(opt.state) > 0  # state was created
    for g in opt.param_groups:
        g["lr"] = lr
    train(model, opt, data)
    for a, b in zip(weights(model), weights(ref_model)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", IDS)
def test_bf16_factors_stay_fp32_after_load(name):
    model = Head(make_model(dtype=torch.bfloat16))
    opt = build(name, model)
    train(model, opt, batches(4))
    clone = copy.deepcopy(model)
    opt2 = build(name, clone)
    opt2.load_state_dict(roundtrip(opt.state_dict()))

    def dtypes(v):
        if isinstance(v, torch.Tensor):
            return v.dtype
        if isinstance(v, dict):
            return {k: dtypes(x) for k, x in v.items()}
        if isinstance(v, list):
            return [dtypes(x) for x in v]
        return type(v)

    for p, q in zip(model.parameters(), clone.parameters()):
        assert dtypes(opt.state[p]) == dtypes(opt2.state[q])
    assert "torch.float32" in str(dtypes(opt2.state[clone.seq[1].weight]))  # fp32 factors of a bf16 weight


@pytest.mark.parametrize("name", IDS)
def test_nonfinite_gradient_skip_and_raise(name):
    model = Head(make_model())
    opt = build(name, model)
    train(model, opt, batches(3))
    w = model.seq[1].weight
    before = weights(model)
    opt.zero_grad()
    loss_of(model, batches(1, seed=5)[0]).backward()
    w.grad[0, 0] = float("nan")
    opt.step()
    assert torch.equal(w, before[1])  # seq[1].weight is the second parameter
    assert opt.stats["nonfinite_skips"] == 1
    assert not torch.equal(model.seq[3].weight, before[3])  # other parameters stepped
    for st in opt.state.values():
        for v in st.values():
            for t in (v if isinstance(v, list) else [v]):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    assert torch.isfinite(t).all()
    strict = build(name, model, nonfinite="raise")
    w.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        strict.step()


@pytest.mark.parametrize("name", IDS)
def test_converges_on_a_reachable_quadratic(name):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        q1, _ = torch.linalg.qr(torch.randn(8, 8))
        q2, _ = torch.linalg.qr(torch.randn(8, 8))
        target = q1 @ lin.weight @ q2  # same singular values: reachable by POET's W = R W0 P too
        rank = CONFIGS[name].target_rank
        if rank is not None:
            target = q1[:, :rank] @ torch.diag(torch.tensor([1.0, 0.5, 0.3, 0.2][:rank])) @ q2[:rank]
    opt = build(name, [("w", lin.weight)], lr=3e-2, **CONFIGS[name].long_cycle)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 600)
    first = None
    for _ in range(600):
        opt.zero_grad()
        loss = (lin.weight - target).square().sum()
        loss.backward()
        opt.step()
        sched.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.05 * first
