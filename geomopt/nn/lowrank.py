r"""``LowRankLinear``: a linear layer stored as W = U S V^T (U: out x r, S: r x r, V: in x r) that never forms W.

The forward is y = ((x V) S^T) U^T (+ bias): (m + n) r + r^2 multiply-adds per input row where ``nn.Linear`` takes
m n. The backward gives the input its gradient dy U S V^T, and gives the factors the gradients the fixed-rank
geometry needs (DLRT's K, S and L steps), from the activations and the output gradient, never the m x n gradient
G = dy^T x of W:

.. math:: \text{U.grad} = G V = dy^\top (x V),\qquad \text{S.grad} = U^\top G V = (dy\,U)^\top (x V),\qquad
          \text{V.grad} = G^\top U = x^\top (dy\,U)

So U.grad and V.grad are the gradients of K = U S and L = V S^T at the current factors, not the partial derivatives
of U and V (those are G V S^T and G^T U S): ``geomopt.DLRAMomentum`` steps such a layer on the manifold from them;
another optimizer would train K and L. All three are linear in dy, so gradient accumulation and data-parallel
averaging work as for ``nn.Linear``.
"""
from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["LowRankLinear", "lowrank_role", "lowrank_triples", "ROLES"]

ROLES = ("U", "S", "V")
_ROLES: dict[int, tuple[weakref.ref, str, int]] = {}  # id(factor) -> (weak reference to it, its role, its layer's id)


def lowrank_role(p: torch.Tensor) -> str | None:
    """``"U"``, ``"S"`` or ``"V"`` for a factor of a ``LowRankLinear`` (an optimizer asks, to step the three of a
    layer together), None for any other tensor."""
    entry = _ROLES.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


def lowrank_triples(params: list[torch.Tensor]) -> list[list[int]]:
    """The positions in ``params`` of each ``LowRankLinear``'s (U, S, V); ValueError when a layer's factors are not
    all there (an optimizer steps the three together)."""
    layers: dict[int, dict[str, int]] = {}
    for i, p in enumerate(params):
        entry = _ROLES.get(id(p))
        if entry is not None and entry[0]() is p:
            layers.setdefault(entry[2], {})[entry[1]] = i
    out = []
    for parts in layers.values():
        missing = [r for r in ROLES if r not in parts]
        if missing:
            have = params[next(iter(parts.values()))]
            raise ValueError(f"a LowRankLinear's factors go together: its {missing} are not in the group with its "
                             f"{sorted(parts)} (of shape {tuple(have.shape)}); pass all three, or the model")
        out.append([parts[r] for r in ROLES])
    return out


def _note_role(p: torch.Tensor, role: str, layer: int) -> None:
    key = id(p)

    def forget(ref: weakref.ref) -> None:  # only this entry: a new tensor may have taken the id since
        if _ROLES.get(key, (None,))[0] is ref:
            del _ROLES[key]

    _ROLES[key] = (weakref.ref(p, forget), role, layer)


