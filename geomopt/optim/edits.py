"""Weights changed outside the optimizer: ``model.load_state_dict``, an in-place edit (``w.data.mul_(2)``, a
pruning mask), another optimizer's step.

A method that rewrites a weight from its own factors (POET with ``store_base=True``: W = R W0 P; DLRAMomentum:
W = U S V^T) would overwrite such a change with a stale base. After each of its writes the optimizer keeps a
fingerprint of the weight, y = W v for a fixed random vector v (m numbers per weight, one matrix-vector product,
not saved in the state_dict), and compares it before the next step. torch's version counter is no help here:
an edit through ``.data`` does not bump it. A change in any entry changes y unless it is below the rounding of y
(about 1e-7 of y's size in fp32). The methods whose rewrite is incremental (POET lean mode, ReLoRA) keep such
changes by construction and need no fingerprint.

POET's tile pipeline (the kernel path) keeps another fingerprint, the row checksums of ``geometry.tiles``: its
kernels take them as they read and write the weights, so checking costs no pass of its own, and any change of an
entry changes them. A record says which kind it is; a weight is checked with the kind it was recorded with.
"""
from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch

from ..geometry.tiles import checksum_probe, row_checksums
from .sharded import to_local

__all__ = ["Fingerprints"]


class _Record(NamedTuple):
    """Fingerprints taken together: the weights (weak references, in order) and their fingerprints (L, m): products
    W v (``checksums`` False) or row checksums (int32)."""
    refs: tuple
    ys: torch.Tensor
    checksums: bool = False


class Fingerprints:
    """The last fingerprint the optimizer took of each weight it wrote. Weights recorded together (of one shape,
    dtype and device, with ``together``: one stacked product instead of one per weight) are checked together, by
    the same computation on the same weights, so that the bits compare equal when nothing changed."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, _Record, int]] = {}  # id(weight) -> (weak ref, its record, its row)
        self._probes: dict[tuple, torch.Tensor] = {}
        self.fresh: set[int] = set()  # ids of the weights recorded from their stacked values in this step

    def _probe(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (n, dtype, device)
        if key not in self._probes:
            v = torch.randn(n, generator=torch.Generator().manual_seed(0x5EED + n), dtype=torch.float64)
            self._probes[key] = v.to(device=device, dtype=dtype)
        return self._probes[key]

    def _take(self, params: list[torch.Tensor]) -> torch.Tensor:
        """(L, m): the fingerprints of weights of one local shape, dtype and device."""
        with torch.no_grad():  # read as data: no graph, so no detach either
            ws = [to_local(p) for p in params]
            return self._product(ws[0].unsqueeze(0) if len(ws) == 1 else torch.stack(ws))

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if x.shape[0] == 1:
            return torch.mv(x[0], self._probe(x.shape[-1], x.dtype, x.device)).unsqueeze(0)
        return torch.matmul(x, self._probe(x.shape[-1], x.dtype, x.device))

    def record_stacked(self, params: list[torch.Tensor], stacked: torch.Tensor) -> None:
        """Record weights just written from ``stacked`` ((L, m, n), of their dtype: the same bits), without reading
        them again; ``fresh`` holds them until the step's end."""
        self._keep(params, self._product(stacked))
        self.fresh.update(id(p) for p in params)

    def record_checksums(self, params: list[torch.Tensor], sums: torch.Tensor) -> None:
        """Record the row checksums (L, m) int32 of weights just written (``fresh`` until the step's end)."""
        self._keep(params, sums, checksums=True)
        self.fresh.update(id(p) for p in params)

    def checksummed(self, p: torch.Tensor) -> bool | None:
        """Whether ``p``'s record holds row checksums (None: ``p`` has no record)."""
        entry = self._seen.get(id(p))
        if entry is None or entry[0]() is not p:
            return None
        return entry[1].checksums

    def expected(self, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per weight of ``params``, its recorded row checksums (m,) int32 (a view of the record), or None where its
        record holds none."""
        out: list[torch.Tensor | None] = []
        for p in params:
            entry = self._seen.get(id(p))
            ok = entry is not None and entry[0]() is p and entry[1].checksums
            out.append(entry[1].ys[entry[2]] if ok else None)
        return out

    def _keep(self, params: list[torch.Tensor], ys: torch.Tensor, checksums: bool = False) -> None:
        """``ys`` (L, m) as the record of ``params``, taken together."""
        rec = _Record(tuple(weakref.ref(p) for p in params), ys, checksums)
        for j, p in enumerate(params):
            pid = id(p)
            self._seen[pid] = (weakref.ref(p, lambda _, k=pid: self._seen.pop(k, None)), rec, j)

    def record(self, params: list[torch.Tensor], together: bool = False) -> None:
        buckets: dict[Any, list[torch.Tensor]] = {}
        for i, p in enumerate(params):
            t = to_local(p)
            buckets.setdefault((tuple(t.shape), t.dtype, t.device) if together else i, []).append(p)
        for bucket in buckets.values():
            self._keep(bucket, self._take(bucket))

    def same_flags(self, params: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
        """(the positions in ``params`` of the weights with a record, a 1-D bool tensor on the device: whether each
        of those is as the optimizer last wrote it, its fingerprint of the same bits, so that a NaN compares
        equal). A weight recorded with others that are gone since counts as changed. Nothing is read on the
        host."""
        by_rec: dict[int, tuple[_Record, list[int]]] = {}
        for i, p in enumerate(params):
            entry = self._seen.get(id(p))
            if entry is not None and entry[0]() is p:
                by_rec.setdefault(id(entry[1]), (entry[1], []))[1].append(i)
        known, flags = [], []
        for rec, ix in by_rec.values():
            members = [r() for r in rec.refs]
            order = [self._seen[id(params[i])][2] for i in ix]
            if any(m is None for m in members):
                flags.append(torch.zeros(len(ix), dtype=torch.bool, device=rec.ys.device))
                known += ix
                continue
            now, then = (self._sums(members) if rec.checksums else self._take(members)), rec.ys
            bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[now.element_size()]
            same = (now.view(bits) == then.view(bits)).all(dim=1)
            flags.append(same if order == list(range(len(members))) else same[torch.tensor(order, device=same.device)])
            known += ix
        if not known:
            return [], torch.zeros(0, dtype=torch.bool)
        device = flags[0].device
        return known, torch.cat([f.to(device) for f in flags]) if len(flags) > 1 else flags[0]

    @staticmethod
    def _sums(params: list[torch.Tensor]) -> torch.Tensor:
        """(L, m): the row checksums of weights of one local shape and dtype, computed in torch."""
        ws = [to_local(p).detach() for p in params]
        probe = checksum_probe(ws[0].shape[1], ws[0].dtype, ws[0].device)
        return torch.stack([row_checksums(w, probe) for w in ws])

    def forget(self) -> None:
        self._seen.clear()
