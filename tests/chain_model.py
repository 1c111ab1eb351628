"""A chain of bias-free linear layers with tanh between them and one 1-D scale on the input: the small
model that the module-based reference tests train (its weights get the method, the scale AdamW)."""
import torch
from torch import nn


def make_chain(shapes, seed=0):
    """``shapes``: (out, in) per layer. Returns (layers, scale)."""
    torch.manual_seed(seed)
    layers = nn.ModuleList([nn.Linear(n, m, bias=False) for m, n in shapes])
    scale = nn.Parameter(torch.ones(shapes[0][1]))
    return layers, scale


def chain_forward(weights, scale, x):
    h = x * scale
    for i, w in enumerate(weights):
        h = h @ w.T
        if i < len(weights) - 1:
            h = torch.tanh(h)
    return h
