"""Docstrings exist, carry the shared argument text, and their examples run."""
import doctest
import sys

import pytest

import geomopt
from geomopt import schedules


@pytest.mark.parametrize("obj", [geomopt.POET, geomopt.ReLoRAReset, geomopt.DLRAMomentum, schedules.jagged_cosine],
                         ids=lambda o: o.__name__)
def test_docstring_examples_run(obj):
    assert obj.__doc__ and "<COMMON_ARGS" not in obj.__doc__
    if isinstance(obj, type):
        assert "nonfinite:" in obj.__doc__ and "Example:" in obj.__doc__
    tests = doctest.DocTestFinder().find(obj, obj.__name__, globs=dict(vars(sys.modules[obj.__module__])))
    examples = sum(len(t.examples) for t in tests)
    assert examples > 0
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
