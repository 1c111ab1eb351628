"""The expansions that are exact for GPT-2 (LayerNorm, Conv1D weights stored in x out): MLP width and
added layers. Hidden growth and head changes raise ValueError saying why."""
from __future__ import annotations

from torch import nn

from .resize import Growth, check_growth, check_positions, old_positions

KEEP = "keep"


def _blocks(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "transformer", model)
    if not hasattr(base, "h"):
        raise ValueError(f"model must be a GPT2LMHeadModel or GPT2Model, got {type(model).__name__}")
    return base.h


def mlp_width(model: nn.Module, growth: Growth, size: int) -> None:
    """c_fc gains output columns (arbitrary, zero bias), c_proj gains zero input rows."""
    cfg = model.config
    m = old_positions("mlp_width", size, cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd)
    if m is None:
        return
    for block in _blocks(model):
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        growth.resize(fc, "weight", (fc.weight.shape[0], size), (None, m), (KEEP, "random"))
        growth.resize(fc, "bias", (size,), (m,), ("zero",))
        fc.nf = size
        growth.resize(proj, "weight", (size, proj.weight.shape[1]), (m, None), ("zero", KEEP))
        proj.nx = size
    cfg.n_inner = size


def add_layers(model: nn.Module, growth: Growth, positions) -> None:
    """Insert blocks whose attention and MLP output projections (weights and biases) are zero."""
    cfg = model.config
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("add_layers: this GPT-2 scales attention by 1/(layer index + 1), so inserting a layer "
                         "changes the scaling of every later layer; not function-preserving")
    blocks = _blocks(model)
    n = len(blocks)
    positions = check_positions(positions, n)
    for pos in sorted(positions, reverse=True):
        template = blocks[min(pos, n - 1)]
        # the output projections (weights and biases) zero, so the block adds nothing; other biases zero too
        block = growth.new_layer(template, lambda: type(template)(cfg, layer_idx=pos),
                                 is_zero=lambda name: name.endswith(("c_proj.weight", "bias")) and
                                 not name.startswith("ln"),
                                 is_copied=lambda name: name.startswith("ln"))
        blocks.insert(pos, block)
    for i, block in enumerate(blocks):
        block.attn.layer_idx = i
    cfg.n_layer = len(blocks)


def hidden(model: nn.Module, growth: Growth, size: int) -> None:
    raise ValueError(f"hidden={size}: GPT-2 normalizes with LayerNorm, whose mean and variance over the grown "
                     "width change with the new (zero) dimensions and cannot be rescaled exactly (RMSNorm can); "
                     "masked statistics are not implemented")


def heads(model: nn.Module, growth: Growth, count: int) -> None:
    raise ValueError(f"heads={count}: GPT-2 ties the head width to n_embd / n_head, so adding heads at a fixed "
                     "n_embd would change the width of every existing head; not function-preserving")


def head_dim(model: nn.Module, growth: Growth, size: int) -> None:
    raise ValueError(f"head_dim={size}: GPT-2 ties the head width to n_embd / n_head; grow hidden instead "
                     "(which GPT-2's LayerNorm does not allow exactly)")


def preflight(model: nn.Module, todo: dict) -> None:
    """Check every requested transform (``todo``: name -> argument) before anything changes: the MLP width and
    the layer positions; hidden, heads and head_dim raise (not function-preserving for GPT-2)."""
    cfg = model.config
    if "mlp_width" in todo:
        check_growth("mlp_width", todo["mlp_width"], cfg.n_inner or 4 * cfg.n_embd)
    for name, refuse in (("hidden", hidden), ("heads", heads), ("head_dim", head_dim)):
        if name in todo:
            refuse(model, None, todo[name])  # raises
    if "add_layers" in todo:
        check_positions(todo["add_layers"], len(_blocks(model)))
