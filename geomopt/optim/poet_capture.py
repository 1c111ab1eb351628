"""POET's capturable step (``capturable=True``): the decisions that the plain step reads on the host, taken on the
device, so that a step reads no device value and can be captured in a CUDA graph.

- Non-finite gradients: the whole step's updates are skipped on the device where ``ok`` (every gradient of the
  group finite) is False, as torch's GradScaler skips a step: the inner Adam's fused kernel leaves the factors
  and their state as they are, and the weights stay as they are (lean mode: rotated by exact identities; paper
  mode: the old weight selected).
- The safeguard: a weight whose bound passes ``max_q_norm`` takes the exact Cayley rotations of its blocks (the
  exact map runs for every block, the choice is per weight) and is merged on the device: its generators and
  their inner state become zero. It keeps its permutations until its next scheduled merge (the plain step draws
  new ones at once).
- The Newton-Schulz inverses run the iterations that ``max_q_norm`` guarantees; if they did not converge (a
  state loaded from a run with a larger bound), the step leaves the weights as they are and merges them.
- Paper mode, a weight changed from outside (its fingerprint, compared on the device): it is re-based on the
  device (W0 <- W, generators and inner state zeroed) and not moved in that step; the plain step re-bases it
  and then steps it.
- The counters (merges, early merges, re-bases) are 0-d device tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch

from .batching import ByKey
from .poet_settings import RotationMap
from .poet_step import Work, entry_owners, per_size, rotation, rotation_and_bound, weight_bounds
from .sharded import to_local

__all__ = ["device_safeguard", "keep_unless", "device_resets", "base_reset"]


def device_safeguard(limit: float | None, works: list[Work], batch: ByKey, new_q: dict, rmap: RotationMap | None,
                     ok: torch.Tensor, converged: torch.Tensor | None,
                     due: list[bool] | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(the new rotations per key of ``batch``, exact where the safeguard fires or ``due`` (per weight, from the
    host: a scheduled merge follows and ``exact_merge`` is set); per weight, whether its update is taken; per
    weight, whether it is merged on the device), all computed on the device."""
    n, device = len(works), ok.device
    conv = torch.ones((), dtype=torch.bool, device=device) if converged is None else converged.to(device)
    take = (ok & conv).expand(n)
    if rmap is None or limit is None or not new_q:
        return per_size(lambda q, b: rotation(q, b, rmap), new_q), take, (ok & ~conv).expand(n)
    pairs = per_size(lambda q, b: rotation_and_bound(q, b, rmap), new_q)
    flagged = weight_bounds(works, batch, {k: bd for k, (_, bd) in pairs.items()}) > limit
    exact = per_size(lambda q, b: rotation(q, b, None), new_q)
    owners = entry_owners(works, batch, device)
    use = flagged if due is None or not any(due) else flagged | torch.tensor(due, device=device)
    mats = {k: torch.where(use[owners[k]].view(-1, 1, 1), exact[k], r) for k, (r, _) in pairs.items()}
    return mats, take, ok & (flagged | ~conv)


def keep_unless(mats: dict[Hashable, torch.Tensor], take: torch.Tensor, works: list[Work],
                batch: ByKey) -> dict[Hashable, torch.Tensor]:
    """Lean mode's incremental rotations, the identity (exactly: the weight is left as it is) for the blocks of the
    weights whose update is not taken."""
    owners = entry_owners(works, batch, take.device)
    out = {}
    for k, m in mats.items():
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        out[k] = torch.where(take[owners[k]].view(-1, 1, 1), m, eye)
    return out


def device_resets(works: list[Work], early: torch.Tensor, rebased: torch.Tensor | None, new_qs: list[torch.Tensor],
                  new_inner: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge on the device the weights where ``early`` (the safeguard, or inverses that did not converge) or
    ``rebased`` (paper mode: changed from outside) is True: their new generators and inner states (this step's
    private tensors) zeroed in place; returns per weight its new counters (0-d device tensors)."""
    device = early.device
    reset = early if rebased is None else early | rebased
    owner = torch.tensor([i for i, w in enumerate(works) for _ in w.qs], dtype=torch.long, device=device)
    keep = list((~reset).to(torch.float32)[owner].unbind(0))
    tensors, scales = list(new_qs), list(keep)
    for s, k in zip(new_inner, keep):
        for v in s.values():
            if isinstance(v, torch.Tensor):
                tensors.append(v)
                scales.append(k)
    torch._foreach_mul_(tensors, scales)

    def counted(key: str, flags: torch.Tensor) -> list[torch.Tensor]:
        now = [c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.long, device=device)
               for c in (w.st.get(key, 0) for w in works)]
        return torch._foreach_add(now, list(flags.long().unbind(0)))

    out = [dict(merges=m, early_merges=e) for m, e in zip(counted("merges", early), counted("early_merges", early))]
    if rebased is not None:
        for up, r in zip(out, counted("rebases", rebased)):
            up["rebases"] = r
    return out


def base_reset(works: list[Work], write: Callable[[], Any], new: torch.Tensor, reset: torch.Tensor):
    """Paper mode: ``write`` followed by W0 <- the new weight for the weights merged on the device (``new``: the
    group's new weights stacked, in the factor dtype), W0 kept elsewhere; computed now, written by the returned
    function (which allocates nothing)."""
    w0s = [to_local(w.st["w0"]) for w in works]
    stacked = w0s[0].unsqueeze(0) if len(w0s) == 1 else torch.stack(w0s)
    merged = list(torch.where(reset.view(-1, 1, 1), new, stacked).unbind(0))

    def both() -> None:
        write()
        torch._foreach_copy_(w0s, merged)

    return both
