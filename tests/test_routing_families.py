"""The default routing on transformers' model families, built from configs: exactly the attention and MLP
projections get the method (BERT's ``attention.output.dense`` included, GPT-2's ``Conv1D`` included), never the
embeddings, the LM head (tied or not) or a classifier; and POET keeps the spectrum of a GPT-2 ``Conv1D`` weight."""
import re

import pytest
import torch
import transformers as tf

import geomopt
import geomopt.init
from geomopt.optim.routing import is_factorized

ENCODER = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
           r"|output\.dense)")
BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
FAMILIES = {  # model, the names (a regex over parameter names) that must be exactly the routed ones
    "bert-mlm": (lambda: tf.BertForMaskedLM(tf.BertConfig(**BERT)),
                 rf"bert\.{ENCODER}\.weight|cls\.predictions\.transform\.dense\.weight"),
    "bert-classifier": (lambda: tf.BertForSequenceClassification(tf.BertConfig(**BERT, num_labels=3)),
                        rf"bert\.{ENCODER}\.weight|bert\.pooler\.dense\.weight"),
    "roberta": (lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(**BERT)),
                rf"roberta\.{ENCODER}\.weight|lm_head\.dense\.weight"),
    "t5-untied": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, tie_word_embeddings=False)),
        r"(en|de)coder\.block\.\d+\.layer\.\d\.(SelfAttention\.[qkvo]|EncDecAttention\.[qkvo]|DenseReluDense\.w[io])\.weight"),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)),
             r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight"),
    "llama-untied": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False)),
        r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_rule_routes_exactly_the_projections(family):
    build, expected = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    opt = geomopt.POET(model, block_size=4)
    names = {id(p): n for n, p in model.named_parameters()}
    routed = sorted(names[id(p)] for g in opt.param_groups for p in g["params"] if is_factorized(p, g))
    want = sorted(n for n, p in model.named_parameters() if re.fullmatch(expected, n))
    assert want and routed == want
    table = {r.name: r for r in opt.routing()}
    assert sorted(table) == sorted(names.values())
    for n, p in model.named_parameters():
        if isinstance(model.get_input_embeddings(), torch.nn.Module) and p is model.get_input_embeddings().weight:
            assert table[n].route == "AdamW" and "Embedding" in table[n].reason
    head = model.get_output_embeddings()
    if head is not None and not any(head.weight is p for p in model.get_input_embeddings().parameters()):
        assert table[names[id(head.weight)]].route == "AdamW"  # an untied head


def test_poet_keeps_the_spectrum_of_gpt2_conv1d_weights():
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double()
    geomopt.init.normalized_gaussian_(model, generator=torch.Generator().manual_seed(1))
    conv = [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    for m in conv:  # stored (in, out): the neurons are the columns
        torch.testing.assert_close(m.weight.norm(dim=0), torch.ones(m.weight.shape[1], dtype=torch.float64))
    before = [torch.linalg.svdvals(m.weight.detach()) for m in conv]
    weights = [m.weight.detach().clone() for m in conv]
    opt = geomopt.POET(model, lr=1e-2, block_size=4, merge_every=2, exact_cayley=True)  # orthogonal to rounding
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(5):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for m, s, w in zip(conv, before, weights):
        assert (m.weight - w).abs().max() > 1e-4  # it trained
        torch.testing.assert_close(torch.linalg.svdvals(m.weight.detach()), s, rtol=1e-10, atol=1e-10)
