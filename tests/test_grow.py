"""geomopt.grow: every expansion keeps the function (logits to 1e-5), alone and composed, under SDPA and
eager attention, tied or not, with grouped-query attention, and after save_pretrained / from_pretrained."""
import pytest
import torch
from grow_models import gpt2, llama, logits, max_err, tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

import geomopt.grow as grow

SINGLE = {
    "mlp_width": dict(mlp_width=72),
    "heads": dict(heads=8),  # GQA: two new kv heads with two query heads each
    "head_dim": dict(head_dim=14),
    "hidden": dict(hidden=48),
    "add_layers": dict(add_layers=[0, 2]),
}


def roundtrip(model, tmp_path, attn):
    model.save_pretrained(tmp_path)
    return LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", list(SINGLE))
def test_each_transform_alone_keeps_the_logits_and_survives_save_load(name, tied, attn, tmp_path):
    model, x = llama(tied=tied, attn=attn), tokens()
    before = logits(model, x)
    grow.expand(model, **SINGLE[name])
    assert max_err(logits(model, x), before) < 1e-5
    loaded = roundtrip(model, tmp_path, attn)
    assert max_err(logits(loaded, x), before) < 1e-5
    # the change is real: shapes and config moved
    cfg = loaded.config
    grown = {"mlp_width": cfg.intermediate_size == 72, "heads": cfg.num_attention_heads == 8,
             "head_dim": cfg.head_dim == 14, "hidden": cfg.hidden_size == 48, "add_layers": cfg.num_hidden_layers == 4}
    assert grown[name]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_head_growth_without_gqa_and_head_dim_keeps_rope_frequencies(attn):
    model, x = llama(gqa=False, attn=attn), tokens(length=40)
    before = logits(model, x)
    old = model.model.rotary_emb.inv_freq.clone()
    grow.expand(model, heads=5, head_dim=12, hidden=40)
    assert model.config.num_key_value_heads == 5
    new = model.model.rotary_emb.inv_freq
    assert torch.allclose(new[: old.numel()], old, rtol=1e-6, atol=0)  # old dimensions keep their frequencies
    assert max_err(logits(model, x), before) < 1e-5


TRANSFORM = st.sampled_from(["mlp_width", "heads", "head_dim", "hidden", "add_layers"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(TRANSFORM, st.integers(1, 3)), min_size=1, max_size=6),
       tied=st.booleans(), gqa=st.booleans(), attn=st.sampled_from(["sdpa", "eager"]), seed=st.integers(0, 3),
       save=st.booleans())
def test_random_compositions_keep_the_logits(steps, tied, gqa, attn, seed, save, tmp_path_factory):
    model, x = llama(tied=tied, gqa=gqa, attn=attn, seed=seed), tokens(seed=seed)
    before = logits(model, x)
    for i, (name, k) in enumerate(steps):
        cfg = model.config
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        if name == "mlp_width":
            arg = cfg.intermediate_size + 8 * k
        elif name == "heads":
            arg = cfg.num_attention_heads + group * k
            if cfg.hidden_size % arg:
                grow.expand(model, hidden=cfg.hidden_size * arg // _gcd(cfg.hidden_size, arg), seed=i)
        elif name == "head_dim":
            arg = cfg.head_dim + 2 * k
        elif name == "hidden":
            arg = cfg.hidden_size + cfg.num_attention_heads * k
        else:
            arg = sorted({(j * 7 + k) % (cfg.num_hidden_layers + 1) for j in range(k)})
        grow.expand(model, **{name: arg}, seed=i)
    assert max_err(logits(model, x), before) < 1e-5
    if save:
        loaded = roundtrip(model, tmp_path_factory.mktemp("grown"), attn)
        assert max_err(logits(loaded, x), before) < 1e-5


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


@pytest.mark.parametrize("name", list(SINGLE))
def test_new_zero_weights_get_a_gradient_and_move_after_one_step(name):
    model, x = llama(), tokens()
    growth = grow.expand(model, **SINGLE[name])
    zero_parts = []  # (param, mask of entries the transform set to zero)
    for r in growth.resized:
        mask = (r.param.detach() == 0) & ~grow.resize.old_mask(tuple(r.param.shape), r.maps, r.param.device)
        if mask.any():
            zero_parts.append((r.param, mask))
    for new, _ in growth.added:
        if not new.detach().any():
            zero_parts.append((new, torch.ones_like(new, dtype=torch.bool)))
    assert zero_parts
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(x, labels=x).loss.backward()
    for p, mask in zero_parts:
        assert p.grad[mask].abs().sum() > 0
    before = [p.detach()[mask].clone() for p, mask in zero_parts]
    opt.step()
    assert all(not torch.equal(p.detach()[mask], b) for (p, mask), b in zip(zero_parts, before))


def test_gpt2_mlp_width_and_layers_are_exact():
    model, x = gpt2(), tokens()
    before = logits(model, x)
    grow.expand(model, mlp_width=80, add_layers=[1, 2])
    assert model.config.n_inner == 80 and model.config.n_layer == 4
    assert max_err(logits(model, x), before) < 1e-5


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(hidden=48), r"hidden=48: GPT-2 normalizes with LayerNorm"),
    (dict(heads=8), r"heads=8: GPT-2 ties the head width to n_embd / n_head"),
])
def test_gpt2_inexact_transforms_raise_and_change_nothing(kwargs, pattern):
    model, x = gpt2(), tokens()
    before = logits(model, x)
    with pytest.raises(ValueError, match=pattern):
        grow.expand(model, mlp_width=80, **kwargs)
    assert model.config.n_inner == 48 and torch.equal(logits(model, x), before)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(heads=5), r"heads=5: the 4 query heads share 2 kv heads in groups of 2.*multiple of 2"),
    (dict(heads=6), r"heads=6, hidden=32: LlamaConfig requires hidden_size to be a multiple"),
    (dict(mlp_width=40), r"mlp_width=40 is smaller than the current 48: growth never shrinks"),
    (dict(hidden=16), r"hidden=16 is smaller than the current 32"),
    (dict(head_dim=6), r"head_dim=6 is smaller than the current 8"),
    (dict(head_dim=11), r"head_dim=11: RoPE rotates pairs"),
    (dict(add_layers=[3]), r"add_layers: each position must be an int in \[0, 2\].*got 3"),
    (dict(mlp_width=64.0), r"mlp_width must be an int, got 64.0"),
    (dict(init="ones"), r"init must be 'random' or 'zeros', got 'ones'"),
])
def test_llama_bad_requests_raise_before_anything_changes(kwargs, pattern):
    model, x = llama(), tokens()
    before = logits(model, x)
    with pytest.raises((ValueError, TypeError), match=pattern):
        grow.expand(model, mlp_width=kwargs.pop("mlp_width", 56), **kwargs)
    assert model.config.intermediate_size == 48 and torch.equal(logits(model, x), before)


def test_unsupported_models_raise():
    with pytest.raises(ValueError, match="growth supports HuggingFace Llama and GPT-2 models, got Linear"):
        grow.expand(torch.nn.Linear(3, 3), mlp_width=4)
