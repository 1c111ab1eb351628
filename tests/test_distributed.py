"""DDP (gloo, 2 CPU processes): every rank ends bit-identical, and equal to one process on the same global
batch to 1e-6 (float64, so that the comparison measures the method and not fp32 rounding of the averaged
gradients); nothing but DDP's gradient all-reduce is communicated (permutations, factors and resets come
from the generators saved in each rank's state)."""
import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def launch(world, name, tmp_path, mode="step"):
    init = tmp_path / f"init-{name}-{world}-{mode}"
    outs = [tmp_path / f"{name}-{world}-{mode}-rank{r}.pt" for r in range(world)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), name, str(outs[r]), str(init), mode],
                              env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    return [torch.load(o, weights_only=True) for o in outs]


@pytest.mark.parametrize("name", ["poet", "relora", "dlra"])
def test_ddp_ranks_agree_bitwise_and_match_one_process(name, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    rank0, rank1 = launch(2, name, tmp_path)
    (single,) = launch(1, name, tmp_path)
    for a, b, c in zip(rank0, rank1, single):
        assert torch.equal(a, b)
        assert float((a - c).norm() / c.norm().clamp_min(1e-12)) < 1e-6


@pytest.mark.parametrize("name", ["poet", "relora"])
def test_step_in_backward_under_ddp_with_accumulation_matches_one_process(name, tmp_path):
    """geomopt.step_in_backward on a DDP module, two micro-batches a step (the first under no_step): each
    bucket is averaged, then stepped inside backward; equal to one process's ordinary step to 1e-6."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    rank0, rank1 = launch(2, name, tmp_path, "in_backward")
    (single,) = launch(1, name, tmp_path)
    for a, b, c in zip(rank0, rank1, single):
        assert torch.equal(a, b)
        assert float((a - c).norm() / c.norm().clamp_min(1e-12)) < 1e-6


FSDP_WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")


@pytest.mark.parametrize("name", ["poet", "poet-grouped", "relora", "dlra"])
def test_fsdp2_steps_sharded_parameters_and_restores_from_a_distributed_checkpoint(name, tmp_path):
    """fully_shard (gloo, 2 processes): the sharded run equals the unsharded one (POET: with the row
    permutation cut at the shard boundary, row_shards=2) to 1e-5, and a run restored from
    torch.distributed.checkpoint (get/set_optimizer_state_dict) after step 4 ends bit-identical. Each steps its
    local rows: no weight-shaped DTensor is gathered whole (DLRA: only at its first step, for the starting SVD),
    and the row state (POET's W0, ReLoRA's B, DLRA's U) holds half the rows on each rank."""
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path / f"fsdp-{name}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, FSDP_WORKER, str(r), "2", name, str(out), str(tmp_path / "init"),
                               str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    result = torch.load(out, weights_only=True)
    (single,) = launch(1, "poet-rows2" if name.startswith("poet") else name, tmp_path)  # weight by weight
    for a, b, c in zip(result["full"], result["restored"], single):
        assert torch.equal(a, b)
        assert float((a - c).norm() / c.norm().clamp_min(1e-12)) < 1e-5
    weights = set(result["weights"])
    gathered = [(step, s) for step, s in result["gathered"] if s in weights]
    if name == "dlra":  # one gather per routed weight, at its first step: the SVD that starts U, S, V
        assert gathered and {step for step, _ in gathered} == {0}, gathered
    else:
        assert gathered == [], gathered
    row_state = result["local_state"][{"poet": "w0", "poet-grouped": "w0", "relora": "B", "dlra": "U"}[name]]
    assert row_state and all(loc[0] * 2 == full[0] and loc[1:] == full[1:] for full, loc in row_state)


def test_fsdp2_lean_mode_on_bf16_weights_shards_its_rounding_buffer_and_restores_it(tmp_path):
    """Lean mode on bf16 weights under fully_shard (gloo, 2 processes): each routed weight's rounding buffer
    (``compensate``) holds half the rows on each rank, no weight is gathered whole, and a run restored from
    torch.distributed.checkpoint after step 4 ends bit-identical (the buffer is saved and loaded with the
    rest). The sharded run is not compared with one process: bf16 gradients reduced over two ranks round
    differently from one batch, and at lr 1e-2 the runs part by a few percent with or without the buffer."""
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path / "fsdp-bf16.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, FSDP_WORKER, str(r), "2", "poet-lean-bf16", str(out),
                               str(tmp_path / "init"), str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    result = torch.load(out, weights_only=True)
    for a, b in zip(result["full"], result["restored"]):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    weights = set(result["weights"])
    assert [s for _, s in result["gathered"] if s in weights] == []
    comps = result["local_state"]["comp"]
    assert len(comps) == len(result["weights"]) - 2  # every routed weight: all 2-D ones but embeddings and head
    assert all(loc[0] * 2 == full[0] and loc[1:] == full[1:] for full, loc in comps)
