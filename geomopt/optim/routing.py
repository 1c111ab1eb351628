r"""Which parameters get the method (factorized) and which get AdamW.

Rules: 2-D weights of ``nn.Linear`` layers (and of GPT-2's ``Conv1D``, its transposed Linear) are factorized;
embeddings, the LM head (tied or not) and every tensor that is not 2-D get AdamW. From a model the head is
``get_output_embeddings()``, a Linear tied to an embedding, or a Linear named ``lm_head``, ``output``,
``head``, ``classifier`` or ``score`` (the module that owns the weight; a container of that name, such as
BERT's ``attention.output`` or RoBERTa's ``lm_head``, does not make its Linears heads). Weights named after an
embedding (``embed*``, ``wte``, ``wpe``, ``tok_embeddings``, ``word_embeddings``, ``position_embeddings``,
``shared``, at any depth) get AdamW as well. A group with ``factorize=False`` is AdamW throughout. A frozen
parameter (``requires_grad=False``) is routed like the others and steps once it has a gradient, as with
``torch.optim.AdamW(model.parameters())``. Parameters given with names (``model.named_parameters()``, or
(name, tensor) pairs in a group) keep them: torch stores them as the group's ``param_names``.

``include`` / ``exclude`` (a model or named parameters only) take module-name patterns: a pattern matches a
parameter when it is a regular expression that matches the whole name of the parameter's module
(``r"layers\.\d+\.mlp\..*"``), or that name's last dotted parts (``"q_proj"``, ``"self_attn.q_proj"``). With
``include`` only the matching modules' weights are routed (the default name rule does not apply to them); the
weights of the modules that ``exclude`` matches get AdamW. A pattern that matches no module is an error (a typo
would otherwise route silently).
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from ..nn.lowrank import lowrank_role

__all__ = ["EXCLUDED_NAME", "build_param_groups", "is_factorized", "linear_weights", "warn_if_nothing_routed",
           "Targets"]

_EMBEDDING = r"(^|\.)(embed\w*|wte|wpe|tok_embeddings|word_embeddings|position_embeddings|shared)(\.|$)"
_HEAD = r"(^|\.)(lm_head|output|head|classifier|score)\.[^.]+$"
# Names of parameters that are never factorized when names are known (embeddings and output heads).
EXCLUDED_NAME = re.compile(f"{_EMBEDDING}|{_HEAD}")

_UNNAMED_WARNING = (
    "geomopt: {n} 2-D parameter(s) were given without names, so all of them are factorized, embeddings "
    "and the LM head included. Pass the model (or model.named_parameters()) to route embeddings and the "
    "head to AdamW, or put them in a param group with factorize=False (with the HuggingFace Trainer: "
    "optimizer_cls_and_kwargs=(cls, {{'model': model, ...}}))."
)


def is_factorized(p: torch.Tensor, group: dict[str, Any]) -> bool:
    """A parameter is factorized when its group allows it and it is a non-empty 2-D floating-point tensor."""
    return bool(group.get("factorize", True)) and p.dim() == 2 and p.numel() > 0 and p.is_floating_point()


class Targets:
    """``include`` / ``exclude`` module-name patterns (see the module docstring), checked at construction."""

    def __init__(self, include: Any = None, exclude: Any = None) -> None:
        self.include, self.exclude = self._patterns("include", include), self._patterns("exclude", exclude)
        self.used: set[str] = set()

    @staticmethod
    def _patterns(arg: str, value: Any) -> list[str] | None:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple, set)) else None
        if not items or not all(isinstance(x, str) and x for x in items):
            raise TypeError(f"{arg} must be a module-name pattern or a list of them (non-empty strings), got {value!r}")
        for x in items:
            try:
                re.compile(x)
            except re.error as err:
                raise ValueError(f"{arg}: {x!r} is not a valid regular expression ({err})") from None
        return items

    @property
    def active(self) -> bool:
        return self.include is not None or self.exclude is not None

    def _hit(self, patterns: list[str] | None, module: str) -> str | None:
        """The first pattern that matches ``module`` (every matching one counts as used)."""
        hit = None
        for x in patterns or ():
            if re.fullmatch(x, module) or module == x or module.endswith("." + x):
                self.used.add(x)
                hit = hit or x
        return hit

    def route(self, name: str, default: bool, why: str) -> tuple[bool, str]:
        """Whether the parameter ``name`` (a routable 2-D weight, ``default`` its default route, ``why`` the reason
        for it) is routed, and why."""
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if self.include is not None:
            hit = self._hit(self.include, module)
            default, why = (True, f"include matched {hit!r}") if hit else (False, "not matched by include")
        if default:
            hit = self._hit(self.exclude, module)
            if hit:
                return False, f"exclude matched {hit!r}"
        return default, why

    def check_used(self) -> None:
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            unused = [x for x in patterns or () if x not in self.used]
            if unused:
                raise ValueError(f"{arg}: {unused} match no module with a routable weight")


def _head_weights(model: nn.Module) -> set[int]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    weight = getattr(head, "weight", None) if isinstance(head, nn.Module) else None
    return {id(weight)} if isinstance(weight, torch.Tensor) else set()


def linear_weights(model: nn.Module) -> dict[int, str]:
    """The weights of ``nn.Linear`` and of GPT-2's ``Conv1D`` (a Linear stored transposed), by id."""
    out = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")):
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                out[id(m.weight)] = type(m).__name__
    return out


