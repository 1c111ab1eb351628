"""The embedded corpus: byte-level tokens from the interpreter's own standard-library sources.

Every Python install carries these files, so the benchmark needs no download. Files are read in
sorted order; a file goes to validation when crc32 of its relative path is 0 mod 20 (about 5%),
so the split is the same on every run of the same Python version.
"""
from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

__all__ = ["stdlib_files", "load_corpus", "sample_batch", "eval_windows"]


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by relative path (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(max_bytes: int = 8_000_000, text_file: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) uint8 tensors of at most ``max_bytes`` bytes in all.

    With ``text_file``, that file's bytes are used instead: the last 5% is validation.
    """
    if not isinstance(max_bytes, int) or max_bytes < 1024:
        raise ValueError(f"max_bytes must be an int >= 1024, got {max_bytes!r}")
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise ValueError(f"text_file {str(path)!r} is not a readable file")
        data = path.read_bytes()[:max_bytes]
        if len(data) < 2048:
            raise ValueError(f"text_file {str(path)!r} has {len(data)} bytes; at least 2048 are needed")
        cut = len(data) - max(1024, len(data) // 20)
        return _as_tensor(data[:cut]), _as_tensor(data[cut:])
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, total = [], [], 0
    for path in stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        rel = path.relative_to(root).as_posix()
        (val if zlib.crc32(rel.encode()) % 20 == 0 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    train_b, val_b = b"".join(train), b"".join(val)
    if len(val_b) < max(1024, total // 40):  # a small budget: the tail of train becomes validation
        cut = len(train_b) - max(1024, len(train_b) // 20)
        train_b, val_b = train_b[:cut], train_b[cut:] + val_b
    return _as_tensor(train_b), _as_tensor(val_b)


def _as_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def sample_batch(tokens: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, seq_len + 1) long tensor of random windows of ``tokens``."""
    if tokens.numel() <= seq_len + 1:
        raise ValueError(f"corpus of {tokens.numel()} tokens is too short for seq_len={seq_len}")
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=generator)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()


def eval_windows(tokens: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """(count, seq_len + 1) evenly spaced validation windows: the same on every call."""
    span = tokens.numel() - seq_len - 1
    if span <= 0:
        raise ValueError(f"validation split of {tokens.numel()} tokens is too short for seq_len={seq_len}")
    starts = torch.linspace(0, span, count).long()
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
