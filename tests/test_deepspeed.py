"""DeepSpeed (CPU accelerator, gloo, one process): without ZeRO (stage 0) a geomopt client optimizer steps through
the engine exactly as in a plain loop (fp32: bit for bit; bf16: it trains its fp32 master weights); ZeRO stages 1
and 2 hand the optimizer flat 1-D partitions instead of the weights, so the first step refuses with an error that
names DeepSpeed, before any weight changes (without the check the methods would silently step as AdamW)."""
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
WORKER = os.path.join(os.path.dirname(__file__), "deepspeed_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_PORT=free_port(), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, WORKER], env=env, capture_output=True, text=True, timeout=600)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert run.returncode == 0 and line, (run.stdout + run.stderr)[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("name", ["poet", "relora", "dlra"])
def test_stage0_steps_like_a_plain_loop(results, name):
    assert results[f"{name}-stage0"] == {"routed": 2, "equal": True}
    assert results[f"{name}-stage0-bf16"] == {"routed": 2, "changed": True, "dtype": "torch.bfloat16"}


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("name", ["poet", "relora", "dlra"])
def test_zero_stages_1_and_2_are_refused_before_anything_changes(results, name, stage):
    got = results[f"{name}-stage{stage}"]
    assert got["unchanged"] and "held 2 weight(s) routed to the method" in got["error"]
    assert "DeepSpeed ZeRO stages 1 and 2" in got["error"] and "shapes [(1024,)]" in got["error"]
