"""Crash-safe checkpoints of a model and its optimizer.

``save_checkpoint(path, model, optimizer, step=...)`` writes atomically: the bytes go to a temporary file
in the same folder, are fsynced, and replace ``path`` with ``os.replace`` (then the folder is fsynced), so
a process killed at any moment leaves either the previous checkpoint or the new one, never a mixture.
The file carries a header with its payload's length and SHA-256: ``load_checkpoint`` refuses a truncated
or corrupted file with ValueError before touching the model or the optimizer, and checks the model's keys
and shapes before loading anything, so a checkpoint is loaded whole or not at all. The payload is read
with ``torch.load(..., weights_only=True)``, so ``save_checkpoint`` refuses, before it writes anything, a value
that such a load would refuse (an ``extra`` entry, or a module's ``get_extra_state``, that is not made of tensors,
numbers, strings, bytes, None, dtypes, devices, sizes, lists, tuples, sets and dicts of them).
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint"]

MAGIC = b"GEOMOPT-CKPT-1\n"
_HEADER = struct.Struct("<Q32s")  # payload length, sha256


_PLAIN = (torch.Tensor, int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_loadable(value: Any, where: str) -> None:
    """Raise TypeError naming ``where`` when ``torch.load(weights_only=True)`` could not load ``value``."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_loadable(k, f"{where} (a key)")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple, set)) and type(value) in (list, tuple, set):
        for i, v in enumerate(value):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
                    "torch.load(weights_only=True) cannot load: save tensors, numbers, strings, bytes, None, dtypes, "
                    "devices, sizes, and lists, tuples, sets and dicts of them")


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None, *, step: int = 0,
                    extra: dict[str, Any] | None = None) -> None:
    """Write model and optimizer state (and ``step``, ``extra``: tensors, numbers, strings, ...) to ``path``; a value
    that ``load_checkpoint`` could not read back is refused with TypeError before anything is written."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {step!r}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    payload = {"model": model.state_dict(), "step": step, "extra": extra or {}}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    for key in payload:
        _check_loadable(payload[key], key if key != "model" else "the model's state_dict")
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(_HEADER.pack(len(data), hashlib.sha256(data).digest()))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The verified payload of a checkpoint (ValueError if it is truncated, corrupted or not one)."""
    raw = Path(path).read_bytes()
    head = len(MAGIC) + _HEADER.size
    if not raw.startswith(MAGIC):
        raise ValueError(f"{path} is not a geomopt checkpoint (no {MAGIC!r} header)")
    if len(raw) < head:
        raise ValueError(f"checkpoint {path} is truncated: {len(raw)} bytes, shorter than its header")
    length, digest = _HEADER.unpack(raw[len(MAGIC):head])
    data = raw[head:]
    if len(data) != length:
        raise ValueError(f"checkpoint {path} is truncated or padded: the header says {length} bytes of payload, "
                         f"the file holds {len(data)}")
    if hashlib.sha256(data).digest() != digest:
        raise ValueError(f"checkpoint {path} is corrupted: its SHA-256 does not match the header")
    return torch.load(io.BytesIO(data), weights_only=True)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None) -> dict[str, Any]:
    """Load ``path`` into ``model`` (and ``optimizer``); returns the payload (``step``, ``extra``)."""
    payload = read_checkpoint(path)
    state = payload["model"]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    for key, value in state.items():  # a module's extra state (get_extra_state) need not be a tensor
        if isinstance(value, torch.Tensor) != isinstance(own[key], torch.Tensor):
            raise ValueError(f"checkpoint {path}: {key} holds a {type(value).__name__}, the model's is a "
                             f"{type(own[key]).__name__}")
        if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"checkpoint {path}: {key} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(own[key].shape)}")
    if optimizer is not None:
        if "optimizer" not in payload:
            raise ValueError(f"checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict(payload["optimizer"])  # geomopt optimizers validate before changing anything
    model.load_state_dict(state)
    return payload
