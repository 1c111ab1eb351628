"""What every benchmark writes (``geomopt-bench`` and the scripts in benchmarks/): its rows as a Markdown table and,
beside it, as JSON with the settings and the machine they were measured with. Timing is ``geomopt.timing``'s.

A table is a list of ``Column``: a header and how a row shows in it (a key of the row with a format spec, or a
function of the row). ``markdown(rows, columns)`` draws it; ``write(out, name, rows, columns, info)`` writes
``name.json`` (the rows, ``info`` and ``machine()``) and ``name.md`` (the table and its notes) into the folder
``out`` (nothing when ``out`` is None) and returns the table.
"""
from __future__ import annotations

import json
import os
import platform
from typing import Any, Callable, NamedTuple

import torch

__all__ = ["Column", "markdown", "machine", "write", "ratio"]


class Column(NamedTuple):
    """A column: its header and a row's cell, ``row[show]`` formatted with ``fmt`` (None shows as n/a), or
    ``show(row)``."""
    header: str
    show: str | Callable[[dict[str, Any]], Any]
    fmt: str = ""

    def cell(self, row: dict[str, Any]) -> str:
        value = self.show(row) if callable(self.show) else row.get(self.show)
        if value is None:
            return "n/a"
        return format(value, self.fmt) if self.fmt and not isinstance(value, str) else str(value)


def markdown(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def ratio(value: float | None, base: float | None, fmt: str = ".2f") -> str | None:
    """``value / base`` as "1.23x" (None where either is missing or the base is 0)."""
    if value is None or not base:
        return None
    return f"{value / base:{fmt}}x"


def machine(device: Any = None) -> dict[str, Any]:
    """What the figures were measured on: the CPU architecture and threads, torch, and the GPU where there is one."""
    out = dict(machine=platform.machine(), python=platform.python_version(), torch=torch.__version__,
               threads=torch.get_num_threads())
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def write(out: str | os.PathLike | None, name: str, rows: list[dict[str, Any]], columns: list[Column],
          info: dict[str, Any] | None = None, notes: str = "", device: Any = None) -> str:
    """The table of ``rows``; with ``out``, also ``out/name.json`` and ``out/name.md`` (the table, then ``notes``)."""
    table = markdown(rows, columns)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(dict(info=info or {}, machine=machine(device), rows=rows), f, indent=1, default=str)
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(table + ("\n\n" + notes if notes else "") + "\n")
    return table
