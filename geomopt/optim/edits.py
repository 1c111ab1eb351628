"""Weights changed outside the optimizer: ``model.load_state_dict``, an in-place edit (``w.data.mul_(2)``, a
pruning mask), another optimizer's step.

A method that rewrites a weight from its own factors (POET with ``store_base=True``: W = R W0 P; DLRAMomentum:
W = U S V^T) would overwrite such a change with a stale base. After each of its writes the optimizer keeps a
fingerprint of the weight, y = W v for a fixed random vector v (m numbers per weight, one matrix-vector product,
not saved in the state_dict), and compares it before the next step. torch's version counter is no help here:
an edit through ``.data`` does not bump it. A change in any entry changes y unless it is below the rounding of y
(about 1e-7 of y's size in fp32). The methods whose rewrite is incremental (POET lean mode, ReLoRA) keep such
changes by construction and need no fingerprint.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from .sharded import to_local

__all__ = ["Fingerprints"]


class Fingerprints:
    """The last fingerprint the optimizer took of each weight it wrote."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, torch.Tensor]] = {}
        self._probes: dict[tuple, torch.Tensor] = {}

    def _probe(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (n, dtype, device)
        if key not in self._probes:
            v = torch.randn(n, generator=torch.Generator().manual_seed(0x5EED + n), dtype=torch.float64)
            self._probes[key] = v.to(device=device, dtype=dtype)
        return self._probes[key]

    def _take(self, p: torch.Tensor) -> torch.Tensor:
        w = to_local(p).detach()
        if w.dtype in (torch.float16, torch.bfloat16):
            w = w.float()
        return torch.mv(w, self._probe(w.shape[1], w.dtype, w.device))

    def record(self, params: list[torch.Tensor]) -> None:
        for p in params:
            pid = id(p)
            self._seen[pid] = (weakref.ref(p, lambda _, k=pid: self._seen.pop(k, None)), self._take(p))

    def _same(self, p: torch.Tensor) -> torch.Tensor:
        """0-d bool: the fingerprint of ``p`` now has the bits of the recorded one (so a NaN compares equal)."""
        now, then = self._take(p), self._seen[id(p)][1]
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[now.element_size()]
        return (now.view(bits) == then.view(bits)).all()

    def same_flags(self, params: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
        """(the positions in ``params`` of the weights with a record, a 1-D bool tensor on the device: whether each
        of those is as the optimizer last wrote it). Nothing is read on the host."""
        known = [i for i, p in enumerate(params) if (rec := self._seen.get(id(p))) is not None and rec[0]() is p]
        if not known:
            return [], torch.zeros(0, dtype=torch.bool)
        flags = [self._same(params[i]) for i in known]
        return known, torch.stack([f.to(flags[0].device) for f in flags])

    def forget(self) -> None:
        self._seen.clear()
