"""Block-diagonal rotations on permuted index blocks (POET's R and P), torch reference.

Torch convention: a weight W is (m x n) = (out x in). R in SO(m) acts on rows, P in SO(n) on
columns. A side of dimension ``d`` is cut by a permutation ``perm`` of range(d) into index blocks:
``block_layout`` returns a list of (n_blocks, b) index tensors (at most two: the full blocks and one
ragged remainder), and the rotation applies one b x b block per row of that tensor. Indices outside
every block (the fully stochastic mode, or a remainder of size 1) are left unchanged.

Weights of one shape stepped together are stacked into one (L, m, n) tensor, with their index blocks stacked
into (L, n_blocks, b): the row operations run on the (L * m, n) view with ``stacked_rows``' offset indices, the
column ones through ``col_block_grads`` and ``rotate_cols_stacked_`` (a gather and a scatter along the last dim).
"""
from __future__ import annotations

import torch

__all__ = ["block_sizes", "block_layout", "rotate_rows", "rotate_cols", "rotate_rows_", "rotate_cols_",
           "rotation_buffers", "row_block_grad", "col_block_grad", "stacked_rows", "col_block_grads",
           "rotate_cols_stacked_"]


def block_sizes(dim: int, block: int, fully_stochastic: bool) -> list[tuple[int, int]]:
    """[(n_blocks, b), ...] for a side of size ``dim``: blocks of size ``block`` (clamped to ``dim``).

    Block-stochastic: dim // b full blocks plus one ragged block of dim % b (dropped when it is < 2:
    a 1 x 1 rotation is the identity). Fully stochastic: a single block of size b.
    """
    b = min(block, dim)
    if b < 2:
        return []
    if fully_stochastic:
        return [(1, b)]
    out = [(dim // b, b)]
    rem = dim % b
    if rem >= 2:
        out.append((1, rem))
    return out


def block_layout(perm: torch.Tensor, block: int, fully_stochastic: bool) -> list[torch.Tensor]:
    """Index blocks cut from ``perm`` in order: a list of (n_blocks, b) long tensors."""
    out, start = [], 0
    for nblk, b in block_sizes(perm.numel(), block, fully_stochastic):
        out.append(perm[start : start + nblk * b].view(nblk, b))
        start += nblk * b
    return out


def rotate_rows(x: torch.Tensor, idx: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Y = R X: rows ``idx[k]`` of x replaced by ``d[k] @ x[idx[k]]``; other rows copied. Out of place."""
    return rotate_rows_(x.clone(), idx, d)


def rotate_cols(x: torch.Tensor, idx: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Y = X P: columns ``idx[k]`` of x replaced by ``x[:, idx[k]] @ e[k]``; other columns copied."""
    return rotate_cols_(x.clone(), idx, e)


def rotation_buffers(x: torch.Tensor, idx: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two work tensors ``rotate_rows_`` / ``rotate_cols_`` need for ``idx`` on ``x`` (gathered blocks and their
    products): allocated up front, they make the in-place rotations allocation-free."""
    length = x.shape[1] if rows else x.shape[0]
    shape = (idx.numel(), length) if rows else (length, idx.numel())
    return x.new_empty(shape), x.new_empty(shape)


def rotate_rows_(x: torch.Tensor, idx: torch.Tensor, d: torch.Tensor, src: torch.Tensor | None = None,
                 buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``rotate_rows`` in place (x is returned): the rows are gathered before any is written. With ``src``, rows
    ``idx[k]`` of x become ``d[k] @ src[idx[k]]`` and the other rows of x are left as they are. With ``buffers``
    (``rotation_buffers``) nothing is allocated."""
    flat = idx.reshape(-1)
    src = x if src is None else src
    if buffers is None:  # differentiable (the references are checked against autograd)
        return x.index_copy_(0, flat, torch.bmm(d, src.index_select(0, flat).view(*idx.shape, -1)).view(flat.numel(),
                                                                                                      -1))
    gathered, out = buffers
    torch.index_select(src, 0, flat, out=gathered)
    torch.bmm(d, gathered.view(*idx.shape, -1), out=out.view(*idx.shape, -1))
    return x.index_copy_(0, flat, out)


def rotate_cols_(x: torch.Tensor, idx: torch.Tensor, e: torch.Tensor,
                 buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``rotate_cols`` in place (x is returned); with ``buffers`` nothing is allocated."""
    flat = idx.reshape(-1)
    rows = x.shape[0]
    if buffers is None:  # differentiable
        blocks = x.index_select(1, flat).view(rows, *idx.shape).transpose(0, 1)  # (n_blocks, m, b)
        return x.index_copy_(1, flat, torch.bmm(blocks, e).transpose(0, 1).reshape(rows, flat.numel()))
    gathered, out = buffers
    torch.index_select(x, 1, flat, out=gathered)
    blocks = gathered.view(rows, *idx.shape).transpose(0, 1)  # (n_blocks, m, b)
    torch.bmm(blocks, e, out=out.view(rows, *idx.shape).transpose(0, 1))
    return x.index_copy_(1, flat, out)


def row_block_grad(g: torch.Tensor, m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(n_blocks, b, b) blocks ``g[idx[k]] @ m[idx[k]]^T`` (dL/dD_k for W = R M)."""
    flat = idx.reshape(-1)
    return torch.bmm(g.index_select(0, flat).view(*idx.shape, -1), m.index_select(0, flat).view(*idx.shape, -1).mT)


def col_block_grad(n: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(n_blocks, b, b) blocks ``n[:, idx[k]]^T @ g[:, idx[k]]`` (dL/dE_k for W = N P)."""
    flat = idx.reshape(-1)
    rows = n.shape[0]
    return torch.bmm(n.index_select(1, flat).view(rows, *idx.shape).permute(1, 2, 0),
                     g.index_select(1, flat).view(rows, *idx.shape).transpose(0, 1))


def stacked_rows(idx: torch.Tensor, rows: int) -> torch.Tensor:
    """(L * n_blocks, b) row indices into the (L * rows, n) view of L stacked weights, from their (L, n_blocks, b)
    row blocks."""
    offsets = torch.arange(idx.shape[0], device=idx.device).mul_(rows).view(-1, 1, 1)
    return (idx + offsets).reshape(-1, idx.shape[-1])


def _col_index(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``idx`` (L, n_blocks, b) as a gather / scatter index along the last dim of x (L, m, n): (L, m, n_blocks * b),
    expanded (no copy)."""
    return idx.reshape(idx.shape[0], 1, -1).expand(-1, x.shape[1], -1)


def col_block_grads(n: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``col_block_grad`` of L stacked weights: n, g (L, m, n_cols), idx (L, n_blocks, b) -> (L * n_blocks, b, b),
    weight by weight."""
    lead, rows = n.shape[:2]
    nb, b = idx.shape[1:]
    ix = _col_index(n, idx)
    left = n.gather(2, ix).view(lead, rows, nb, b).permute(0, 2, 3, 1)  # (L, n_blocks, b, m)
    right = g.gather(2, ix).view(lead, rows, nb, b).transpose(1, 2)  # (L, n_blocks, m, b)
    return torch.matmul(left, right).reshape(lead * nb, b, b)


def rotate_cols_stacked_(x: torch.Tensor, idx: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``rotate_cols_`` of L stacked weights, in place on x (L, m, n): columns ``idx[l, k]`` of x[l] become
    ``x[l][:, idx[l, k]] @ e[l * n_blocks + k]`` (the columns are gathered before any is written)."""
    lead, rows = x.shape[:2]
    nb, b = idx.shape[1:]
    ix = _col_index(x, idx)
    blocks = x.gather(2, ix).view(lead, rows, nb, b).transpose(1, 2)  # (L, n_blocks, m, b)
    out = torch.matmul(blocks, e.view(lead, nb, b, b))
    return x.scatter_(2, ix, out.transpose(1, 2).reshape(lead, rows, nb * b))
