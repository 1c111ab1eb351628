"""Tiny Llama and GPT-2 models built from configs for the growth tests."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

logging.set_verbosity_error()
logging.disable_progress_bar()

VOCAB = 64


def llama(tied=False, gqa=True, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2 if gqa else 4, head_dim=8,
                      intermediate_size=48, num_hidden_layers=2, vocab_size=VOCAB, tie_word_embeddings=tied,
                      attn_implementation=attn, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_head=4, n_layer=2, n_inner=48, vocab_size=VOCAB, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tokens(seed=1, batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x).logits


def max_err(a, b):
    """Largest deviation, relative to the largest logit."""
    return float((a - b).abs().max() / b.abs().max())
