"""``geomopt.registry``: the one table of named optimizers. A spec registered at run time is built by
``make_optimizer``, run by ``geomopt-bench --optimizers`` and exercised by every generic test of the test table,
with no other change; names and duplicates are checked."""
import inspect
import json

import optim_table
import pytest
import test_conformance
import test_contract
import test_step_guarantees
import torch
from torch import nn

import geomopt
from geomopt import bench, registry
from geomopt.integrations import make_optimizer

TOY = "poet-k3-toy"


@pytest.fixture
def toy():
    """POET at k = 3 (the official Triton kernel's polynomial) under a name of its own, for this test only."""
    spec = registry.register(registry.OptimizerSpec(
        TOY, geomopt.POET, dict(neumann_terms=3), "POET at k = 3", 3e-3,
        lambda a, m: dict(block_size=a.block_size, merge_every=a.merge_every),
        dict(lr=1e-2, block_size=4, merge_every=7)))
    yield spec
    registry.REGISTRY.pop(TOY)


def generic_tests():
    """The tests of the generic modules that are parametrized over the whole table and take only the name."""
    found = []
    for mod in (test_conformance, test_contract, test_step_guarantees):
        for attr, fn in vars(mod).items():
            marks = getattr(fn, "pytestmark", [])
            if attr.startswith("test_") and list(inspect.signature(fn).parameters) == ["name"] and any(
                    m.name == "parametrize" and m.args[1] is optim_table.IDS for m in marks):
                found.append(fn)
    return found


def test_the_generic_tests_are_found():
    assert len(generic_tests()) >= 25


def test_a_registered_spec_runs_through_every_generic_test(toy):
    cfg = optim_table.CONFIGS[TOY]
    assert cfg.cls is geomopt.POET and cfg.kwargs["neumann_terms"] == 3 and cfg.cycle_stat == "merges"
    for fn in generic_tests():
        fn(TOY)


def test_a_registered_spec_is_built_by_make_optimizer_and_run_by_the_bench(toy, tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    opt, _ = make_optimizer(model, f"{TOY}:lr=1e-3,block_size=4", total_steps=10)
    assert isinstance(opt, geomopt.POET) and opt.defaults["neumann_terms"] == 3
    assert bench.main(["--preset", "tiny", "--optimizers", f"adamw,{TOY}", "--in-process", "--quiet",
                       "--out", str(tmp_path)]) == 0
    rows = {r["optimizer"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"adamw", TOY} and rows[TOY]["lr"] == 3e-3
    assert torch.isfinite(torch.tensor(rows[TOY]["val_loss"]))


def test_the_bench_and_make_optimizer_read_the_registry():
    assert set(registry.names()) >= {"adamw", "poet", "poet-lean", "poet-fs", "relora", "dlra", "dlra-hb"}
    assert bench.parse_args(["--optimizers", "poet-fs,dlra-hb"]).optimizers == ["poet-fs", "dlra-hb"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--optimizers", "sgd"])
    opt, _ = make_optimizer(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), "dlra-hb:lr=1e-2,rank=2", 10)
    assert isinstance(opt, geomopt.DLRAMomentum) and opt.defaults["method"] == "heavy_ball"


@pytest.mark.parametrize("name", ["", "Poet", "poet:x", "a,b", "a+b", "a b"])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="optimizer name must be lower case"):
        registry.register(registry.OptimizerSpec(name, geomopt.POET))


def test_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'poet' is registered already"):
        registry.register(registry.OptimizerSpec("poet", geomopt.POET))
    with pytest.raises(ValueError, match="must be one of adamw, .*got 'nope'"):
        registry.get("nope")
