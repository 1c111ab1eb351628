"""Growing mid-training with each optimizer: the loss at the growth step is unchanged, training goes on
(loss 50 steps later is lower), and the optimizer state is extended the way each method needs."""
import pytest
import torch
from grow_models import llama, max_err
from optim_table import methods

import geomopt
import geomopt.grow as grow
from geomopt.data import load_corpus, sample_batch
from geomopt.geometry.lowrank import check_point

OPTIMIZERS = {"adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3),
              **methods(10, block_size=8, rank=6, alpha=12)}
GROW = dict(mlp_width=64, heads=6, head_dim=10, hidden=48, add_layers=[1])


@pytest.fixture(scope="module")
def corpus():
    train, _ = load_corpus(max_bytes=200_000)
    return train % 64  # the tiny models' vocabulary


def loss_on(model, batch):
    with torch.no_grad():
        return float(model(batch, labels=batch).loss)


def train(model, opt, corpus, steps, gen):
    """Keeps the last loss (and its graph) alive, as training loops do: growth must not depend on it."""
    model.train()
    for _ in range(steps):
        batch = sample_batch(corpus, 8, 24, gen)
        opt.zero_grad()
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
    model.eval()
    return loss


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grow_at_step_k_keeps_the_loss_and_training_continues(name, corpus):
    model = llama(gqa=True)
    opt = OPTIMIZERS[name](model)
    gen = torch.Generator().manual_seed(0)
    held_out = sample_batch(corpus, 16, 24, torch.Generator().manual_seed(99))
    last = train(model, opt, corpus, 25, gen)
    at_k = loss_on(model, held_out)
    with torch.no_grad():
        logits_k = model(held_out).logits
    grow.expand(model, opt, **GROW)
    with torch.no_grad():
        assert max_err(model(held_out).logits, logits_k) < 1e-5
    assert abs(loss_on(model, held_out) - at_k) < 1e-5 * at_k
    train(model, opt, corpus, 50, gen)
    assert loss_on(model, held_out) < at_k - 0.05
    assert last.grad_fn is not None  # the pre-growth graph was alive throughout


def test_adamw_moments_are_padded_with_zeros_and_new_layers_join_the_group(corpus):
    model = llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, corpus, 3, torch.Generator().manual_seed(0))
    down = model.model.layers[0].mlp.down_proj.weight
    old = opt.state[down]["exp_avg"].clone()
    n_params = len(opt.param_groups[0]["params"])
    growth = grow.expand(model, opt, mlp_width=64, add_layers=[2])
    assert down not in opt.state and all(q is not down for q in opt.param_groups[0]["params"])
    down = model.model.layers[0].mlp.down_proj.weight  # a new Parameter, swapped into the optimizer
    assert any(q is down for q in opt.param_groups[0]["params"])
    state = opt.state[down]
    assert state["exp_avg"].shape == down.shape == (32, 64)
    assert torch.equal(state["exp_avg"][:, :48], old) and not state["exp_avg"][:, 48:].any()
    assert not state["exp_avg_sq"][:, 48:].any() and float(state["step"]) == 3
    assert len(opt.param_groups[0]["params"]) == n_params + len(growth.added) == n_params + 9


def test_poet_merges_and_rebuilds_its_factors_for_the_new_shapes(corpus):
    model = llama()
    opt = geomopt.POET(model, lr=1e-2, block_size=8, merge_every=100)
    train(model, opt, corpus, 3, torch.Generator().manual_seed(0))
    merges = opt.stats["merges"]
    grow.expand(model, opt, hidden=48, head_dim=10)
    q = model.model.layers[0].self_attn.q_proj.weight
    st = opt.state[q]
    assert opt.stats["merges"] > merges  # merged before the growth
    assert sorted(st["perm_row"].tolist()) == list(range(40)) and sorted(st["perm_col"].tolist()) == list(range(48))
    assert [tuple(t.shape) for t in st["q_col"]] == [(6, 28)] and all(not t.any() for t in st["q_row"] + st["q_col"])
    assert torch.equal(st["w0"], q.detach())


def test_relora_factors_are_extended(corpus):
    model = llama()
    opt = geomopt.ReLoRAReset(model, lr=1e-2, rank=4, alpha=8, reset_every=100)
    train(model, opt, corpus, 3, torch.Generator().manual_seed(0))
    gate = model.model.layers[0].mlp.gate_proj.weight
    a, b = opt.state[gate]["A"].clone(), opt.state[gate]["B"].clone()
    grow.expand(model, opt, mlp_width=64, hidden=48)
    st = opt.state[model.model.layers[0].mlp.gate_proj.weight]
    assert st["A"].shape == (4, 48) and st["B"].shape == (64, 4)
    assert torch.equal(st["A"][:, :32], a) and st["A"][:, 32:].abs().min() > 0  # new input columns drawn
    assert torch.equal(st["B"][:48], b) and not st["B"][48:].any()  # new output rows zero
    assert st["inner_B"]["exp_avg"].shape == (64, 4)


def test_dlra_keeps_the_rank_and_the_point_on_the_manifold(corpus):
    model = llama()
    opt = geomopt.DLRAMomentum(model, lr=3e-3, rank=6, method="adam")
    train(model, opt, corpus, 3, torch.Generator().manual_seed(0))
    grow.expand(model, opt, mlp_width=64, hidden=48, head_dim=10)
    for layer in model.model.layers:
        for p in (layer.self_attn.k_proj.weight, layer.mlp.gate_proj.weight, layer.mlp.down_proj.weight):
            st = opt.state[p]
            u, s, v = st["U"], st["S"], st["V"]
            assert s.shape == (6, 6) and check_point(u, s, v, tol=1e-5)
            w = p.detach()
            assert float((u @ s @ v.T - w).norm() / w.norm()) < 1e-5
            assert [tuple(t.shape) for t in st["exp_avg"]] == [(6, 6), tuple(u.shape), tuple(v.shape)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_grown_run_resumes_from_its_checkpoint_into_a_fresh_optimizer(name, corpus, tmp_path):
    model = llama()
    opt = OPTIMIZERS[name](model)
    train(model, opt, corpus, 4, torch.Generator().manual_seed(0))
    grow.expand(model, opt, mlp_width=64, hidden=48, add_layers=[1])
    train(model, opt, corpus, 2, torch.Generator().manual_seed(1))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    twin = llama()
    grow.expand(twin, mlp_width=64, hidden=48, add_layers=[1])  # the grown architecture
    twin.load_state_dict(ckpt["model"])
    twin_opt = OPTIMIZERS[name](twin)
    twin_opt.load_state_dict(ckpt["opt"])
    train(model, opt, corpus, 3, torch.Generator().manual_seed(2))
    train(twin, twin_opt, corpus, 3, torch.Generator().manual_seed(2))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_generation_with_the_kv_cache_is_unchanged_by_growth():
    model = llama()
    prompt = torch.tensor([[3, 17, 42, 5, 9]])
    before = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    grow.expand(model, mlp_width=64, heads=6, head_dim=10, hidden=48, add_layers=[0, 2], init="zeros")
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0), before)


def test_named_groups_keep_their_names_aligned_through_growth(corpus):
    model = llama()
    opt = geomopt.POET(model.named_parameters(), lr=1e-2, block_size=8)
    gen = torch.Generator().manual_seed(0)
    train(model, opt, corpus, 2, gen)
    grow.expand(model, opt, mlp_width=64, add_layers=[1])
    named = dict(model.named_parameters())
    for group in opt.param_groups:
        assert all(named[n] is p for n, p in zip(group["param_names"], group["params"], strict=True))
    train(model, opt, corpus, 2, gen)
