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


def train_chain(make, shapes, steps=30, seed=1, edit=None):
    """Train the chain of ``shapes`` with ``make(named params)`` on random data (the scale named "scale");
    ``edit(step, layers)`` runs between each backward and step. Returns (weights and scale after, optimizer)."""
    layers, scale = make_chain(shapes, 0)
    params = [(f"layers.{i}.weight", layer.weight) for i, layer in enumerate(layers)] + [("scale", scale)]
    opt = make(params)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, y = torch.randn(32, shapes[0][1], generator=g), torch.randn(32, shapes[-1][0], generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(chain_forward([layer.weight for layer in layers], scale, x), y).backward()
        if edit is not None:
            edit(step, layers)
        opt.step()
    return [layer.weight.detach().clone() for layer in layers] + [scale.detach().clone()], opt
