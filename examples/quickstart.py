"""Swap AdamW for geomopt.POET in a plain loop: a small LLaMA on the embedded corpus."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import geomopt
from geomopt.data import load_corpus, sample_batch

cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
model = LlamaForCausalLM(cfg)
geomopt.init.normalized_gaussian_(model)  # the paper's initialization: POET keeps this spectrum
optimizer = geomopt.POET(model, lr=3e-3, block_size=16, merge_every=50)  # was: torch.optim.AdamW(...)
train, _ = load_corpus(max_bytes=1_000_000)
gen = torch.Generator().manual_seed(0)
for step in range(100):
    batch = sample_batch(train, 8, 64, gen)
    loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 20 == 0:
        print(step, round(loss.item(), 3), optimizer.stats)
