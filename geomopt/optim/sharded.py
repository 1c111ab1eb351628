"""DTensor (FSDP2) helpers of the factor optimizers: which parameters step on their shards, the collectives
they need, and the full-weight fallback for the others.

FSDP2 (``fully_shard``) gives every parameter as a DTensor sharded on its rows (``Shard(0)``) over a 1-D mesh.
A method steps such a weight on its local rows when its factors split the same way (ReLoRA: B's rows; POET:
row blocks inside the shard; DLRA: U's rows); the only communication is then an all-reduce of the replicated
factors' gradients (r x n for ReLoRA's A, b(b-1)/2 per column block for POET) and of a few flags. Every other case
(another placement, a 2-D mesh, rows that do not divide evenly) all-gathers the weight and steps a
replicated full copy (``gather`` / ``scatter``): correct, but the dense weight is materialized on every rank.
DLRA keeps U's rows local and all-reduces the r x r, n x r and 2r x 2r products that sum over rows (``tsqr``
for the retraction's QR); it gathers a weight once, for the SVD that starts its factors.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..geometry.qr import positive_diagonal, qr_input
from .host_read import to_host

__all__ = ["is_dtensor", "RowShard", "row_shard", "all_reduce", "reduce_over_meshes", "global_all", "gather",
           "scatter", "to_local", "like", "local_state", "shard_state", "put_back", "tsqr"]


def is_dtensor(p: Any) -> bool:
    return type(p).__name__ == "DTensor" and hasattr(p, "full_tensor")


class RowShard:
    """Where a row-sharded weight's local rows sit: ``rank`` of ``world``, rows [offset, offset + rows)."""

    def __init__(self, p: torch.Tensor):
        self.mesh = p.device_mesh
        self.placements = tuple(p.placements)
        self.world = self.mesh.size()
        self.rank = self.mesh.get_local_rank()
        self.rows = p.shape[0] // self.world
        self.offset = self.rank * self.rows
        self.group = self.mesh.get_group()


def row_shard(p: torch.Tensor) -> RowShard | None:
    """A ``RowShard`` when ``p`` is a 2-D DTensor with ``Shard(0)`` over a 1-D mesh and rows divisible by the
    mesh size (every rank then holds the same number of rows); else None."""
    if not is_dtensor(p) or p.dim() != 2 or p.device_mesh.ndim != 1:
        return None
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),) or p.shape[0] % p.device_mesh.size() != 0:
        return None
    return RowShard(p)


def to_local(t: Any) -> Any:
    """The local tensor of a DTensor (a view: in-place updates reach the DTensor), anything else unchanged."""
    return t.to_local() if is_dtensor(t) else t


def like(local: torch.Tensor, shard: RowShard, sharded: bool = True) -> torch.Tensor:
    """A DTensor on ``shard``'s mesh from this rank's ``local`` piece: row-sharded (``Shard(0)``; every rank's
    piece has the same shape) or, with ``sharded=False``, replicated (the same value on every rank)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [Shard(0)] if sharded else [Replicate()]
    size = (local.shape[0] * shard.world, *local.shape[1:]) if sharded else local.shape
    return DTensor.from_local(local, shard.mesh, placements, run_check=False, shape=torch.Size(size),
                              stride=torch.empty(size, device="meta").stride())


def all_reduce(t: torch.Tensor, shard: RowShard, op: Any = None) -> torch.Tensor:
    """In-place all-reduce of a plain tensor over the shard's mesh (default: sum)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=shard.group)
    return t


def reduce_over_meshes(values: torch.Tensor, params: list[torch.Tensor], op: Any) -> torch.Tensor:
    """``values[i]`` was computed on ``params[i]``'s local piece; reduce it with ``op`` over the ranks of
    that DTensor's mesh (plain tensors' entries are kept), one collective per mesh dimension."""
    out = values.clone()
    meshes: dict[int, Any] = {}
    for p in params:
        if is_dtensor(p):
            meshes.setdefault(id(p.device_mesh), p.device_mesh)
    for mesh in meshes.values():
        which = torch.tensor([is_dtensor(p) and p.device_mesh is mesh for p in params])
        part = out[which.to(out.device)].contiguous()
        for dim in range(mesh.ndim):
            dist.all_reduce(part, op=op, group=mesh.get_group(dim))
        out[which.to(out.device)] = part
    return out


