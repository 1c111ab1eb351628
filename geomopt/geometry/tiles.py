"""POET's two passes over the weights, on tiles cut through permuted index blocks: torch references of the fused
kernels ``geomopt.kernels.tile_grads`` and ``geomopt.kernels.tile_rewrite``.

A side of a weight (rows or columns) is cut by its permutation into index blocks (``blocks.block_layout``). For the
tile passes a side is described by a ``TileSide``: per weight its ``order`` (the indices of its blocks, in order,
then the indices no block holds), the block classes cut from the front of ``order`` (``(n_blocks, b)``: the full
blocks and a ragged one), and where each block's b x b matrix lives in a flat buffer of the step (``offsets``).
Weights of one shape and block layout stepped together share one ``TileLayout``; only their ``order`` differs.

- ``tile_grads``: per block, the gradient of the row factor G[s_k] W[s_k]^T and of the column factor
  W[:, t_k]^T G[:, t_k], written into the flat buffer; per weight, whether its gradient is finite; with a
  ``probe``, the row checksums of W (``row_checksums``). One read of G and W gives all of it.
- ``tile_rewrite``: W[s_k, t_l] <- D_k X[s_k, t_l] E_l for every tile (X = W0 in paper mode, X = W itself in lean
  mode, plus what its last rounding dropped), indices outside every block taking the identity; returns a function
  that writes (prepared first, so the write allocates nothing) and the row checksums of what it writes.

The row checksum of a weight is, per row i, sum_j bits(W[i, j]) * probe[j] mod 2^32 (bits: the entry's bit
pattern as 32-bit words, a 16-bit entry sign-extended; probe: odd numbers): any change of one entry changes it,
and it does not depend on the order of the sum, so a kernel that visits the tiles in any order gets it to the bit.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..tensor_cache import tensor_cache
from .blocks import col_block_grad, rotate_cols_, rotate_rows_, row_block_grad
from .rounding import add_dropped_, split_rounding

__all__ = ["TileSide", "TileLayout", "tile_layout", "tile_for", "tile_grads", "tile_rewrite", "row_checksums",
           "checksum_probe", "checksum_words", "MAX_TILE"]

#: the largest tile side a kernel program holds; blocks beyond it take several tiles
MAX_TILE = 64
_MASK32 = 0xFFFFFFFF


def tile_for(b: int) -> int:
    """The side of the tiles that hold blocks of up to ``b`` indices: a power of two in [16, ``MAX_TILE``] (``tl.dot``
    takes 16 and up). Indices no block holds are visited in chunks of this many."""
    return min(MAX_TILE, max(16, 1 << max(0, int(b) - 1).bit_length()))


class TileSide(NamedTuple):
    """One side of the weights of a ``TileLayout``: ``order`` (L, d) long, per weight its blocks' indices then the
    uncovered ones; ``classes`` ((n_blocks, b), ...) cut from the front of ``order``; ``offsets`` per weight and class
    the element offset in the step's flat buffer of the class's first b x b matrix (a class's matrices follow each
    other), and the same as an (L, 2) long table on the device (``offset_table``, zero padded); ``segments`` (S, 4)
    int32 on the device, per segment of ``order`` (the blocks, then the uncovered indices in chunks of the layout's
    tile): start, length, class (-1: uncovered) and index within its class."""
    order: torch.Tensor
    classes: tuple[tuple[int, int], ...]
    offsets: tuple[tuple[int, ...], ...]
    offset_table: torch.Tensor
    segments: torch.Tensor

    @property
    def blocks(self) -> int:
        return sum(nb for nb, _ in self.classes)

    @property
    def blocks_end(self) -> int:
        """Where the indices no block holds start in ``order``."""
        return sum(nb * b for nb, b in self.classes)

    @property
    def max_block(self) -> int:
        return max((b for _, b in self.classes), default=0)

    def regions(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The parts of ``flat`` (the step's buffer) that hold this side's matrices, per weight and class (views)."""
        return [flat[off: off + nb * b * b] for offs in self.offsets for off, (nb, b) in zip(offs, self.classes)]

    def index_blocks(self, w: int) -> list[tuple[torch.Tensor, int]]:
        """Weight ``w``'s index blocks per class, as ((n_blocks, b) long, offset of the class's first matrix)."""
        out, start = [], 0
        for (nb, b), off in zip(self.classes, self.offsets[w]):
            out.append((self.order[w, start: start + nb * b].view(nb, b), off))
            start += nb * b
        return out


class TileLayout(NamedTuple):
    """The tile layout of L weights of one shape (m, n) and block layout; ``tile``: ``tile_for`` its largest block;
    ``grad_segments``: the row segments, then the column blocks (the programs of ``tile_grads``), on the device."""
    rows: TileSide
    cols: TileSide
    shape: tuple[int, int]
    tile: int
    grad_segments: torch.Tensor

    @property
    def weights(self) -> int:
        return self.rows.order.shape[0]