def _name_rule(name: str) -> tuple[bool, str]:
    hit = EXCLUDED_NAME.search(name)
    return (True, "2-D weight") if hit is None else (False, f"name rule: {hit.group(0).strip('.')!r}")


def _module_route(name: str, p: torch.Tensor, kinds: dict[str, Any], targets: Targets) -> tuple[bool, str]:
    if p.dim() != 2:
        return False, f"{p.dim()}-D"
    role = lowrank_role(p)
    if role is not None:
        return targets.route(name, True, f"LowRankLinear factor {role}")
    if id(p) in kinds["embedding"]:
        return False, "nn.Embedding weight (or tied to one)"
    if id(p) not in kinds["linear"]:
        owner = kinds["modules"].get(name.rsplit(".", 1)[0] if "." in name else "")
        return False, f"2-D, not a Linear weight ({type(owner).__name__})"
    default, why = _name_rule(name)
    why = f"{kinds['linear'][id(p)]} weight" if default else why
    if id(p) in kinds["head"]:
        default, why = False, "output embeddings (the LM head)"
    return targets.route(name, default, why)


def _from_module(model: nn.Module, targets: Targets, reasons: dict[int, tuple[str, bool, str]]) -> list[dict[str, Any]]:
    kinds = {"embedding": {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)},
             "head": _head_weights(model), "linear": linear_weights(model), "modules": dict(model.named_modules())}
    routed, dense = [], []
    for name, p in model.named_parameters():  # each tensor once (tied ones under their first name)
        go, why = _module_route(name, p, kinds, targets)
        reasons[id(p)] = (name, go, why)
        (routed if go else dense).append(p)
    return _two_groups(routed, dense)


def _from_named(named: list[tuple[str, torch.Tensor]], targets: Targets, reasons: dict[int, tuple[str, bool, str]]
                ) -> list[dict[str, Any]]:
    routed, dense, seen = [], [], set()
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params: expected (name, Tensor) pairs, got ({name!r}, {type(p).__name__})")
        if id(p) in seen:
            continue
        seen.add(id(p))
        go, why = targets.route(name, *_name_rule(name)) if p.dim() == 2 else (False, f"{p.dim()}-D")
        reasons[id(p)] = (name, go, why)
        (routed if go else dense).append((name, p))
    return _two_groups(routed, dense)


def _two_groups(routed: list, dense: list) -> list[dict[str, Any]]:
    groups = []
    if routed:
        groups.append({"params": routed, "factorize": True})
    if dense:
        groups.append({"params": dense, "factorize": False})
    return groups


def _as_list(params: Any) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def build_param_groups(params: Any, warn: bool = True, include: Any = None, exclude: Any = None,
                       reasons: dict[int, tuple[str, bool, str]] | None = None) -> list[dict[str, Any]]:
    """Turn what a user passes (module, named_parameters(), params, or param groups) into groups; ``warn``:
    warn when 2-D parameters come without names (they are all factorized); ``include`` / ``exclude``: module-name
    patterns (a module or named parameters only); ``reasons``: filled with (name, routed, why) by tensor id
    where names are known."""
    targets = Targets(include, exclude)
    reasons = {} if reasons is None else reasons
    if isinstance(params, nn.Module):
        groups = _from_module(params, targets, reasons)
        targets.check_used()
    else:
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params: expected an iterable of Tensors, (name, Tensor) pairs, dicts or an nn.Module, "
                f"got a single Tensor of shape {tuple(params.shape)}"
            )
        items = list(params)
        if not items:
            raise ValueError("params: the optimizer got an empty parameter list")
        if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
            groups = _from_named(items, targets, reasons)
            targets.check_used()
        elif targets.active:
            raise ValueError("include / exclude match module names: pass the model or model.named_parameters(), "
                             "not plain tensors or param groups")
        elif all(isinstance(x, dict) for x in items):
            groups = [dict(g, params=_as_list(g["params"]) if "params" in g else []) for g in items]
            n2d = sum(1 for g in groups if "factorize" not in g for p in g["params"]
                      if isinstance(p, torch.Tensor) and p.dim() == 2)
            if n2d and warn:
                warnings.warn(_UNNAMED_WARNING.format(n=n2d), UserWarning, stacklevel=4)
        else:
            for x in items:
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"params: expected Tensors, got an item of type {type(x).__name__}")
            groups = [{"params": items}]
            n2d = sum(1 for p in items if p.dim() == 2)
            if n2d and warn:
                warnings.warn(_UNNAMED_WARNING.format(n=n2d), UserWarning, stacklevel=4)
    if not groups:
        raise ValueError("params: the optimizer got an empty parameter list")
    return groups


def warn_if_nothing_routed(opt: torch.optim.Optimizer) -> None:
    """Warn when no parameter of ``opt`` is routed to its method: the optimizer would silently be AdamW."""
    params = [(p, g) for g in opt.param_groups for p in g["params"]]
    if params and not any(is_factorized(p, g) for p, g in params):
        warnings.warn(f"geomopt: {type(opt).__name__} routes none of its {len(params)} parameters to its method, so "
                      "it steps all of them as AdamW. From a model only nn.Linear (and GPT-2 Conv1D) weights "
                      "are routed (not embeddings, the LM head, convolutions or tensors that are not 2-D); a 2-D "
                      "tensor in a param group without factorize=False is routed. print(opt.routing()) lists why.",
                      UserWarning, stacklevel=4)
