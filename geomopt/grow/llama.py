"""The function-preserving expansions for HuggingFace Llama (SwiGLU MLP, RMSNorm, RoPE, grouped-query
attention), in place, with the config and every per-module attribute kept consistent.

Transforms 3 and 4 of the paper (value width and key/query width) are one transform here, ``head_dim``,
because Llama shares one head width for q, k and v.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .resize import Growth, check_growth, check_positions, old_positions

KEEP = "keep"  # the fill of a dimension that does not grow


def parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the LlamaModel with ``layers``, the LM head or None)."""
    base = model.model if hasattr(getattr(model, "model", None), "layers") else model
    if not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
        raise ValueError(f"model must be a LlamaForCausalLM or LlamaModel, got {type(model).__name__}")
    return base, getattr(model, "lm_head", None)


def _bias(growth: Growth, lin: nn.Linear, m: torch.Tensor, scale: float = 1.0) -> None:
    """A bias follows its weight's rows; its new entries are zero (an arbitrary choice that is always exact)."""
    if lin.bias is not None:
        growth.resize(lin, "bias", (lin.weight.shape[0],), (m,), ("zero",), scale)


def _rows(growth: Growth, lin: nn.Linear, new_out: int, m: torch.Tensor, fill: str, scale: float = 1.0) -> None:
    growth.resize(lin, "weight", (new_out, lin.weight.shape[1]), (m, None), (fill, KEEP), scale)
    _bias(growth, lin, m, scale)
    lin.out_features = new_out


def _cols(growth: Growth, lin: nn.Linear, new_in: int, m: torch.Tensor, fill: str) -> None:
    growth.resize(lin, "weight", (lin.weight.shape[0], new_in), (None, m), (KEEP, fill))
    lin.in_features = new_in


def mlp_width(model: nn.Module, growth: Growth, size: int) -> None:
    """SwiGLU width p -> p': new gate/up rows arbitrary, new down-projection columns zero."""
    base, _ = parts(model)
    cfg = model.config
    m = old_positions("mlp_width", size, cfg.intermediate_size)
    if m is None:
        return
    for layer in base.layers:
        mlp = layer.mlp
        _rows(growth, mlp.gate_proj, size, m, "random")
        _rows(growth, mlp.up_proj, size, m, "random")
        _cols(growth, mlp.down_proj, size, m, "zero")
        mlp.intermediate_size = size
    cfg.intermediate_size = size


def _head_index(heads: int, old_d: int, new_d: int, per_head: torch.Tensor) -> torch.Tensor:
    """Rows of a (heads * d) projection: head h's dim j goes to h * new_d + per_head[j]."""
    return (torch.arange(heads)[:, None] * new_d + per_head[None, :]).reshape(-1)


def check_heads(cfg, count: int) -> None:
    h_old, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    group = h_old // kv
    if (count - h_old) % group:
        raise ValueError(f"heads={count}: the {h_old} query heads share {kv} kv heads in groups of {group}, so "
                         f"heads can only be added in whole groups (a multiple of {group}); {count - h_old} is not")


def heads(model: nn.Module, growth: Growth, count: int) -> None:
    """Add query heads in whole kv groups (new kv heads with them): q, k, v of the new heads arbitrary,
    the output-projection columns that read them zero. The group size H / K stays, so every old query
    head keeps its kv head."""
    base, _ = parts(model)
    cfg = model.config
    h_old, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if not check_growth("heads", count, h_old):
        return
    check_heads(cfg, count)
    group = h_old // kv
    kv_new = kv + (count - h_old) // group
    d = cfg.head_dim
    for layer in base.layers:
        attn = layer.self_attn
        _rows(growth, attn.q_proj, count * d, torch.arange(h_old * d), "random")
        _rows(growth, attn.k_proj, kv_new * d, torch.arange(kv * d), "random")
        _rows(growth, attn.v_proj, kv_new * d, torch.arange(kv * d), "random")
        _cols(growth, attn.o_proj, count * d, torch.arange(h_old * d), "zero")
        attn.num_key_value_groups = count // kv_new
    cfg.num_attention_heads, cfg.num_key_value_heads = count, kv_new


def check_head_dim(cfg, size: int) -> None:
    d = cfg.head_dim
    if size % 2 or d % 2:
        raise ValueError(f"head_dim={size}: RoPE rotates pairs of dimensions, the old ({d}) and new head "
                         "widths must be even")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
        raise ValueError(f"head_dim={size}: growth keeps RoPE frequencies only for the default rope type with "
                         f"rope_theta, got rope_parameters={rope}")