def tile_layout(rows: list[list[torch.Tensor]], cols: list[list[torch.Tensor]], shape: tuple[int, int],
                row_offsets: list[list[int]], col_offsets: list[list[int]]) -> TileLayout:
    """The ``TileLayout`` of L weights of ``shape`` from their index blocks (per weight, per side, its (n_blocks, b)
    tensors, the same shapes for every weight) and, per weight, side and class, the offset of the class's first
    matrix in the step's flat buffer."""
    tile = tile_for(max([i.shape[1] for w in rows + cols for i in w] + [2]))
    r, c = _side(rows, shape[0], row_offsets, tile), _side(cols, shape[1], col_offsets, tile)
    return TileLayout(r, c, tuple(shape), tile, torch.cat([r.segments, c.segments[: c.blocks]]))


def _side(blocks: list[list[torch.Tensor]], dim: int, offsets: list[list[int]], chunk: int) -> TileSide:
    device = blocks[0][0].device if blocks and blocks[0] else torch.device("cpu")
    orders = []
    for wb in blocks:
        held = torch.cat([i.reshape(-1) for i in wb]) if wb else torch.zeros(0, dtype=torch.long, device=device)
        if held.numel() == dim:
            orders.append(held)
            continue
        free = torch.ones(dim, dtype=torch.int8, device=device)
        free[held] = 0  # the indices in no block, in increasing order, without reading their number on the host
        orders.append(torch.cat([held, torch.argsort(free, descending=True, stable=True)[: dim - held.numel()]]))
    classes = tuple((i.shape[0], i.shape[1]) for i in blocks[0]) if blocks else ()
    offs = tuple(tuple(int(o) for o in w) for w in offsets)
    table = torch.tensor([list(o) + [0] * (2 - len(o)) for o in offs], dtype=torch.long, device=device)
    return TileSide(torch.stack(orders).long(), classes, offs, table.view(len(blocks), 2),
                    _segments(classes, dim, device, chunk))


def _segments(classes: tuple[tuple[int, int], ...], dim: int, device: torch.device, chunk: int) -> torch.Tensor:
    rows, start = [], 0
    for c, (nb, b) in enumerate(classes):
        rows += [(start + j * b, b, c, j) for j in range(nb)]
        start += nb * b
    rows += [(s, min(chunk, dim - s), -1, 0) for s in range(start, dim, chunk)]
    return torch.tensor(rows, dtype=torch.int32, device=device).view(-1, 4)


@tensor_cache
def _probe(words: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0xC0FFEE + words)
    return torch.randint(0, 2**30, (words,), generator=g, dtype=torch.int64).mul_(2).add_(1).to(torch.int32,
                                                                                                 ).to(device)


def checksum_words(dtype: torch.dtype) -> int:
    """32-bit words per entry in the checksum: 1 for 16- and 32-bit entries, 2 for 64-bit ones."""
    return 2 if dtype.itemsize == 8 else 1


