"""Exact resume (a fresh process, weights_only=True) landing before, on and after a merge / reset step, and
crash resume: a loop killed with SIGKILL mid-run and restarted finishes bit-identical to an uninterrupted
run; a truncated checkpoint is refused whole."""
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

import geomopt
from geomopt.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import worker  # noqa: E402

NAMES = list(worker.MAKERS)


def run(*args):
    out = subprocess.run([sys.executable, os.path.join(HERE, "worker.py"), *map(str, args)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("name", NAMES)
def test_resume_in_a_fresh_process_is_bit_identical(name, tmp_path):
    # the merge / reset happens in step 5: resume just before (4), on (5) and just after (6) it
    total, points = 11, [4, 5, 6]
    run(name, tmp_path / "full.pt", "--steps", f"0:{total}", "--save-at", ",".join(map(str, points)))
    run(name, tmp_path / "resumed.pt", "--steps", f"0:{total}", "--resume",
        *[tmp_path / f"full.pt.at{n}" for n in points])
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    for i, n in enumerate(points):
        resumed = torch.load(tmp_path / f"resumed.pt.{i}", weights_only=True)
        for key, value in full["model"].items():
            assert torch.equal(value, resumed["model"][key]), (n, key)
    cycles = [st.get("merges", st.get("resets")) for st in full["opt"]["state"].values() if "step" in st]
    if name != "dlra":
        assert max(c for c in cycles if c is not None) == 2  # the runs did cross cycle boundaries


@pytest.mark.parametrize("name", NAMES)
def test_killed_and_restarted_run_finishes_bit_identical(name, tmp_path):
    total, every = 20, 3
    run(name, tmp_path / "clean.ckpt", "--steps", f"0:{total}", "--every", every, "--crash-safe")
    kill_at = random.Random(name).randint(4, total - 3)
    ckpt = tmp_path / "crash.ckpt"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), name, str(ckpt), "--steps",
                             f"0:{total}", "--every", str(every), "--crash-safe"], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout:
        if line.strip() == f"step {kill_at}":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not os.path.exists(f"{ckpt}.final")
    assert read_checkpoint(ckpt)["step"] == kill_at // every * every  # the last complete checkpoint
    out = run(name, ckpt, "--steps", f"0:{total}", "--every", every, "--crash-safe")
    assert f"resumed at {kill_at // every * every}" in out
    clean = torch.load(f"{tmp_path / 'clean.ckpt'}.final", weights_only=True)
    again = torch.load(f"{ckpt}.final", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(clean, again))


@pytest.mark.parametrize("cut", [0.5, 0.999, 10])
def test_a_truncated_checkpoint_is_refused_and_nothing_is_loaded(cut, tmp_path):
    model = worker.make_model()
    opt = worker.MAKERS["poet"](model)
    for step in range(3):
        worker.train_step(model, opt, step)
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, opt, step=3)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * cut)] if cut < 1 else raw[:cut])
    fresh = worker.make_model()
    fresh_opt = worker.MAKERS["poet"](fresh)
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(path, fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters())) and len(fresh_opt.state) == 0


def test_a_corrupted_or_foreign_checkpoint_is_refused(tmp_path):
    model = worker.make_model()
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, None, step=1)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted: its SHA-256"):
        read_checkpoint(path)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a geomopt checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")
    save_checkpoint(path, model, None)
    other = torch.nn.Sequential(torch.nn.Linear(13, 22))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(path, other)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(path, model, geomopt.POET(model, lr=1e-3))
