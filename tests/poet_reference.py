"""A module-based POET written independently of geomopt's block code: dense R and P built from the
blocks, W = R(Q) W0 P(Q) through autograd, merges done by hand. Used as the reference in tests."""
import torch
from torch import nn


def skew(q, b):
    r, c = torch.triu_indices(b, b, 1)
    Q = q.new_zeros(q.shape[0], b, b)
    Q[:, r, c] = q
    return Q - Q.transpose(1, 2)


def rotation(q, b, terms):
    """``terms``: None (exact Cayley), k (the paper's Cayley-Neumann polynomial) or a function of the skew blocks."""
    Q = skew(q, b)
    eye = torch.eye(b, dtype=q.dtype).expand_as(Q)
    if callable(terms):
        return terms(Q)
    if terms is None:
        return torch.linalg.inv(eye - Q) @ (eye + Q)
    series = sum(torch.linalg.matrix_power(Q, j) for j in range(terms + 1))
    return (eye + Q) @ series


def index_blocks(perm, b, fs):
    d = perm.numel()
    b = min(b, d)
    if fs:
        return [perm[:b].view(1, b)]
    out = [perm[: d // b * b].view(d // b, b)]
    if d % b >= 2:
        out.append(perm[d // b * b:].view(1, d % b))
    return out


class RefPOETLinear(nn.Module):
    def __init__(self, w0, perm_row, perm_col, block, fs, terms):
        super().__init__()
        self.block, self.fs, self.terms = block, fs, terms
        self.reset(w0, perm_row, perm_col)

    def reset(self, w0, perm_row, perm_col):
        self.w0 = w0.detach().clone()
        m, n = w0.shape
        brow, bcol = self.block if isinstance(self.block, tuple) else (self.block, self.block)
        self.rows = index_blocks(perm_row, brow, self.fs)
        self.cols = index_blocks(perm_col, bcol, self.fs)
        self.q_row = nn.ParameterList(
            [nn.Parameter(torch.zeros(i.shape[0], i.shape[1] * (i.shape[1] - 1) // 2)) for i in self.rows])
        self.q_col = nn.ParameterList(
            [nn.Parameter(torch.zeros(i.shape[0], i.shape[1] * (i.shape[1] - 1) // 2)) for i in self.cols])

    def dense(self, dim, blocks, qs, terms):
        R = torch.eye(dim, dtype=self.w0.dtype)
        for idx, q in zip(blocks, qs):
            D = rotation(q, idx.shape[1], terms)
            for k in range(idx.shape[0]):
                R = R.index_put((idx[k][:, None], idx[k][None, :]), D[k])
        return R

    def weight(self, exact=False):
        """R W0 P through the reference's map, or (``exact``) through the exact Cayley map."""
        m, n = self.w0.shape
        terms = None if exact else self.terms
        return self.dense(m, self.rows, self.q_row, terms) @ self.w0 @ self.dense(n, self.cols, self.q_col, terms)
