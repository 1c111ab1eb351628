"""Batching the small per-block work of many weights into a few large tensor operations.

A factor optimizer's state is kept per weight (one packed tensor per side and block size), which is what
checkpoints and FSDP2 need; but stepping each of those tensors alone costs a few dozen tiny operations per
weight, and on a model of many small weights that dispatch overhead, not the arithmetic, was the step's time.
``ByKey`` concatenates the tensors that share a key (side, block size, dtype, device) along dim 0, so that the
Cayley maps, their inverses and backward, and the safeguard's norm bounds run once per key, and splits the
results back into per-weight views. ``chunks`` bounds how much of that is alive at once.
"""
from __future__ import annotations

from typing import Any, Hashable, Iterable, Iterator, Sequence

import torch

__all__ = ["ByKey", "chunks", "key_runs", "dense_stack", "BATCH_ELEMENTS", "DENSE_ELEMENTS"]

#: elements of one rotation-shaped batch (all blocks of the weights stepped together, b x b each): 4M, 16 MB in
#: fp32. The step keeps a few such tensors alive (old and new rotations, inverses, gradients), so this bounds its
#: temporary memory whatever the model's size; small models fit in one batch.
BATCH_ELEMENTS = 1 << 22

#: elements of the weights one grouped step stacks (``foreach``): 32M, 128 MB in fp32. The stacked gradients,
#: weights and their gathered blocks are a few such tensors; a weight larger than this is a run of its own.
DENSE_ELEMENTS = 1 << 25


def chunks(items: Sequence[Any], sizes: Iterable[Any], budget: Any = None) -> Iterator[list[Any]]:
    """Consecutive runs of ``items`` whose ``sizes`` sum to at most ``budget`` (default ``BATCH_ELEMENTS``; an item
    larger than the budget is a run of its own); the order is kept. Sizes and budget may be tuples: a run then
    keeps within every component."""
    budget = BATCH_ELEMENTS if budget is None else budget
    limits = budget if isinstance(budget, tuple) else (budget,)
    run: list[Any] = []
    total = [0] * len(limits)
    for item, size in zip(items, sizes):
        size = size if isinstance(size, tuple) else (size,)
        if run and any(t + s > limit for t, s, limit in zip(total, size, limits)):
            yield run
            run, total = [], [0] * len(limits)
        run.append(item)
        total = [t + s for t, s in zip(total, size)]
    if run:
        yield run


def key_runs(keys: Sequence[Hashable], sizes: Sequence[int], together: bool) -> list[list[int]]:
    """Positions 0..len(keys)-1 in runs stepped together: with ``together``, those of one key (in the order the
    keys first appear), each run up to ``DENSE_ELEMENTS`` of ``sizes``; else one position per run."""
    if not together:
        return [[i] for i in range(len(keys))]
    by_key: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    return [run for ix in by_key.values() for run in chunks(ix, [sizes[i] for i in ix], DENSE_ELEMENTS)]


def dense_stack(ts: Sequence[torch.Tensor], dtype: torch.dtype, private: bool = False) -> torch.Tensor:
    """L tensors of one shape as one (L, *shape) tensor of ``dtype``. A lone tensor already of the dtype is a view
    of it unless ``private`` (then a copy: the caller writes into it)."""
    if len(ts) == 1:
        return ts[0].to(dtype, copy=private).unsqueeze(0)
    if all(t.dtype == dtype for t in ts):
        return torch.stack(list(ts))
    out = ts[0].new_empty((len(ts), *ts[0].shape), dtype=dtype)
    torch._foreach_copy_(list(out.unbind(0)), list(ts))
    return out


class ByKey:
    """Entries (tensors with a leading block dimension) grouped by key: ``cat`` gives one tensor per key, in the
    order the keys first appear; ``split`` takes such a dict back to one tensor (a view) per entry."""

    def __init__(self, keys: Sequence[Hashable], counts: Sequence[int]):
        if len(keys) != len(counts):
            raise ValueError(f"keys and counts must have the same length, got {len(keys)} and {len(counts)}")
        self.keys = list(keys)
        self.counts = list(counts)
        self.groups: dict[Hashable, list[int]] = {}
        for i, k in enumerate(self.keys):
            self.groups.setdefault(k, []).append(i)

    def cat(self, entries: Sequence[torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """One tensor per key: its entries concatenated along dim 0 (a lone entry is returned as it is)."""
        return {k: entries[ix[0]] if len(ix) == 1 else torch.cat([entries[i] for i in ix])
                for k, ix in self.groups.items()}

    def split(self, cats: dict[Hashable, torch.Tensor]) -> list[torch.Tensor]:
        """The inverse of ``cat``: one view per entry, in entry order."""
        out: list[Any] = [None] * len(self.keys)
        for k, ix in self.groups.items():
            for i, part in zip(ix, cats[k].split([self.counts[i] for i in ix])):
                out[i] = part
        return out

    def starts(self) -> list[int]:
        """Per entry, the row of its key's ``cat`` where it starts."""
        out = [0] * len(self.keys)
        for ix in self.groups.values():
            start = 0
            for i in ix:
                out[i], start = start, start + self.counts[i]
        return out

    def owners(self, entry_owner: Sequence[int], device: torch.device | None = None) -> dict[Hashable, torch.Tensor]:
        """Per key, the owner (``entry_owner[i]``: e.g. the weight's position) of every block of the cat (made on
        the host and copied: no device value is read)."""
        return {k: torch.tensor([entry_owner[i] for i in ix for _ in range(self.counts[i])], dtype=torch.long,
                                device=device) for k, ix in self.groups.items()}
