"""benchmarks/memory_at_scale.py: the simulation on fake tensors counts what the same step allocates for real.

The script's numbers at 8B rest on this: the optimizers' real step code runs on ``FakeTensorMode`` tensors (no
host reads, constant tables cached per mode), and ``MemTracker`` counts the same bytes by kind as on real
tensors; the profiler's allocator total (``peak_memory.replay_peak``) is a second, independent count of the
real run."""
import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import memory_at_scale  # noqa: E402

pytest.importorskip("transformers")

TINY = ["--shape", "tiny", "--seq-len", "32", "--block-size", "16", "--rank", "8", "--steps", "2"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and MemTracker's module-tracking warnings
        yield


@pytest.mark.parametrize("item", ["adamw", "poet", "poet-lean", "poet-lean+bwd", "relora", "dlra"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fake_step_counts_the_bytes_of_the_real_step(item, dtype):
    args = memory_at_scale.parse([*TINY, "--dtype", dtype])
    fake = memory_at_scale.tracked_run(item, args, fake=True)
    real = memory_at_scale.tracked_run(item, args, fake=False)
    for kind in ("weights", "grads_after_backward", "state"):
        assert fake[kind] == real[kind], (kind, fake[kind], real[kind])
    assert fake["weights"] > 0 and fake["state"] > 0
    if not item.endswith("+bwd"):
        assert fake["grads_after_backward"] == fake["weights"]  # every parameter trains here
    assert fake["peak"] == pytest.approx(real["peak"], rel=0.01)


@pytest.mark.parametrize("item", ["poet-lean", "relora"])
def test_simulated_peak_equals_the_allocators_peak_of_the_real_run(item):
    args = memory_at_scale.parse([*TINY, "--dtype", "float32"])
    assert memory_at_scale.tracked_run(item, args, fake=True)["peak"] == memory_at_scale.replay_run(item, args)


def test_settings_of_an_item_reach_the_optimizer():
    args = memory_at_scale.parse([*TINY, "--dtype", "bfloat16"])
    kept = memory_at_scale.tracked_run("poet-lean+bwd", args, fake=True)
    dropped = memory_at_scale.tracked_run("poet-lean+bwd:compensate=False", args, fake=True)
    entries = 2 * (4 * 64 * 64 + 3 * 64 * 160)  # 2 layers' routed weights: q, k, v, o; gate, up (160 x 64), down
    rows = 2 * (5 * 64 + 2 * 160)
    # one int8 code per entry, an int32 row checksum per row (edits from outside), the probes of rows of 64 and 160
    assert kept["state"] - dropped["state"] == entries + 4 * rows + 4 * (64 + 160)


def test_main_writes_table_and_chart(tmp_path, capsys):
    rows = memory_at_scale.main([*TINY, "--optimizers", "adamw,poet-lean+bwd", "--out", str(tmp_path)])
    assert [r["optimizer"] for r in rows] == ["adamw", "poet-lean+bwd"]
    out = capsys.readouterr().out
    assert "| poet-lean+bwd |" in out and "optimizer state" in out
    assert {p.name for p in tmp_path.iterdir()} == {f"memory_at_scale_tiny_32.{e}" for e in ("json", "md", "png")}


@pytest.mark.parametrize("bad, match", [("nope", "nope"), ("poet-lean:compensate", "key=value")])
def test_bad_optimizer_item_is_named(bad, match, capsys):
    with pytest.raises(SystemExit):
        memory_at_scale.parse([*TINY, "--optimizers", f"adamw,{bad}"])
    assert match in capsys.readouterr().err
