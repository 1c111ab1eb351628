"""The arguments every geomopt optimizer shares, in one place: their names and defaults (``COMMON``) and their text
(``COMMON_ARGS_DOC``). A class's ``__init__`` takes its own arguments and ``**common``, which ``common_args`` checks
and completes; ``shared_args`` (a class decorator) puts the shared arguments into the signature of ``__init__``
(``inspect.signature``, ``help()``, the API reference) and their text into the class docstring."""
from __future__ import annotations

import inspect
from typing import Any

import torch

from .checks import dense_defaults, flag_defaults

__all__ = ["COMMON", "COMMON_ARGS_DOC", "common_args", "group_defaults", "base_args", "shared_args"]

#: the shared keyword-only arguments and their defaults, in the order of the signatures
COMMON: dict[str, Any] = dict(
    betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, dense_lr=None, dense_weight_decay=None, inner=torch.optim.AdamW,
    inner_kwargs=None, seed=0, nonfinite="skip", external_edits="rebase", include=None, exclude=None, maximize=False,
    foreach=None, fused=None, capturable=False, differentiable=False)
_INNER = ("inner", "inner_kwargs")
_BASE = ("inner", "inner_kwargs", "seed", "nonfinite", "external_edits", "include", "exclude")


def _allowed(cls: type) -> dict[str, Any]:
    """The shared arguments ``cls`` takes: all of them, or without the inner rule (``cls.INNER_RULE`` False)."""
    return COMMON if getattr(cls, "INNER_RULE", True) else {k: v for k, v in COMMON.items() if k not in _INNER}


def common_args(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """The shared arguments of ``cls`` as given, the others at their defaults; an unknown one raises TypeError, as
    Python would for an argument the signature lacks."""
    allowed = _allowed(cls)
    for key in given:
        if key not in allowed:
            raise TypeError(f"{cls.__name__}.__init__() got an unexpected keyword argument {key!r}")
    return {**allowed, **given}


def group_defaults(lr: Any, args: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A class's ``defaults``: the shared group settings around its own (``own``)."""
    return dict(lr=lr, betas=args["betas"], eps=args["eps"], weight_decay=args["weight_decay"], factorize=True, **own,
                **dense_defaults(lr, args["dense_lr"], args["dense_weight_decay"]),
                **flag_defaults(args["maximize"], args["foreach"], args["fused"], args["capturable"],
                                args["differentiable"]))


def base_args(args: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``FactorOptimizer.__init__`` among the shared ones (``inner=None`` without one)."""
    return {k: args.get(k) for k in _BASE}

COMMON_ARGS_DOC = r"""
        params: an ``nn.Module`` (routed: ``nn.Linear`` and GPT-2 ``Conv1D`` weights get the method, embeddings,
            the LM head and all non-2-D tensors get AdamW; frozen parameters stay in their group and step once they have
            gradients), ``model.named_parameters()`` (routed by name; the names are kept as ``param_names``),
            plain parameters (every 2-D one is factorized; a warning says how to exclude embeddings), or param
            groups (dicts; a group may set ``factorize=False`` and any hyperparameter below).
        lr: learning rate of the factors and of the AdamW parameters (a float or a one-element tensor); LR
            schedulers drive both.
        betas, eps, weight_decay: AdamW hyperparameters of the parameters that are not factorized
            (decoupled weight decay).
        dense_lr, dense_weight_decay: lr and weight decay of the parameters that are not factorized (embeddings, head,
            norms, biases), when they should differ from the factors' (the POET paper trains its embeddings and head at
            a higher lr than the factors). ``dense_lr`` is kept as its ratio to ``lr`` (the group's
            ``dense_lr_scale``), so LR schedulers drive both in proportion; None (default): ``lr`` and
            ``weight_decay``.
        inner: torch optimizer class that updates the factors (default ``torch.optim.AdamW``); any
            ``torch.optim.Optimizer`` subclass works (e.g. ``torch_optimizer.Lamb``). Its state lives in
            ``optimizer.state[param]``; torch Adam/AdamW run as plain update functions, other classes through a
            private instance whose step fires no optimizer hooks.
        inner_kwargs: keyword arguments of ``inner`` other than ``lr`` (default for AdamW:
            ``weight_decay=0``, so factors are not decayed).
        include, exclude: module-name patterns (a model or ``named_parameters()`` only): a regular expression that
            matches a module's whole name, or its last dotted parts (``"q_proj"``). ``include``: only those modules'
            weights get the method (the default name rule does not apply to them); ``exclude``: those get AdamW. A
            pattern that matches no module raises ValueError.
        seed: seed of the per-parameter generators; every rank and every resumed run draws the same.
        nonfinite: ``"skip"`` (default) skips the step of a parameter whose gradient holds NaN/Inf and
            counts it in ``stats``; ``"raise"`` raises ``FloatingPointError`` before anything changes.
        external_edits: what a step does with a weight changed outside the optimizer since its last write
            (``model.load_state_dict``, an in-place edit, another optimizer), where the method would otherwise
            rewrite it from a stale base: ``"rebase"`` (default) rebuilds that weight's factors on the weight as
            it is now and counts it in ``stats["rebases"]``; ``"raise"`` raises RuntimeError before anything
            changes.
        maximize: maximize the objective (the factors and the AdamW parameters ascend).
        foreach, fused: how the Adam updates run (of the AdamW parameters, and of the factors unless
            ``inner_kwargs`` says otherwise): ``None`` (default) is torch's choice for the parameters (foreach on
            CUDA, else a loop) and the fused kernel for the factors where torch has one; ``True``/``False`` force
            it. A tensor that is not contiguous never goes to the fused kernel (torch's CPU kernel ignores strides).
            POET, ReLoRAReset and DLRAMomentum (fixed rank) also step the weights of one shape together on this
            multi-tensor path (stacked products, one multi-tensor write: the calls do not grow with the layers) with
            ``foreach=True``, or ``fused=True`` and ``foreach`` unset, and by default on a GPU; ``foreach=False``, and
            the default on a CPU (where it is faster), step them one by one (equal to float64 rounding).
        capturable: torch's flag; ``True`` is POET's step with its decisions on the device (no host read; README,
            "The capturable step"), refused (a clear error) by ReLoRAReset and DLRAMomentum.
        differentiable: torch's flag; only ``False`` is supported (a clear error otherwise).
"""


def shared_args(cls: type) -> type:
    """Class decorator: the shared arguments in the signature of ``cls.__init__`` (after the class's own, in place of
    ``**common``), and ``COMMON_ARGS_DOC`` where the class docstring says ``<COMMON_ARGS>``
    (``<COMMON_ARGS_NO_INNER>``: the same without ``inner``/``inner_kwargs``)."""
    sig = inspect.signature(cls.__init__)
    own = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    shared = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in _allowed(cls).items()]
    cls.__init__.__signature__ = sig.replace(parameters=own + shared)
    no_inner = (COMMON_ARGS_DOC.split("        inner:")[0]
                + COMMON_ARGS_DOC[COMMON_ARGS_DOC.index("        include, exclude:"):])
    doc = cls.__doc__ or ""
    cls.__doc__ = doc.replace("<COMMON_ARGS_NO_INNER>", no_inner.strip("\n")).replace(
        "<COMMON_ARGS>", COMMON_ARGS_DOC.strip("\n"))
    return cls
