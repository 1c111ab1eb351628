"""The embedded corpus and the benchmark's command line."""
import json
import math
import subprocess
import sys
import sysconfig

import pytest
import torch

from geomopt import bench, data, registry
from geomopt.optim.routing import build_param_groups

pytest.importorskip("transformers")


def test_corpus_is_deterministic_and_split():
    a_train, a_val = data.load_corpus(max_bytes=300_000)
    b_train, b_val = data.load_corpus(max_bytes=300_000)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert a_val.numel() >= 1024 and a_train.numel() > 10 * a_val.numel()
    assert a_train.numel() + a_val.numel() >= 300_000
    root = sysconfig.get_paths()["stdlib"]
    rel = [p.relative_to(root).as_posix() for p in data.stdlib_files()]
    assert rel == sorted(rel) and len(rel) > 100 and not any("site-packages" in r for r in rel)


def test_text_file_and_bad_input(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(256)) * 40)
    train, val = data.load_corpus(max_bytes=1_000_000, text_file=path)
    assert train.numel() + val.numel() == 256 * 40 and bytes(val.tolist()) == path.read_bytes()[-val.numel():]
    with pytest.raises(ValueError, match="is not a readable file"):
        data.load_corpus(text_file=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="max_bytes must be an int >= 1024, got 10"):
        data.load_corpus(max_bytes=10)
    gen = torch.Generator().manual_seed(0)
    batch = data.sample_batch(train, 3, 16, gen)
    assert batch.shape == (3, 17) and batch.dtype == torch.long
    with pytest.raises(ValueError, match="too short for seq_len=10000"):
        data.sample_batch(train, 1, 10_000, gen)


def test_bench_tiny_writes_results_table_and_plot(tmp_path):
    names = ["adamw", "poet-lean", "relora", "dlra"]
    argv = ["--preset", "tiny", "--optimizers", ",".join(names), "--in-process", "--quiet",
            "--out", str(tmp_path), "--block-size", "8", "--rank", "4", "--tokens", "2500"]
    rows = bench.run_bench(argv)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["optimizer"] for r in saved["rows"]] == names
    assert saved["args"]["steps"] == 20  # ceil(2500 / (4 x 32))
    for r in rows:
        assert math.isfinite(r["val_loss"]) and r["val_loss"] < r["curve"][0][1] - 0.2, r  # validation loss fell
        assert r["tokens_per_s"] > 0 and r["state_bytes"] > 0
        assert r["curve"][-1][0] == 20 * 4 * 32
    # trained scalars: everything for AdamW; for the others the factors in place of each routed weight
    model = bench.build_model(bench.parse_args(argv))
    routed = [p.shape for g in build_param_groups(model) if g["factorize"] for p in g["params"]]
    dense = sum(p.numel() for p in model.parameters()) - sum(m * n for m, n in routed)
    want = {"adamw": dense + sum(m * n for m, n in routed),
            "poet-lean": dense + sum((m // 8 + n // 8) * 28 for m, n in routed),  # b = 8: 28 skew entries a block
            "relora": dense + sum(4 * (m + n) for m, n in routed),
            "dlra": dense + sum(4 * (m + n) + 16 for m, n in routed)}
    assert {r["optimizer"]: r["trainable"] for r in saved["rows"]} == want
    md = (tmp_path / "table.md").read_text()
    assert "20 steps x 4 x 32 = 2560 tokens" in md
    for r in rows:
        line = next(x for x in md.splitlines() if x.startswith(f"| {r['optimizer']} |"))
        assert f"| {r['val_loss']:.4f} |" in line
    head = next(x for x in md.splitlines() if x.startswith("| optimizer |"))
    for col in [c.strip() for c in head.strip("|").split("|")][2:]:  # every column after optimizer and lr
        assert f"{col}:" in md.split("Columns.", 1)[1], col  # is defined under the table
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_processes_taking_turns_train_as_one_process_does(tmp_path):
    argv = ["--preset", "tiny", "--optimizers", "adamw,poet", "--quiet", "--block-size", "8", "--steps", "23",
            "--out", ""]
    turns = bench.run_bench(argv)  # two spawned processes, TURN_STEPS steps each in turn (23: a short last turn)
    alone = bench.run_bench(argv + ["--in-process"])
    assert [r["optimizer"] for r in turns] == ["adamw", "poet"]
    for a, b in zip(turns, alone):
        assert a["curve"] == b["curve"] and a["stats"] == b["stats"]


def test_bench_cli_runs_in_a_subprocess_and_rejects_bad_flags(tmp_path):
    out = subprocess.run([sys.executable, "-m", "geomopt.bench", "--preset", "tiny", "--optimizers", "poet",
                          "--quiet", "--steps", "3", "--block-size", "8"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "| poet |" in out.stdout
    assert sorted(f.name for f in (tmp_path / "bench-out").iterdir()) == ["loss.png", "results.json", "table.md"]
    both = subprocess.run([sys.executable, "-m", "geomopt.bench", "--steps", "3", "--tokens", "100"],
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "give --steps or --tokens, not both" in both.stderr
    bad = subprocess.run([sys.executable, "-m", "geomopt.bench", "--optimizers", "sgd"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown ['sgd']" in bad.stderr


def test_bench_grows_mid_run_without_changing_the_validation_loss(tmp_path):
    rows = bench.run_bench(["--preset", "tiny", "--optimizers", "adamw,poet", "--in-process", "--quiet",
                            "--block-size", "8", "--steps", "12", "--out", str(tmp_path),
                            "--grow", "4:mlp_width=96,hidden=48", "--grow", "8:add_layers=1+2"])
    for r in rows:
        assert [g[0] for g in r["growth"]] == [4, 8]
        for _, _, before, after in r["growth"]:
            assert abs(after - before) < 1e-5 * before
        assert r["spectrum_drift"] is None and math.isfinite(r["val_loss"])


@pytest.mark.parametrize("spec,pattern", [
    ("x:hidden=48", "expected STEP:key=value"),
    ("4:width=48", "keys are mlp_width, heads, head_dim, hidden, add_layers"),
    ("4:hidden=4.5", "values are integers"),
])
def test_bench_rejects_bad_growth_specs(spec, pattern, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--grow", spec])
    assert pattern in capsys.readouterr().err


def test_bench_without_transformers_says_what_to_install_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the bench extra were not installed
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("the benchmark started without transformers"))
    with pytest.raises(SystemExit, match=r"needs transformers: pip install 'geomopt\[bench\]'"):
        bench.run_bench(["--preset", "tiny", "--quiet"])


def test_block_size_defaults_to_a_quarter_of_the_presets_hidden_size():
    for preset in bench.PRESETS:
        args = bench.parse_args(["--preset", preset])
        assert args.block_size == args.hidden // 4 and args.block_size >= 8
        assert bench.parse_args(["--preset", preset, "--hidden", "64"]).block_size == args.block_size  # the preset's
    assert bench.parse_args(["--preset", "60m", "--block-size", "16"]).block_size == 16


def test_lr_ref_block_is_poets_own_default_unless_given():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    for argv, want in (([], 32), (["--lr-ref-block", "none"], None), (["--lr-ref-block", "16"], 16)):
        args = bench.parse_args(["--preset", "tiny", *argv])
        for name in ("poet", "poet-lean", "poet-fs"):
            spec = registry.get(name)
            assert spec.build_for_bench(model, spec.bench_lr, args).defaults["lr_ref_block"] == want, (name, argv)
