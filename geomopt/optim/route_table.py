"""``opt.routing()``: which parameter went to the method and which to AdamW, and why (a table)."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .routing import is_factorized

__all__ = ["Route", "RoutingTable", "check_routes_kept", "route_log", "routing_table"]


class Route(NamedTuple):
    """One parameter: its name (``group<g>.<i>`` when it came without one), shape, route and the reason."""

    name: str
    shape: tuple[int, ...]
    route: str
    reason: str


class RoutingTable(list):
    """The rows of ``opt.routing()`` (a list of :class:`Route`); printing it draws an aligned table."""

    def __init__(self, rows: list[Route], method: str) -> None:
        super().__init__(rows)
        self.method = method

    def summary(self) -> str:
        """One line: how many tensors (and values) each route got."""
        parts = []
        for route in (self.method, "AdamW"):
            rows = [r for r in self if r.route == route]
            values = sum(torch.Size(r.shape).numel() for r in rows)
            parts.append(f"{len(rows)} tensor{'s' * (len(rows) != 1)} ({values:,} values) to {route}")
        return "routing: " + ", ".join(parts)

    def __str__(self) -> str:
        head = Route("name", "shape", "route", "reason")  # type: ignore[arg-type]
        cells = [[str(c) if i != 1 or isinstance(c, str) else "x".join(map(str, c)) or "scalar"
                  for i, c in enumerate(r)] for r in [head, *self]]
        widths = [max(len(row[i]) for row in cells) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3] for row in cells]
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], self.summary()])

    __repr__ = __str__


def route_log(groups: list[dict[str, Any]], reasons: dict[int, tuple[str, bool, str]]) -> list[list[Any]]:
    """What construction knew of each parameter, aligned with the groups: (name, routed, reason); name and reason
    are None where the parameter came without a name."""
    return [[reasons.get(id(p)) or (None, is_factorized(p, g), None) for p in g["params"]] for g in groups]


def check_routes_kept(name: str, gi: int, group: dict[str, Any], factorized: list[torch.Tensor],
                      built: list[Any]) -> None:
    """Raise when group ``gi``, which held weights routed to the method at construction (``built``: its entries of
    :func:`route_log`), holds none now (``factorized``) although it still factorizes (``factorize`` set to False
    moves them to AdamW, as documented): its tensors were replaced, as DeepSpeed's ZeRO stages 1 and 2 do (they
    hand the optimizer flat 1-D partitions), and stepping would silently be AdamW."""
    had = sum(1 for entry in built if entry[1])
    if had and group.get("factorize", True) and not factorized:
        shapes = [tuple(p.shape) for p in group["params"]][:3]
        raise RuntimeError(
            f"{name}: param group {gi} held {had} weight(s) routed to the method when it was built and holds none "
            f"now (tensors of shapes {shapes}): its tensors were replaced, as DeepSpeed ZeRO stages 1 and 2 do (they "
            "give the optimizer flat 1-D partitions). geomopt's methods step the weights themselves: use DeepSpeed "
            "without ZeRO (stage 0), or FSDP2 (README, \"Where it runs\").")


def _reason(p: torch.Tensor, group: dict[str, Any], known: tuple[bool, str] | None) -> str:
    routed = is_factorized(p, group)
    if known is not None and known[0] == routed:
        return known[1]
    if not group.get("factorize", True):
        return "its group has factorize=False"
    if p.dim() != 2:
        return f"{p.dim()}-D"
    if routed:
        return "2-D, in a param group (groups are not routed by name)"
    return "empty" if p.numel() == 0 else f"not floating point ({p.dtype})"


def routing_table(opt: torch.optim.Optimizer, log: list[list[Any]] | None) -> RoutingTable:
    """The routing of ``opt``'s parameters; ``log``: :func:`route_log` of its construction (or None)."""
    rows, method = [], type(opt).__name__.removesuffix("Optimizer")
    for gi, group in enumerate(opt.param_groups):
        known = log[gi] if log is not None and gi < len(log) and len(log[gi]) == len(group["params"]) else None
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            entry = known[i] if known is not None else (None, None, None)
            name = entry[0] or (names[i] if names and i < len(names) else f"group{gi}.{i}")
            why = _reason(p, group, entry[1:] if entry[2] is not None else None)
            if not p.requires_grad:
                why += "; requires_grad=False (steps once it has a gradient)"
            rows.append(Route(name, tuple(p.shape), method if is_factorized(p, group) else "AdamW", why))
    return RoutingTable(rows, method)
