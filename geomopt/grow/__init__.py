"""Grow a transformer mid-training without changing what it computes (Gesmundo & Maile, arXiv 2308.06103),
and carry the optimizer over.

    growth = geomopt.grow.expand(model, optimizer, mlp_width=1024, hidden=384, add_layers=[2])

works in place on a HuggingFace ``LlamaForCausalLM`` (all transforms) or ``GPT2LMHeadModel`` (MLP width and
layers; the others raise ValueError saying why). The transforms run in the order MLP width, heads, head
width, hidden width, layers; each is also available alone (``grow_mlp_width`` ...), and any sequence of
calls composes. The model's config follows, so ``save_pretrained`` / ``from_pretrained`` give back the
same function. Grown tensors are new Parameters set on their modules; with ``optimizer``, they replace the
old ones in its groups and state, whose tensors are extended (see ``geomopt.grow.carry``), and added
layers join the parameter groups of their neighbours.

``init="random"`` draws the entries the paper leaves arbitrary from N(0, std of the weight they extend);
``init="zeros"`` makes them zero as well (still exact, but new MLP units and heads then get zero gradients
until something else moves them).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from . import gpt2, llama
from .carry import carry, prepare
from .resize import Growth

__all__ = ["expand", "parse_growth", "grow_mlp_width", "grow_heads", "grow_head_dim", "grow_hidden", "grow_layers",
           "Growth"]

ORDER = ("mlp_width", "heads", "head_dim", "hidden", "add_layers")


def _arch(model: nn.Module):
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind == "llama":
        return llama
    if kind == "gpt2":
        return gpt2
    raise ValueError(f"model: growth supports HuggingFace Llama and GPT-2 models, got {type(model).__name__} "
                     f"(config.model_type={kind!r})")


def expand(model: nn.Module, optimizer: Any = None, *, mlp_width: int | None = None, heads: int | None = None,
           head_dim: int | None = None, hidden: int | None = None, add_layers=None, init: str = "random",
           seed: int = 0) -> Growth:
    """Apply the requested expansions in place; returns the record of resized and added parameters.

    mlp_width: new MLP width. heads: new query-head count (Llama: whole kv groups). head_dim: new head
    width (Llama). hidden: new residual width (Llama). add_layers: indices of the current layer list,
    a new layer inserted before each (the length appends). optimizer: the optimizer training ``model``.
    """
    growth = Growth(init, seed)
    arch = _arch(model)
    todo = {k: v for k, v in dict(mlp_width=mlp_width, heads=heads, head_dim=head_dim, hidden=hidden,
                                  add_layers=add_layers).items() if v is not None}
    arch.preflight(model, todo)  # every requested transform checked against the sizes it will meet, first
    if optimizer is not None:
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        prepare(optimizer)
    for name in ORDER:
        if name in todo:
            step = Growth(init, seed, gen=growth.gen)  # one record per transform: a tensor grows once in each
            getattr(arch, name)(model, step, todo[name])
            if optimizer is not None:
                carry(optimizer, step, model)
            growth.resized += step.resized
            growth.added += step.added
    return growth


def grow_mlp_width(model: nn.Module, size: int, optimizer: Any = None, *, init: str = "random", seed: int = 0):
    """MLP width -> ``size`` (see ``expand``)."""
    return expand(model, optimizer, mlp_width=size, init=init, seed=seed)


def grow_heads(model: nn.Module, count: int, optimizer: Any = None, *, init: str = "random", seed: int = 0):
    """Query heads -> ``count`` (see ``expand``)."""
    return expand(model, optimizer, heads=count, init=init, seed=seed)


def grow_head_dim(model: nn.Module, size: int, optimizer: Any = None, *, init: str = "random", seed: int = 0):
    """Head width -> ``size`` (see ``expand``)."""
    return expand(model, optimizer, head_dim=size, init=init, seed=seed)


def grow_hidden(model: nn.Module, size: int, optimizer: Any = None, *, init: str = "random", seed: int = 0):
    """Residual width -> ``size`` (see ``expand``)."""
    return expand(model, optimizer, hidden=size, init=init, seed=seed)


def grow_layers(model: nn.Module, positions, optimizer: Any = None, *, init: str = "random", seed: int = 0):
    """Insert layers before ``positions`` (see ``expand``)."""
    return expand(model, optimizer, add_layers=positions, init=init, seed=seed)


def parse_growth(text: str) -> tuple[int, dict[str, Any]]:
    """``"STEP:key=value,..."`` -> (step, expand keyword arguments); add_layers takes ``+``-separated indices,
    e.g. ``"200:mlp_width=512,add_layers=1+3"`` (the command line of ``geomopt-bench --grow``)."""
    step, sep, spec = text.partition(":")
    if not sep or not step.strip().isdigit() or not spec.strip():
        raise ValueError(f"expected STEP:key=value[,key=value...], got {text!r}")
    kwargs: dict[str, Any] = {}
    for item in spec.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or key not in ORDER:
            raise ValueError(f"{item!r} in {text!r}: keys are {', '.join(ORDER)}")
        try:
            kwargs[key] = [int(v) for v in value.split("+")] if key == "add_layers" else int(value)
        except ValueError:
            raise ValueError(f"{item!r} in {text!r}: values are integers") from None
    return int(step), kwargs
