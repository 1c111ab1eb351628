"""Drop-in: geomopt.POET(model) in a plain LlamaForCausalLM loop, model built from a config."""
import pytest
import torch

import geomopt
from geomopt import data

transformers = pytest.importorskip("transformers")


def tiny_llama(tie=False):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_twenty_steps_lower_the_loss_and_route_embeddings_to_adamw(tie):
    model = tiny_llama(tie)
    opt = geomopt.POET(model, lr=3e-3, block_size=8, merge_every=10)
    train, _ = data.load_corpus(max_bytes=200_000)
    gen = torch.Generator().manual_seed(0)
    fixed = data.sample_batch(train, 8, 32, gen)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(input_ids=fixed, labels=fixed).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    routed = {id(p) for g in opt.param_groups if g["factorize"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in routed}
    for n, p in model.named_parameters():
        if "embed_tokens" in n or "lm_head" in n or p.dim() != 2:
            assert id(p) not in routed and "exp_avg" in opt.state[p], n
    assert sum(1 for n in names if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                                 "gate_proj.weight", "up_proj.weight", "down_proj.weight"))) == 14
    assert len(names) == 14
    assert opt.stats["merges"] == 14 * 2


def test_normalized_gaussian_init_gives_unit_rows_only_to_routed_weights():
    model = tiny_llama()
    emb = model.model.embed_tokens.weight.detach().clone()
    geomopt.init.normalized_gaussian_(model)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q.norm(dim=1), torch.ones(q.shape[0]), atol=1e-6)
    assert torch.equal(model.model.embed_tokens.weight, emb)