def checksum_probe(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The odd int32 multipliers of a row of ``n`` entries of ``dtype`` (fixed per length)."""
    return _probe(n * checksum_words(dtype), torch.device(device))


def row_checksums(w: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """(m,) int32: the row checksums of 2-D ``w`` (see the module docstring), computed exactly in int64 (a chunk of
    rows at a time)."""
    if w.element_size() == 2:
        bits = w.view(torch.int16)
    else:
        bits = w.reshape(w.shape[0], -1).contiguous().view(torch.int32)
    p = probe.to(torch.int64)
    out = torch.empty(w.shape[0], dtype=torch.int64, device=w.device)
    step = max(1, (1 << 22) // max(1, bits.shape[1]))
    for s in range(0, w.shape[0], step):
        prod = bits[s: s + step].to(torch.int64).mul_(p).bitwise_and_(_MASK32)
        out[s: s + step] = prod.sum(1).bitwise_and_(_MASK32)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def tile_grads(gs: list[torch.Tensor], ws: list[torch.Tensor], layout: TileLayout, out: torch.Tensor,
               verdict: torch.Tensor, probe: torch.Tensor | None = None,
               expected: list[torch.Tensor | None] | None = None) -> torch.Tensor | None:
    """Block gradients of every weight into ``out`` (flat, the factor dtype; see ``TileSide.offsets``): rows
    G[s_k] W[s_k]^T, columns W[:, t_k]^T G[:, t_k], products in ``out``'s dtype. ``verdict`` (2, L) fp32 (the
    caller's, zero where nothing is found): row 0 set to 1 where a weight's gradient holds a non-finite entry, row 1
    where ``expected[i]`` is given (a weight's last recorded row checksums) and its row checksums differ from it.
    Returns the row checksums (L, m) int32 of the weights with ``probe``, else None."""
    sums = []
    for w, (g, x) in enumerate(zip(gs, ws)):
        g, x = g.to(out.dtype), x.to(out.dtype)
        for idx, off in layout.rows.index_blocks(w):
            _matrices(out, off, idx).copy_(row_block_grad(g, x, idx))
        for idx, off in layout.cols.index_blocks(w):
            _matrices(out, off, idx).copy_(col_block_grad(x, g, idx))
        _mark(verdict[0, w], ~torch.isfinite(gs[w]).all())
        if probe is not None:
            sums.append(row_checksums(ws[w], probe))
            if expected is not None and expected[w] is not None:
                _mark(verdict[1, w], (sums[-1] != expected[w].to(sums[-1].device)).any())
    return torch.stack(sums) if probe is not None else None


def _mark(flag: torch.Tensor, found: torch.Tensor) -> None:
    """Set the 0-d ``flag`` to 1 where ``found`` (a 0-d bool), on the device (no host read)."""
    flag.copy_(torch.maximum(flag, found.to(flag.dtype)))


def _matrices(flat: torch.Tensor, off: int, idx: torch.Tensor) -> torch.Tensor:
    """The (n_blocks, b, b) matrices of index blocks ``idx`` in the flat buffer, from ``off`` on (a view)."""
    nb, b = idx.shape
    return flat[off: off + nb * b * b].view(nb, b, b)


def _rotated(x: torch.Tensor, layout: TileLayout, w: int, mats: torch.Tensor) -> torch.Tensor:
    """R X P of weight ``w``, in place on ``x`` (the factor dtype, a tensor of the caller's)."""
    for idx, off in layout.rows.index_blocks(w):
        rotate_rows_(x, idx, _matrices(mats, off, idx))
    for idx, off in layout.cols.index_blocks(w):
        rotate_cols_(x, idx, _matrices(mats, off, idx))
    return x


def check_keeps(xs: list[torch.Tensor], srcs: list[torch.Tensor], keeps: list[torch.Tensor | None]) -> None:
    """A new W0 (``keeps``) belongs to paper mode: a weight rewritten from itself (lean mode) has none."""
    if any(k is not None and s is x for x, s, k in zip(xs, srcs, keeps)):
        raise ValueError("keeps: a weight rewritten from itself (lean mode) keeps no W0")


def _source(src: torch.Tensor, codes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A new ``dtype`` copy of the rewrite's source, plus what the codes say its last rounding dropped."""
    x = src.to(dtype, copy=True)
    return x if codes is None else add_dropped_(x, codes, src.dtype)


def tile_rewrite(xs: list[torch.Tensor], srcs: list[torch.Tensor], comps: list[torch.Tensor] | None,
                 keeps: list[torch.Tensor | None], layout: TileLayout, mats: torch.Tensor, take: list[bool],
                 probe: torch.Tensor | None = None) -> tuple[Callable[[], None], torch.Tensor | None]:
    """The rewrite of the weights ``xs`` where ``take``: R X P with X = ``srcs[i]`` (W0 in paper mode, the weight
    itself in lean mode) plus ``comps[i]`` (lean mode's rounding buffers, updated with what the new rounding drops),
    the blocks' matrices (``mats``'s dtype, the factor dtype) at ``layout``'s offsets. ``keeps[i]``, where given,
    receives the new weight in the factor dtype (paper mode's new W0 at a merge; lean mode has none); lean mode
    leaves the tiles that no block touches as they are. Returns (a function that writes everything in place and
    allocates nothing, the row checksums (L, m) int32 of the new weights where ``probe`` is given (those not taken:
    zeros), else None)."""
    check_keeps(xs, srcs, keeps)
    new = [_rotated(_source(s, c, mats.dtype), layout, w, mats) if t else None
           for w, (s, c, t) in enumerate(zip(srcs, comps or [None] * len(xs), take))]
    low = [None if y is None else y.to(x.dtype) for y, x in zip(new, xs)]
    dropped = None
    if comps:
        dropped = [None if y is None else split_rounding(y, x.dtype)[1] for y, x in zip(new, xs)]
    for w, (x, s, y) in enumerate(zip(xs, srcs, low)):  # lean mode leaves the tiles no block touches as they are
        rows, cols = layout.rows.order[w, layout.rows.blocks_end:], layout.cols.order[w, layout.cols.blocks_end:]
        if s is x and y is not None and rows.numel() and cols.numel():
            y[rows[:, None], cols] = x[rows[:, None], cols]
            if dropped is not None:
                dropped[w][rows[:, None], cols] = comps[w][rows[:, None], cols]
    sums = None
    if probe is not None:
        sums = torch.stack([row_checksums(v, probe) if v is not None else
                            torch.zeros(x.shape[0], dtype=torch.int32, device=x.device) for v, x in zip(low, xs)])

    def write() -> None:
        for i, x in enumerate(xs):
            if low[i] is None:
                continue
            x.copy_(low[i])
            if dropped is not None:
                comps[i].copy_(dropped[i])
            if keeps[i] is not None:
                keeps[i].copy_(new[i])

    return write, sums
