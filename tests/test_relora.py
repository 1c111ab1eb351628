"""ReLoRAReset against a module-based LoRA reference, the rank claim, pruning, schedule, memory, errors."""
import math

import pytest
import torch
from chain_model import chain_forward as forward
from chain_model import make_chain
from conftest import rel_err
from torch import nn

import geomopt
from geomopt.optim.relora import keep_count, prune_state_
from geomopt.schedules import jagged_cosine

SHAPES = [(12, 9), (5, 12)]  # (out, in) of a chain


def make(seed=0):
    return make_chain(SHAPES, seed)


def ref_prune(opt, factor, ratio):
    """Magnitude pruning with one mask from |exp_avg| applied to both Adam moments (written apart)."""
    st = opt.state[factor]
    keep = math.ceil((1 - ratio) * factor.numel() - 1e-9)
    order = st["exp_avg"].abs().flatten().argsort(descending=True)[:keep]
    mask = torch.zeros(factor.numel(), dtype=torch.bool)
    mask[order] = True
    for k in ("exp_avg", "exp_avg_sq"):
        st[k].mul_(mask.view(factor.shape))


@pytest.mark.parametrize("warm", [0, 4], ids=["cold", "warm-start"])
@pytest.mark.parametrize("restart_warmup", [0, 3], ids=["no-rewarm", "rewarm3"])
def test_matches_module_reference_over_three_cycles(float64, warm, restart_warmup):
    rank, alpha, every, ratio, lr, steps = 3, 6.0, 8, 0.5, 1e-2, warm + 3 * 8 + 5
    s = alpha / rank
    layers, scale = make()
    params = [(f"l{i}.weight", l.weight) for i, l in enumerate(layers)] + [("scale", scale)]
    opt = geomopt.ReLoRAReset(params, lr=lr, rank=rank, alpha=alpha, reset_every=every, prune_ratio=ratio,
                              warm_start_steps=warm, restart_warmup_steps=restart_warmup)
    ref_w = [l.weight.detach().clone() for l in layers]  # W_start (frozen base) of the reference
    ref_scale = nn.Parameter(scale.detach().clone())
    s_opt = torch.optim.AdamW([ref_scale], lr=lr, weight_decay=0.01)
    full = [nn.Parameter(w.clone()) for w in ref_w]
    f_opt = torch.optim.AdamW(full, lr=lr, weight_decay=0.0)
    a_ref = b_ref = q_opt = None

    def start_lora():
        nonlocal a_ref, b_ref, q_opt
        a_ref = [nn.Parameter(opt.state[l.weight]["A"].clone()) for l in layers]  # the same random A
        b_ref = [nn.Parameter(torch.zeros(m, rank)) for m, _ in SHAPES]
        q_opt = torch.optim.AdamW([*a_ref, *b_ref], lr=lr, weight_decay=0.0)

    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for t in range(1, steps + 1):
        x, y = torch.randn(16, SHAPES[0][1], generator=g), torch.randn(16, SHAPES[-1][0], generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(forward([l.weight for l in layers], scale, x), y).backward()
        opt.step()

        lowrank = t > warm
        if lowrank and a_ref is None:
            start_lora() if warm == 0 else None
        if lowrank:
            cycle_t = t - warm
            j = (cycle_t - 1) % every
            factor = min(1.0, j / restart_warmup) if (restart_warmup and cycle_t > every) else 1.0
            for grp in q_opt.param_groups:
                grp["lr"] = lr * factor
            weights = [w + s * b @ a for w, a, b in zip(ref_w, a_ref, b_ref)]
            q_opt.zero_grad()
        else:
            weights = full
            f_opt.zero_grad()
        s_opt.zero_grad()
        nn.functional.mse_loss(forward(weights, ref_scale, x), y).backward()
        s_opt.step()
        if lowrank:
            q_opt.step()
            if (t - warm) % every == 0:  # reset: merge, prune, new A from the optimizer's generator, B = 0
                with torch.no_grad():
                    ref_w = [w + s * b @ a for w, a, b in zip(ref_w, a_ref, b_ref)]
                    for f in (*a_ref, *b_ref):
                        ref_prune(q_opt, f, ratio)
                    for a, l in zip(a_ref, layers):
                        a.copy_(opt.state[l.weight]["A"])
                    for b in b_ref:
                        b.zero_()
        else:
            f_opt.step()
            if t == warm:
                ref_w = [w.detach().clone() for w in full]
                start_lora()
        with torch.no_grad():
            current = [w + s * b @ a for w, a, b in zip(ref_w, a_ref, b_ref)] if a_ref is not None else full
            for l, w in zip(layers, current):
                worst = max(worst, rel_err(l.weight, w))
            worst = max(worst, rel_err(scale, ref_scale))
    assert opt.stats["resets"] == 3 * len(layers)
    assert worst < 1e-6, worst


def test_rank_of_updates_within_and_across_cycles(float64):
    torch.manual_seed(0)
    lin = nn.Linear(20, 16, bias=False)
    r, every = 2, 10
    opt = geomopt.ReLoRAReset([("w", lin.weight)], lr=2e-2, rank=r, alpha=4, reset_every=every,
                              restart_warmup_steps=0)
    target = torch.randn(16, 20)
    w0 = lin.weight.detach().clone()
    starts = [w0]
    for t in range(1, 4 * every + 1):
        opt.zero_grad()
        (lin.weight - target).square().sum().backward()
        opt.step()
        w = lin.weight.detach()
        assert torch.linalg.matrix_rank(w - starts[-1]) <= r  # the current cycle (or the one just ended)
        if t % every == 0:
            starts.append(w.clone())
    total = torch.linalg.matrix_rank(lin.weight.detach() - w0)
    assert 2 * r < total <= 4 * r


def test_pruning_keeps_exact_count_and_one_shared_mask():
    g = torch.Generator().manual_seed(0)
    factor = torch.zeros(7, 13)
    for ratio in (0.0, 0.5, 0.9, 0.99):
        st = {"step": torch.tensor(5.0), "exp_avg": torch.randn(7, 13, generator=g),
              "exp_avg_sq": torch.rand(7, 13, generator=g) + 0.1}
        m = st["exp_avg"].clone()
        prune_state_(st, factor, ratio, "magnitude", g)
        keep = math.ceil((1 - ratio) * 91 - 1e-9)
        assert keep_count(91, ratio) == keep
        assert int((st["exp_avg"] != 0).sum()) == keep
        assert torch.equal(st["exp_avg"] != 0, st["exp_avg_sq"] != 0)  # one mask for both moments
        kept = m.abs()[st["exp_avg"] != 0]
        dropped = m.abs()[st["exp_avg"] == 0]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()
        assert st["step"].item() == 5.0
    st = {"exp_avg": torch.randn(7, 13, generator=g), "exp_avg_sq": torch.rand(7, 13, generator=g) + 0.1}
    prune_state_(st, factor, 0.5, "random", g)
    assert int((st["exp_avg"] != 0).sum()) == 46 and torch.equal(st["exp_avg"] != 0, st["exp_avg_sq"] != 0)
    prune_state_(st, factor, 0.5, "reset", g)
    assert st == {}


def test_jagged_cosine_values():
    total, warm, every, rw = 1000, 50, 200, 20
    f = jagged_cosine(total_steps=total, warmup_steps=warm, restart_every=every, restart_warmup_steps=rw,
                      min_lr_ratio=0.1)
    plain = jagged_cosine(total_steps=total, warmup_steps=warm, min_lr_ratio=0.1)
    assert f(0) == 0.0 and f(warm) == pytest.approx(1.0)
    for k in range(1, 5):
        r = k * every
        assert f(r) == 0.0
        assert f(r + rw // 2) == pytest.approx(plain(r + rw // 2) / 2)
        assert f(r + rw) == pytest.approx(plain(r + rw))
    assert plain(total) == pytest.approx(0.1) and f(total - 1) == pytest.approx(plain(total - 1))
    assert f(every - 1) == pytest.approx(plain(every - 1))
    with pytest.raises(ValueError, match="restart_every must be >= 1, got 0"):
        jagged_cosine(total_steps=10, restart_every=0)
    with pytest.raises(ValueError, match=r"min_lr_ratio must be a number in \[0, 1\], got 2"):
        jagged_cosine(total_steps=10, min_lr_ratio=2)


def test_in_optimizer_rewarm_follows_the_reset_clock():
    lin = nn.Linear(6, 6, bias=False)
    opt = geomopt.ReLoRAReset([("w", lin.weight)], lr=1.0, rank=2, alpha=2, reset_every=5, restart_warmup_steps=4)
    seen = []
    real = opt._inner.updated
    opt._inner.updated = lambda f, g, s, lr, **kw: (seen.append(lr), real(f, g, s, lr, **kw))[1]
    for _ in range(16):
        lin.weight.grad = torch.randn(6, 6)
        opt.step()
    assert seen == [1.0] * 5 + [0.0, 0.25, 0.5, 0.75, 1.0] + [0.0, 0.25, 0.5, 0.75, 1.0] + [0.0]


def test_state_memory_is_three_r_m_plus_n_floats():
    """The issue's bound: ReLoRA's state is 3 r (m + n) / (2 m n) of AdamW's. Its tensors are A, B and their two
    Adam moments (exactly 3 r (m + n) floats) and the two moments' step counters; no generator state."""
    m, n, r = 48, 40, 4
    lin = nn.Linear(n, m, bias=False)
    opt = geomopt.ReLoRAReset([("w", lin.weight)], lr=1e-3, rank=r, reset_every=2)
    for _ in range(3):
        lin.weight.grad = torch.randn(m, n)
        opt.step()
    assert opt.stats["resets"] == 1
    st = opt.state[lin.weight]
    floats = [st["A"], st["B"]] + [v for k in ("inner_A", "inner_B") for v in st[k].values()
                                   if isinstance(v, torch.Tensor) and v.numel() > 1]
    assert sum(t.numel() for t in floats) == 3 * r * (m + n)

    def tensor_bytes(v):
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        return sum(map(tensor_bytes, v.values() if isinstance(v, dict) else v)) if isinstance(v, (dict, list)) else 0

    adamw = torch.optim.AdamW([lin.weight])
    adamw.step()
    bound = 3 * r * (m + n) / (2 * m * n) * tensor_bytes(adamw.state[lin.weight])
    assert tensor_bytes(st) == 3 * r * (m + n) * 4 + 2 * 4  # fp32 floats and two 4-byte step counters
    assert tensor_bytes(st) <= bound + 8  # the bound up to the second step counter


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(rank=0), r"rank must be >= 1, got 0"),
    (dict(rank=13), r"rank=13 exceeds min\(m, n\)=12 of a routed weight of shape \(24, 12\)"),
    (dict(prune_ratio=1.0), r"prune_ratio must be in \[0, 1\), got 1.0"),
    (dict(prune_ratio=-0.1), r"prune_ratio must be >= 0.0, got -0.1"),
    (dict(reset_every=0), r"reset_every must be >= 1, got 0"),
    (dict(prune="l1"), r"prune must be one of \('magnitude', 'random', 'reset'\), got 'l1'"),
    (dict(alpha=0), r"alpha must be > 0.0, got 0"),
    (dict(warm_start_steps=-1), r"warm_start_steps must be >= 0, got -1"),
])
def test_bad_arguments(kwargs, pattern):
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16))
    with pytest.raises(ValueError, match=pattern):
        geomopt.ReLoRAReset(model, **{"rank": 4, **kwargs})


def test_merge_and_reinit_with_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    x = torch.randn(5, 8)
    before = model(x)
    assert geomopt.peft_lora.merge_and_reinit(model) == 2
    assert torch.allclose(model(x), before, atol=1e-5)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert torch.equal(p, torch.zeros_like(p))
