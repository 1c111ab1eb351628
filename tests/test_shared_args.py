"""The arguments every optimizer shares live in one place (``geomopt.optim.shared_args``) and still read like
explicit arguments: in each class's signature with their defaults, in its docstring, and refused by name when
unknown."""
import inspect

import pytest
import torch

import geomopt
from geomopt.optim.shared_args import COMMON

CLASSES = [geomopt.POET, geomopt.ReLoRAReset, geomopt.DLRAMomentum]
OWN = {geomopt.POET: {}, geomopt.ReLoRAReset: {"rank": 2}, geomopt.DLRAMomentum: {"rank": 2}}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_shared_arguments_are_in_the_signature_and_the_docstring(cls):
    params = inspect.signature(cls).parameters
    shared = {k: v for k, v in COMMON.items() if cls.INNER_RULE or k not in ("inner", "inner_kwargs")}
    for name, default in shared.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == default
        assert name in cls.__doc__
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert "<COMMON_ARGS" not in cls.__doc__


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_an_unknown_argument_is_refused_by_name(cls):
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(TypeError, match=f"{cls.__name__}.__init__\\(\\) got an unexpected keyword argument 'betaz'"):
        cls([w], betaz=(0.9, 0.99))
    if not cls.INNER_RULE:
        with pytest.raises(TypeError, match="unexpected keyword argument 'inner'"):
            cls([w], inner=torch.optim.SGD)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_shared_arguments_reach_the_groups_and_the_base(cls):
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = cls([w], lr=0.1, betas=(0.5, 0.6), eps=1e-3, weight_decay=0.2, maximize=True, seed=7, nonfinite="raise",
              **OWN[cls])
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["maximize"]) == ((0.5, 0.6), 1e-3, 0.2, True)
    assert (opt._seed, opt.nonfinite) == (7, "raise")