def global_all(flags: list[torch.Tensor] | torch.Tensor, params: list[torch.Tensor], clean: bool = True) -> list[bool]:
    """``flags[i]`` is a 0-d bool (or an entry of a 1-D bool tensor) computed on ``params[i]``'s local piece; the
    result is the flag over the whole tensor (logical AND over the mesh for DTensors); ``clean`` on fake tensors
    (``host_read``)."""
    if len(flags) == 0:
        return []
    out = (flags if isinstance(flags, torch.Tensor) else torch.stack(flags)).to(torch.int32)
    if any(is_dtensor(p) for p in params):
        out = reduce_over_meshes(out, params, dist.ReduceOp.MIN)
    return [bool(v) for v in to_host(out, [int(clean)] * len(out))]


def tsqr(x: torch.Tensor, shard: RowShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a row-sharded tall matrix (this rank's rows ``x``): QR of the local rows, all-gather of the
    small R factors (c x c each), QR of their stack; signs fixed so that diag(R) >= 0, as
    ``geometry.tall_qr`` does (so for full column rank both give the same factors up to rounding)."""
    q_local, r_local = torch.linalg.qr(qr_input(x))
    parts = [torch.empty_like(r_local) for _ in range(shard.world)]
    dist.all_gather(parts, r_local.contiguous(), group=shard.group)
    q_stack, r = torch.linalg.qr(torch.cat(parts))
    k = r_local.shape[0]
    return positive_diagonal(q_local @ q_stack[shard.rank * k: (shard.rank + 1) * k], r, x.dtype)


def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """A view of an inner optimizer's state with every DTensor replaced by its local piece."""
    return {k: to_local(v) for k, v in state.items()}


def shard_state(state: dict[str, Any], shard: RowShard | None, local_shape: Any) -> dict[str, Any]:
    """An inner optimizer's state computed on a factor's local rows, as the state to keep: every tensor shaped like
    the local factor becomes a row-sharded DTensor (``like``); the rest (step counts) stays as it is."""
    if shard is None:
        return state
    return {k: like(v, shard) if isinstance(v, torch.Tensor) and v.shape == local_shape else v
            for k, v in state.items()}


def put_back(state: dict[str, Any], view: dict[str, Any], shard: RowShard | None, local_shape: Any) -> None:
    """Entries of ``view`` (a ``local_state`` view that an update wrote into) that are not ``state``'s own (created
    or replaced, such as a step count converted for a fused kernel) go back into ``state``: shaped like the local
    factor, as row-sharded DTensors; otherwise as they are. In-place updates need no copy."""
    for k, v in view.items():
        if k not in state or not _same(to_local(state[k]), v):
            sharded = shard is not None and isinstance(v, torch.Tensor) and v.shape == local_shape
            state[k] = like(v, shard) if sharded else v


def _same(a: Any, b: Any) -> bool:
    """Whether a and b are one value (tensors: the same storage, offset and shape)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype)
    return a is b


def gather(optimizer: Any, params: list[torch.Tensor], keep: Any = None) -> tuple[list[torch.Tensor], dict]:
    """Replace each DTensor in ``params`` (but those for which ``keep(p)`` is true) by a full, replicated
    copy (weight and gradient all-gathered, the same collectives in the same order on every rank); its state
    is re-keyed to the copy for the step and back by ``scatter``, which writes each rank's shard. Correct and
    equal to the unsharded step, but the dense weight exists on every rank during the step."""
    out, sharded = [], {}
    for p in params:
        if not is_dtensor(p) or (keep is not None and keep(p)):
            out.append(p)
            continue
        full = p.full_tensor().detach().clone()
        full.grad = p.grad.full_tensor()
        if p in optimizer.state:
            optimizer.state[full] = optimizer.state.pop(p)
        sharded[id(full)] = (p, full)
        out.append(full)
    return out, sharded


def scatter(optimizer: Any, sharded: dict) -> None:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p, full in sharded.values():
        if full in optimizer.state:
            optimizer.state[p] = optimizer.state.pop(full)
        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local.shape):
            raise RuntimeError(f"shard of shape {tuple(local.shape)} does not match the computed "
                               f"{tuple(shape)} for placements {p.placements}")
        local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
