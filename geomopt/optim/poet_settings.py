"""POET's settings: their checks (each error names the argument and the value) and the block layout they give a
side of a weight (``layout``, ``sizes``)."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ..geometry import block_layout, block_sizes
from .checks import check_number
from .inner import AdamRule
from .state import factor_dtype

__all__ = ["MODES", "SIDES", "FORMS", "DEFAULT_BLOCK", "RotationMap", "rotation_map", "layout", "sizes", "lr_scales",
           "rounds", "compensates", "check_group", "check_capturable"]

MODES = ("bs", "fs")
FORMS = ("paper", "series")
SIDES = ("row", "col")
DEFAULT_BLOCK = 256


class RotationMap(NamedTuple):
    """The Cayley-Neumann polynomial the generators go through, k = ``terms``: ``form`` "paper", (I + Q)(I + Q + ... +
    Q^k) (``geometry.cayley_neumann``), or "series", I + 2(Q + ... + Q^(k-1)) (``geometry.cayley_series``)."""
    terms: int
    form: str = "paper"

    @property
    def name(self) -> str:
        """The map's name at the dispatch point (``geometry.dispatch``): its reference and kernels."""
        return "cayley_neumann" if self.form == "paper" else "cayley_series"

    def residual(self, c: float) -> float:
        """A bound on ||I - D D^T|| for the block D of a generator with ||Q||_2 <= c: for "paper", D D^T =
        (I - Q^(k+1))(I - (-Q)^(k+1)), so 2 c^(k+1) + c^(2k+2) for odd k and c^(2k+2) for even k; for "series",
        4 c^k + 4 c^(2k) (see ``geometry.cayley_series``)."""
        k = self.terms
        if self.form == "series":
            return 4 * c ** k + 4 * c ** (2 * k)
        return 2 * c ** (k + 1) + c ** (2 * k + 2) if k % 2 else c ** (2 * k + 2)


def rotation_map(group: dict[str, Any]) -> RotationMap | None:
    """The group's map from generators to blocks: None for the exact Cayley map (``exact_cayley``)."""
    if group["exact_cayley"]:
        return None
    return RotationMap(group["neumann_terms"], group.get("neumann_form", "paper"))


def side_block(dim: int, group: dict[str, Any]) -> int:
    b = group["block_size"]
    if b is None:
        return DEFAULT_BLOCK
    if isinstance(b, float):  # fully stochastic: a fraction of the dimension
        return max(2, int(round(b * dim)))
    return b


def layout(perm: torch.Tensor, group: dict[str, Any], chunks: int = 1) -> list[torch.Tensor]:
    """Index blocks of one side: ``perm`` cut into ``chunks`` equal consecutive parts, each blocked on its own
    (the row permutation's scope; 1 = the whole side), the parts' blocks of one size concatenated."""
    if chunks == 1:
        return block_layout(perm, side_block(perm.numel(), group), group["mode"] == "fs")
    parts = [block_layout(c, side_block(c.numel(), group), False) for c in perm.chunk(chunks)]
    return [torch.cat(blocks) for blocks in zip(*parts)]


def sizes(dim: int, group: dict[str, Any], chunks: int = 1) -> list[tuple[int, int]]:
    """[(blocks, b), ...] of a side of ``dim`` indices cut into ``chunks`` parts (see ``layout``)."""
    part = dim // chunks
    return [(nb * chunks, b) for nb, b in block_sizes(part, side_block(part, group), group["mode"] == "fs")]


def lr_scales(group: dict[str, Any], works: list) -> list[float]:
    """Per generator tensor of ``works`` (row blocks first, as ``Work.qs``): the factor of the group's lr it steps
    with, sqrt(lr_ref_block / b) for its side's block size b, or 1.0 throughout without ``lr_ref_block``."""
    ref = group.get("lr_ref_block")
    out: list[float] = []
    for w in works:
        for side in (w.rows, w.cols):
            b = max((idx.shape[1] for idx in side), default=1)
            out += [1.0 if ref is None or b == ref else math.sqrt(ref / b)] * len(side)
    return out


def _check_block_size(group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
    mode, b = group["mode"], group["block_size"]
    if b is None:
        b = DEFAULT_BLOCK
    elif isinstance(b, bool) or not isinstance(b, (int, float)):
        raise TypeError(f"block_size must be an int (or a float fraction in 'fs' mode), got {b!r}")
    if isinstance(b, float):
        if mode != "fs":
            raise TypeError(f"block_size must be an int in 'bs' mode, got {b!r}")
        if not 0.0 < b <= 1.0:
            raise ValueError(f"block_size as a fraction must be in (0, 1], got {b!r}")
    elif b < 2:
        raise ValueError(f"block_size must be >= 2, got {b!r}")
    elif group["block_size"] is not None and factorized and all(b > max(p.shape) for p in factorized):
        largest = max(max(p.shape) for p in factorized)
        raise ValueError(f"block_size={b} is larger than every routed weight (largest dimension {largest})")


def rounds(group: dict[str, Any], p: torch.Tensor) -> bool:
    """Whether lean mode rounds weight ``p`` at every step: its dtype is below its factors' (bf16 / fp16)."""
    return not group["store_base"] and p.dtype != factor_dtype(p)


def compensates(group: dict[str, Any], p: torch.Tensor) -> bool:
    """Whether lean mode keeps the rounding its step drops from weight ``p`` (``compensate``), off the capturable
    step."""
    return rounds(group, p) and group["compensate"] and not group["capturable"]


def check_group(group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
    """A param group's POET settings (``factorized``: its routed weights)."""
    if group["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {group['mode']!r}")
    _check_block_size(group, factorized)
    form = group.get("neumann_form", "paper")
    if form not in FORMS:
        raise ValueError(f"neumann_form must be one of {FORMS}, got {form!r}")
    check_number("neumann_terms", group["neumann_terms"], low=2 if form == "series" else 1, integer=True)
    check_number("merge_every", group["merge_every"], low=1, integer=True)
    for key in ("exact_cayley", "exact_merge", "store_base", "compensate", "factorize"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{key} must be a bool, got {group[key]!r}")
    if group["max_q_norm"] is not None:
        check_number("max_q_norm", group["max_q_norm"], low=0.0, low_open=True)
    if group["row_shards"] is not None:
        check_number("row_shards", group["row_shards"], low=1, integer=True)
    if group.get("lr_ref_block") is not None:
        check_number("lr_ref_block", group["lr_ref_block"], low=1, integer=True)


def check_capturable(group: dict[str, Any], nonfinite: str, external_edits: str, inner: Any) -> None:
    """What ``capturable=True`` needs (see ``poet_capture``): a bound for the inverses, the policies that need no
    host read, and the factors on torch's fused Adam kernel."""
    why = None
    if external_edits != "rebase":
        why = f"external_edits={external_edits!r} (raising needs a host read); pass external_edits='rebase'"
    elif group["max_q_norm"] is None and not group["exact_cayley"]:
        why = "max_q_norm=None (the inverses' fixed iterations rely on the bound); pass a max_q_norm"
    elif nonfinite != "skip":
        why = f"nonfinite={nonfinite!r} (raising needs a host read); pass nonfinite='skip'"
    elif not isinstance(inner, AdamRule) or inner.kwargs.get("fused") is False or inner.kwargs.get("foreach"):
        why = "an inner rule other than torch Adam / AdamW on its fused kernel"
    if why is not None:
        raise ValueError(f"capturable=True is not supported with {why}")
