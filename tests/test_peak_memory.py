"""benchmarks/peak_memory.py: the replay of the profiler's allocations finds a known peak, and a tiny run
reports one per optimizer (stepping inside backward never raises it). No timing is asserted."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import peak_memory  # noqa: E402


def test_replay_finds_the_peak_of_live_tensors():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.randn(1000, 1000)  # 4 MB live
        b = a @ a  # 8 MB
        del a  # 4 MB
        c = b + 1  # 8 MB again, never 12
        del b, c
    assert peak_memory.replay_peak(prof) == pytest.approx(8_000_000, abs=4096)


def test_tiny_run_reports_a_peak_per_optimizer(capsys):
    rows = peak_memory.main(["--preset", "tiny", "--optimizers", "adamw,poet-lean,poet-lean+bwd", "--steps", "2",
                             "--max-bytes", "200000"])
    peaks = {r["optimizer"]: r["peak_bytes"] for r in rows}
    assert all(v > 0 for v in peaks.values())
    assert peaks["poet-lean+bwd"] <= peaks["poet-lean"]
    assert "| poet-lean+bwd |" in capsys.readouterr().out


def test_unknown_optimizer_is_named():
    with pytest.raises(SystemExit, match="nope"):
        peak_memory.main(["--optimizers", "adamw,nope"])