def head_dim(model: nn.Module, growth: Growth, size: int) -> None:
    """Head width d -> d' for q, k and v together (the paper's transforms 3 and 4): new v dims arbitrary
    and the output-projection columns that read them zero; new k dims zero, new q dims arbitrary, old k
    rows times sqrt(d'/d) against the new 1/sqrt(d') scaling. RoPE pairs dimension i with i + d/2: the
    old halves go to [0, d/2) and [d'/2, d'/2 + d/2), and rope_theta' = theta^(d'/d) keeps their
    frequencies (the rotary buffer is recomputed from the config on load)."""
    base, _ = parts(model)
    cfg = model.config
    d = cfg.head_dim
    if not check_growth("head_dim", size, d):
        return
    check_head_dim(cfg, size)
    rope = dict(cfg.rope_parameters)
    half = torch.arange(d // 2)
    per_head = torch.cat([half, size // 2 + half])
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    q_map, kv_map = _head_index(h, d, size, per_head), _head_index(kv, d, size, per_head)
    scale = math.sqrt(size / d)
    for layer in base.layers:
        attn = layer.self_attn
        _rows(growth, attn.q_proj, h * size, q_map, "random")
        _rows(growth, attn.k_proj, kv * size, kv_map, "zero", scale)
        _rows(growth, attn.v_proj, kv * size, kv_map, "random")
        _cols(growth, attn.o_proj, h * size, q_map, "zero")
        attn.head_dim = size
        attn.scaling = size**-0.5
    rope["rope_theta"] = rope["rope_theta"] ** (size / d)
    cfg.rope_parameters = rope
    cfg.head_dim = size
    old = base.rotary_emb
    base.rotary_emb = type(old)(config=cfg).to(old.inv_freq.device)


def hidden(model: nn.Module, growth: Growth, size: int) -> None:
    """Residual width h -> h': new embedding dims and every weight that writes a new residual dim (o,
    down) zero; the weights that read them (q, k, v, gate, up, lm_head) arbitrary; RMSNorm gains times
    sqrt(h/h') and eps times h/h' (per module and in the config)."""
    base, head = parts(model)
    cfg = model.config
    h = cfg.hidden_size
    m = old_positions("hidden", size, h)
    if m is None:
        return
    emb = base.embed_tokens
    tied = head is not None and head.weight is emb.weight
    growth.resize(emb, "weight", (emb.weight.shape[0], size), (None, m), (KEEP, "zero"))
    emb.embedding_dim = size
    scale = math.sqrt(h / size)
    norms = [base.norm]
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _cols(growth, lin, size, m, "random")
        for lin in (attn.o_proj, mlp.down_proj):
            _rows(growth, lin, size, m, "zero")
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        mlp.hidden_size = layer.hidden_size = size
    for norm in norms:
        growth.resize(norm, "weight", (size,), (m,), ("zero",), scale)
        norm.weight.data[h:] = scale  # a fresh gain of one, rescaled like the others
        norm.variance_epsilon = norm.variance_epsilon * h / size
    if tied:
        head.weight = emb.weight
        head.in_features = size
    elif head is not None:
        _cols(growth, head, size, m, "random")
    cfg.rms_norm_eps = cfg.rms_norm_eps * h / size
    cfg.hidden_size = size


def add_layers(model: nn.Module, growth: Growth, positions) -> None:
    """Insert a decoder layer before each index of ``positions`` (indices of the current layer list; the
    length appends): its output and down projections zero (the layer adds nothing to the residual), the
    rest arbitrary, its norms copied from the neighbouring layer."""
    base, _ = parts(model)
    cfg = model.config
    n = len(base.layers)
    positions = check_positions(positions, n)
    for pos in sorted(positions, reverse=True):
        template = base.layers[min(pos, n - 1)]
        layer = growth.new_layer(template, lambda: type(template)(cfg, layer_idx=pos),
                                 is_zero=lambda name: name.endswith(("o_proj.weight", "down_proj.weight", "bias")),
                                 is_copied=lambda name: name.endswith("layernorm.weight"))
        layer.self_attn.num_key_value_groups = template.self_attn.num_key_value_groups
        base.layers.insert(pos, layer)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and types:
            types.insert(pos, types[min(pos, len(types) - 1)])
    for i, layer in enumerate(base.layers):
        layer.self_attn.layer_idx = i
    cfg.num_hidden_layers = len(base.layers)


def preflight(model: nn.Module, todo: dict) -> None:
    """Check every requested transform (``todo``: name -> argument) against the sizes it will meet, in the order
    ``expand`` applies them, before anything changes."""
    cfg = model.config
    if "mlp_width" in todo:
        check_growth("mlp_width", todo["mlp_width"], cfg.intermediate_size)
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    if "heads" in todo:
        check_growth("heads", todo["heads"], heads)
        check_heads(cfg, todo["heads"])
        heads = todo["heads"]
    if "head_dim" in todo and check_growth("head_dim", todo["head_dim"], cfg.head_dim):
        check_head_dim(cfg, todo["head_dim"])
    if "hidden" in todo:
        check_growth("hidden", todo["hidden"], hidden)
        hidden = todo["hidden"]
    if hidden % heads:
        raise ValueError(f"heads={heads}, hidden={hidden}: LlamaConfig requires hidden_size to be a multiple of the "
                         "number of attention heads")
    if "add_layers" in todo:
        check_positions(todo["add_layers"], cfg.num_hidden_layers)
