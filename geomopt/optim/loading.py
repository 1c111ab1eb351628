"""What ``FactorOptimizer.load_state_dict`` checks before anything changes: group sizes, the settings a state_dict
of this class must have (those added since take their defaults), each group's values, and every saved state
against the layout the optimizer declares for it (keys, shapes, dtypes, permutations)."""
from __future__ import annotations

from typing import Any

from . import state as layout
from .checks import check_hyper
from .routing import is_factorized

__all__ = ["checked_groups"]


def checked_groups(opt: Any, state_dict: dict[str, Any]) -> tuple[list[dict[str, Any]], list[tuple]]:
    """(the param groups to load, the defaults filled in; (saved id, parameter, its group) of every saved state),
    or an error that names what does not fit ``opt``."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from optimizer.state_dict())")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                         f"{len(opt.param_groups)}")
    name, own = type(opt).__name__, opt._own_settings()
    groups, pairs = [], []
    for gi, (sg, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(sg["params"]) != len(group["params"]):
            raise ValueError(f"param group {gi}: state_dict has {len(sg['params'])} parameters, "
                             f"this optimizer has {len(group['params'])}")
        lacking = [k for k in own if k not in sg and k not in opt.ADDED_SETTINGS]
        if lacking:
            raise ValueError(f"param group {gi} of the state_dict lacks {lacking[:4]}: it comes from another "
                             f"optimizer than {name}")
        filled = {**opt.defaults, **sg}  # an older state_dict: missing hyperparameters take their defaults
        merged = {**filled, "params": group["params"]}
        check_hyper(merged, opt.CAPTURABLE)
        opt._check_group(merged, [p for p in group["params"] if is_factorized(p, merged)])
        groups.append(filled)
        for sid, p in zip(sg["params"], group["params"]):
            st = state_dict["state"].get(sid)
            if st is None:
                continue
            if not isinstance(st, dict):
                raise ValueError(f"state of parameter {sid} must be a dict, got {type(st).__name__}")
            where = f"{name} state of a {tuple(p.shape)} weight (parameter {sid})"
            if st and is_factorized(p, merged):
                layout.check(opt._declared_layout(p, merged, st), st, where)
            elif st:
                layout.check(layout.adamw_layout(tuple(p.shape)), st, where.replace(name, "AdamW"))
            pairs.append((sid, p, merged))
    return groups, pairs
