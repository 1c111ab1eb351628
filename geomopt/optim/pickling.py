"""What of a factor optimizer lives only in its process (``_init_runtime``: the fingerprints, the retry record, the
held interrupts, the step's bookkeeping) and what pickling and ``copy.deepcopy`` carry besides torch's groups and
state (the seed, the policies, the inner rule, the routing log). Mixed into ``FactorOptimizer``."""
from __future__ import annotations

from typing import Any

import torch

from .edits import Fingerprints
from .guard import HeldInterrupt, Retry
from .inner import inner_rule

__all__ = ["Pickling"]


class Pickling:
    """The runtime half and the pickling of ``FactorOptimizer``."""

    def _init_runtime(self) -> None:
        """What lives only in this process (not pickled, not in the state_dict)."""
        self._edits = Fingerprints()
        self._retry = Retry()
        self._interrupts = HeldInterrupt()
        self._committed: list[torch.Tensor] = []
        self._origin: dict[int, torch.Tensor] = {}
        self._step_checks: frozenset = frozenset()  # ids whose checks the step makes itself (``_checks_in_step``)

    # ------------------------------------------------------------------ pickling and deepcopy
    def __getstate__(self) -> dict[str, Any]:
        out = super().__getstate__()
        out["_geomopt"] = dict(seed=self._seed, nonfinite=self.nonfinite, external_edits=self.external_edits,
                               inner=self._inner, routes=getattr(self, "_routes", None))
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, and torch's ``load_state_dict`` (which calls this with state and groups only: then the
        configuration stays as it is)."""
        conf = state.pop("_geomopt", None)
        super().__setstate__(state)
        if conf is None and hasattr(self, "_edits"):
            return
        conf = conf or {}  # a pickle of an older version: the defaults
        self._seed = conf.get("seed", 0)
        self.nonfinite = conf.get("nonfinite", "skip")
        self.external_edits = conf.get("external_edits", "rebase")
        self._inner = conf["inner"] if "inner" in conf else inner_rule(torch.optim.AdamW, None)
        self._routes = conf.get("routes")
        self._building = False
        for k, v in self.defaults.items():  # groups of an older pickle take the flags' defaults
            for group in self.param_groups:
                group.setdefault(k, v)
        self._init_runtime()
