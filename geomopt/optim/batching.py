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

__all__ = ["ByKey", "chunks", "BATCH_ELEMENTS"]

#: elements of one rotation-shaped batch (all blocks of the weights stepped together, b x b each): 4M, 16 MB in
#: fp32. The step keeps a few such tensors alive (old and new rotations, inverses, gradients), so this bounds its
#: temporary memory whatever the model's size; small models fit in one batch.
BATCH_ELEMENTS = 1 << 22


def chunks(items: Sequence[Any], sizes: Iterable[int], budget: int | None = None) -> Iterator[list[Any]]:
    """Consecutive runs of ``items`` whose ``sizes`` sum to at most ``budget`` (default ``BATCH_ELEMENTS``; an item
    larger than the budget is a run of its own); the order is kept."""
    budget = BATCH_ELEMENTS if budget is None else budget
    run: list[Any] = []
    total = 0
    for item, size in zip(items, sizes):
        if run and total + size > budget:
            yield run
            run, total = [], 0
        run.append(item)
        total += size
    if run:
        yield run


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

    def owners(self, entry_owner: Sequence[int], device: torch.device | None = None) -> dict[Hashable, torch.Tensor]:
        """Per key, the owner (``entry_owner[i]``: e.g. the weight's position) of every block of the cat."""
        return {k: torch.repeat_interleave(torch.tensor([entry_owner[i] for i in ix], device=device),
                                           torch.tensor([self.counts[i] for i in ix], device=device))
                for k, ix in self.groups.items()}