class _Factored(torch.autograd.Function):
    """y = (x V) (U S)^T, with the factored gradients of the module docstring: two products with the activations in
    the forward, four in the backward (``nn.Linear``: one and two, each m n / ((m + n) r) times larger)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        xv = x @ v.to(x.dtype)
        ctx.save_for_backward(x, xv, u, s, v)
        return xv @ (u @ s).to(x.dtype).mT

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, xv, u, s, v = ctx.saved_tensors
        dt = torch.promote_types(dy.dtype, u.dtype)  # bf16 activations with fp32 factors: products in fp32
        dyu = dy.to(dt) @ u.to(dt)
        dx = (dyu @ (s @ v.mT).to(dt)).to(x.dtype) if ctx.needs_input_grad[0] else None
        rows_dy, rows_x = dy.reshape(-1, dy.shape[-1]).to(dt), x.reshape(-1, x.shape[-1]).to(dt)
        rows_xv, rows_dyu = xv.reshape(-1, xv.shape[-1]).to(dt), dyu.reshape(-1, dyu.shape[-1])
        gv = (rows_dy.mT @ rows_xv).to(u.dtype)  # G V
        utgv = (rows_dyu.mT @ rows_xv).to(s.dtype)  # U^T G V
        gtu = (rows_x.mT @ rows_dyu).to(v.dtype)  # G^T U
        return dx, gv, utgv, gtu


class LowRankLinear(nn.Module):
    r"""A linear layer of rank ``rank``: y = x W^T + b with W = U S V^T held as its factors (see the module
    docstring). ``U`` (out_features x rank) and ``V`` (in_features x rank) start orthonormal and ``S`` diagonal, as
    a truncated SVD gives them; ``geomopt.DLRAMomentum`` keeps them so and may change the rank in place (the forward
    follows the factors' shapes).

    Args:
        in_features, out_features: as ``nn.Linear``'s.
        rank: r, 1 <= r <= min(in_features, out_features).
        bias: whether the layer has a bias (``nn.Linear``'s).
        device, dtype: of the parameters.

    Example:
        >>> import torch, geomopt
        >>> layer = geomopt.nn.LowRankLinear.from_linear(torch.nn.Linear(64, 32), rank=8)
        >>> layer(torch.randn(4, 64)).shape
        torch.Size([4, 32])
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_rank(rank, out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        kw = dict(device=device, dtype=dtype)
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.S = nn.Parameter(torch.empty(rank, rank, **kw))
        self.V = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()
        self._register()

    def _register(self) -> None:
        for role in ROLES:
            _note_role(getattr(self, role), role, id(self))

    def __setattr__(self, name: str, value: Any) -> None:
        """A factor assigned anew is a factor too: ``layer.U = nn.Parameter(...)``, and FSDP2's ``fully_shard``,
        which swaps each Parameter for its sharded one (and back around each forward) through ``setattr`` on
        modules that define it."""
        super().__setattr__(name, value)
        if name in ROLES and isinstance(value, torch.Tensor):
            _note_role(value, name, id(self))

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling and ``copy.deepcopy``: the new factors are factors too."""
        super().__setstate__(state)
        self._register()

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def reset_parameters(self) -> None:
        """The factors of a weight drawn as ``nn.Linear`` draws its own (truncated to the rank), and its bias."""
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float64)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self._set_factors(w)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def _set_factors(self, w: torch.Tensor) -> None:
        """U, S, V of ``w``'s truncated SVD at the current rank (computed in float64)."""
        u, sigma, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
        r = self.rank
        for p, value in ((self.U, u[:, :r]), (self.S, torch.diag(sigma[:r])), (self.V, vh[:r].T)):
            p.copy_(value.to(p.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input of {x.shape[-1]} features, the layer takes {self.in_features}")
        y = _Factored.apply(x, self.U, self.S, self.V)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_matrix(self) -> torch.Tensor:
        """W = U S V^T (m x n), formed (for tests and ``to_linear``; the forward never forms it)."""
        return self.U @ self.S @ self.V.T

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """The rank-``rank`` truncated SVD of ``linear``'s weight as a ``LowRankLinear`` (bias copied; the factors in
        the weight's dtype and on its device)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        check_rank(rank, w.shape[0], w.shape[1])
        out = cls(w.shape[1], w.shape[0], rank, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        out._set_factors(w.detach())
        if linear.bias is not None:
            with torch.no_grad():
                out.bias.copy_(linear.bias)
        return out

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with weight U S V^T (and the bias)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.U.device,
                        dtype=self.U.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight_matrix())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A state_dict of another rank (saved after a rank change) loads: the factors take its shapes."""
        saved = state_dict.get(prefix + "S")
        if isinstance(saved, torch.Tensor) and saved.dim() == 2 and saved.shape != self.S.shape:
            r = saved.shape[0]
            with torch.no_grad():
                for name, rows in (("U", self.out_features), ("S", r), ("V", self.in_features)):
                    p = getattr(self, name)
                    p.data = p.new_empty(rows, r)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def check_rank(rank: Any, m: int, n: int) -> None:
    """1 <= rank <= min(m, n), an int (ValueError naming the value and the bound otherwise)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be an int in [1, min(out_features, in_features)] = [1, {min(m, n)}], got "
                         f"{rank!r}")
