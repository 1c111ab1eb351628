"""benchmarks/bench_kernels.py runs end to end (tiny sizes, kernels under TRITON_INTERPRET=1) and reports every
kernel next to its reference; no timing is asserted."""
import json
import os
import sys

import pytest

triton = pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_kernels  # noqa: E402

KERNELS = {"cayley_neumann fwd", "cayley_neumann fwd+bwd", "tile_grads", "tile_rewrite (lean)",
           "factor_update (lean)", "tall_qr (CholeskyQR2)"}


def test_smoke_run_reports_every_kernel_with_its_error(tmp_path, capsys):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU machine: the smoke run is for the interpreter")
    assert bench_kernels.main(["--small", "--device", "cpu", "--no-compile", "--dtype", "fp32", "--step", "--out",
                               str(tmp_path)]) == 0
    saved = {name: json.loads((tmp_path / f"{name}.json").read_text())["rows"] for name in ("kernels", "steps")}
    rows = saved["kernels"]
    assert {r["kernel"] for r in rows} == KERNELS
    assert all(r["rel_err"] < 1e-5 and r["kernel_ms"] > 0 and r["eager_ms"] > 0 and r["gbps"] > 0 for r in rows)
    assert [r["optimizer"] for r in saved["steps"]] == ["adamw (fused)", "poet lean, b=16"]
    assert (tmp_path / "kernels.md").read_text().count("\n| ") == len(rows) + 1  # the rule and the rows
    printed = capsys.readouterr().out
    assert printed.count("\n| ") == (len(rows) + 2) + 4  # per table its header, its rule and its rows


def test_cpu_without_the_interpreter_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bench_kernels.main(["--small", "--device", "cpu"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
