"""Growing one parameter: where its old entries go, and what the new ones hold.

A growth is described per dimension by a map (the positions of the old indices in the grown dimension;
None: the dimension does not grow) and a fill: ``"zero"`` when the transform needs every new slice along
that dimension to be zero (the weights that write a new residual dimension or read a new unit), else
``"random"`` (arbitrary: drawn with the weight's own standard deviation, or zero with ``init="zeros"``).
An entry that is new along a zero-fill dimension is zero; any other new entry is arbitrary. A grown
tensor is a new Parameter set on its module (replacing ``.data`` in place would leave autograd's cached
gradient accumulator, which holds the old shape, alive in any graph the caller still references); the
record of old and new Parameter lets the optimizer carry-over swap it in every group and in the state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Resize", "Growth", "scatter", "old_mask", "pad_dim", "pad_like", "check_growth", "old_positions",
           "check_positions"]


@dataclass
class Resize:
    """How one parameter grew: ``old_shape``, per-dimension ``maps`` and ``fills``, and the factor
    ``scale`` that multiplied its old entries."""

    param: nn.Parameter
    old: nn.Parameter
    old_shape: tuple[int, ...]
    maps: tuple[torch.Tensor | None, ...]
    fills: tuple[str, ...]
    scale: float = 1.0


def scatter(t: torch.Tensor, new_shape: tuple[int, ...], maps) -> torch.Tensor:
    """The old tensor placed into a zero tensor of ``new_shape`` at the mapped positions."""
    out = t
    for dim, m in enumerate(maps):
        if m is None:
            continue
        shape = list(out.shape)
        shape[dim] = new_shape[dim]
        out = out.new_zeros(shape).index_copy_(dim, m.to(out.device), out)
    return out


def _membership(size: int, m: torch.Tensor | None, device) -> torch.Tensor:
    inside = torch.zeros(size, dtype=torch.bool, device=device)
    if m is None:
        inside[:] = True
    else:
        inside[m.to(device)] = True
    return inside


def _along(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)


def old_mask(new_shape: tuple[int, ...], maps, device) -> torch.Tensor:
    """True where an entry of the grown tensor holds an old entry."""
    mask = torch.ones((), dtype=torch.bool, device=device)
    for dim, m in enumerate(maps):
        mask = mask & _along(_membership(new_shape[dim], m, device), dim, len(new_shape))
    return mask.expand(new_shape)


@dataclass
class Growth:
    """One call's bookkeeping: the random generator, the init, and every resized or added parameter."""

    init: str
    seed: int
    resized: list[Resize] = field(default_factory=list)
    added: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)  # (new, template)
    gen: torch.Generator | None = None

    def __post_init__(self):
        if self.init not in ("random", "zeros"):
            raise ValueError(f"init must be 'random' or 'zeros', got {self.init!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.gen is None:
            self.gen = torch.Generator().manual_seed(self.seed)

    def randn(self, shape, like: torch.Tensor, std: float | None = None) -> torch.Tensor:
        """Arbitrary values for new entries: N(0, std) with the std of ``like`` (zeros with init="zeros")."""
        if self.init == "zeros":
            return torch.zeros(shape, dtype=like.dtype, device=like.device)
        if std is None:
            std = float(like.detach().float().std()) if like.numel() > 1 else 0.0
            if not std > 0:
                std = 0.02
        return (torch.randn(shape, generator=self.gen) * std).to(like.dtype).to(like.device)

    def new_layer(self, template: nn.Module, build, is_zero, is_copied) -> nn.Module:
        """``build()`` a layer like ``template`` (its device and dtype); each parameter zero (``is_zero(name)``),
        copied from the template's (``is_copied(name)``), or arbitrary; recorded with its template."""
        layer = build()
        ref = next(template.parameters())
        layer.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for (name, p), (_, t) in zip(layer.named_parameters(), template.named_parameters()):
                if is_zero(name):
                    p.zero_()
                elif is_copied(name):
                    p.copy_(t)
                else:
                    p.copy_(self.randn(p.shape, t))
                self.added.append((p, t))
        return layer

    def resize(self, module: nn.Module, name: str, new_shape, maps, fills, scale: float = 1.0) -> nn.Parameter:
        """Replace ``module.<name>`` by its grown copy (a new Parameter) and record the growth."""
        p = getattr(module, name)
        if any(r.old is p for r in self.resized):  # tied weights are handled once per transform
            raise RuntimeError("a parameter was resized twice in one transform")
        new_shape = tuple(int(s) for s in new_shape)
        old = p.detach()
        placed = scatter(old * scale if scale != 1.0 else old, new_shape, maps)
        keep = old_mask(new_shape, maps, old.device)
        zero = torch.zeros(new_shape, dtype=torch.bool, device=old.device)
        for dim, (m, fill) in enumerate(zip(maps, fills)):
            if m is not None and fill == "zero":
                zero = zero | ~_along(_membership(new_shape[dim], m, old.device), dim, len(new_shape))
        fresh = self.randn(new_shape, old)
        out = torch.where(keep, placed, torch.where(zero, torch.zeros_like(fresh), fresh))
        new = nn.Parameter(out, requires_grad=p.requires_grad)
        setattr(module, name, new)
        self.resized.append(Resize(new, p, tuple(old.shape), tuple(maps), tuple(fills), scale))
        return new


def pad_like(state: dict, r: Resize) -> None:
    """Every tensor of ``state`` (nested dicts too) shaped like the old parameter, grown with zeros at the new
    entries (AdamW's moments, SGD's momentum buffer, ...); scalars stay."""
    new_shape = tuple(r.param.shape)
    for key, v in list(state.items()):
        if isinstance(v, torch.Tensor) and tuple(v.shape) == r.old_shape and v.dim() > 0:
            state[key] = scatter(v, new_shape, r.maps)
        elif isinstance(v, dict):
            pad_like(v, r)


def pad_dim(t: torch.Tensor, dim: int, m: torch.Tensor | None, size: int,
            fresh: torch.Tensor | None = None) -> torch.Tensor:
    """Grow ``t`` along ``dim`` to ``size``: old slices at ``m`` (None: ``t`` as it is), the rest zero or taken
    from ``fresh`` (a tensor of the grown shape)."""
    if m is None:
        return t
    maps = [None] * t.dim()
    maps[dim] = m
    shape = list(t.shape)
    shape[dim] = size
    out = scatter(t, tuple(shape), maps)
    if fresh is not None:
        keep = old_mask(tuple(shape), maps, t.device)
        out = torch.where(keep, out, fresh.to(out.dtype))
    return out


def check_growth(name: str, new: int, old: int) -> bool:
    """True when there is something to do; TypeError for a non-integer, ValueError for shrinking."""
    if isinstance(new, bool) or not isinstance(new, int):
        raise TypeError(f"{name} must be an int, got {new!r}")
    if new < old:
        raise ValueError(f"{name}={new} is smaller than the current {old}: growth never shrinks a model")
    return new > old


def old_positions(name: str, new: int, old: int) -> torch.Tensor | None:
    """Where the ``old`` indices of a dimension growing to ``new`` go (the first ones), or None when it does not
    grow (``check_growth``'s errors otherwise)."""
    return torch.arange(old) if check_growth(name, new, old) else None


def check_positions(positions, n: int) -> list[int]:
    """``add_layers``' positions (an int or a list of ints in [0, n]) as a list."""
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    try:
        positions = list(positions)
    except TypeError:
        raise TypeError(f"add_layers must be a list of layer indices, got {positions!r}") from None
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= n:
            raise ValueError(f"add_layers: each position must be an int in [0, {n}] (the model has {n} layers), "
                             f"got {p!r}")
    return positions
