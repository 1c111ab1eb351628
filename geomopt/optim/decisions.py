"""A capturable step's decisions (``capturable=True``), kept on the device: nothing here is read on the host.

The plain step reads its plan's flags in one host sync (``FactorOptimizer._read_flags``) and decides on the host;
a capturable step computes the same flags and hands them to the method, which applies them with selects.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .checks import finite_flags
from .edits import Fingerprints
from .functional import fused_supported
from .routing import is_factorized
from .sharded import is_dtensor, to_local

__all__ = ["DeviceFlags", "device_flags", "check_capturable_params"]


class DeviceFlags(NamedTuple):
    """``ok``: a 0-d bool, whether every gradient of the step's capturable groups is finite (else the whole step is
    skipped); ``changed``: per weight whose fingerprint was checked, whether it changed since the optimizer wrote
    it, at ``pos[id(weight)]``, and a last entry False for the weights without a record."""
    ok: torch.Tensor
    changed: torch.Tensor
    pos: dict[int, int]

    def edited(self, params: list[torch.Tensor]) -> torch.Tensor:
        """(len(params),) bool on the device: whether each weight was changed from outside."""
        last = self.changed.numel() - 1
        idx = torch.tensor([self.pos.get(id(p), last) for p in params], dtype=torch.long, device=self.changed.device)
        return self.changed[idx]


def device_flags(edits: Fingerprints, stepped: list[torch.Tensor], watched: list[torch.Tensor]) -> DeviceFlags | None:
    """The flags of the capturable groups' ``stepped`` parameters and ``watched`` weights (None if none is
    stepped)."""
    if not stepped:
        return None
    ok = finite_flags([to_local(p.grad) for p in stepped]).all()
    known, same = edits.same_flags(watched)
    changed = torch.zeros(1, dtype=torch.bool, device=ok.device)
    if known:
        changed = torch.cat([~same.to(ok.device), changed])
    return DeviceFlags(ok, changed, {id(watched[i]): j for j, i in enumerate(known)})


def check_capturable_params(group: dict, params: list[torch.Tensor]) -> None:
    """What a capturable step needs of the stepped parameters, checked before anything changes: no DTensor
    (FSDP2), and AdamW-routed tensors that torch's fused kernel takes (contiguous, with contiguous gradients, on a
    device it has the kernel for): it skips a non-finite step on the device."""
    for p in params:
        if is_dtensor(p):
            raise ValueError(f"capturable=True: a DTensor parameter of shape {tuple(p.shape)} (FSDP2) is not "
                             "supported; pass capturable=False")
        if not is_factorized(p, group) and not (p.is_contiguous() and p.grad.is_contiguous()
                                                and fused_supported([p])):
            raise ValueError(f"capturable=True: the AdamW-routed parameter of shape {tuple(p.shape)} must be a "
                             "contiguous tensor with a contiguous gradient on a device with torch's fused AdamW "
                             "kernel, which skips a non-finite step on the device")
