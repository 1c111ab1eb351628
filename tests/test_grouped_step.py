"""Weights of one shape stepped together (``foreach=True``: stacked dense calls, one multi-tensor write) equal the
same optimizer stepping them one by one, in float64: every POET mode, ragged blocks, row shards, merges and the
safeguard's early merges; ReLoRA through resets, DLRA in both methods; the grouped column operations equal their
per-weight references; fingerprints taken together still tell an edited weight from an untouched one."""
import pytest
import torch
from chain_model import make_chain, train_chain
from conftest import rel_err

import geomopt
from geomopt.geometry.blocks import (
    block_layout,
    col_block_grad,
    col_block_grads,
    rotate_cols,
    rotate_cols_stacked_,
    stacked_rows,
)
from geomopt.optim import poet_step

# repeated shapes (the groups), ragged blocks of 8 (20 = 2 x 8 + 4, 13 = 8 + 5, 12 = 8 + 4)
SHAPES = [(20, 13), (20, 20), (20, 20), (20, 20), (12, 20), (12, 12), (12, 12)]

CASES = {"paper": {}, "lean": dict(store_base=False), "fs": dict(mode="fs", block_size=0.5),
         "safeguard": dict(max_q_norm=0.05), "rows2": dict(row_shards=2), "exact": dict(exact_cayley=True),
         "lean-safeguard": dict(store_base=False, max_q_norm=0.05), "fused": dict(foreach=None, fused=True)}


def train(make, steps=24, seed=3, edit=None):
    return train_chain(make, SHAPES, steps, seed, edit)


def sizes_seen(monkeypatch):
    seen = []
    make = poet_step.make_groups

    def spy(works, cache, out):
        groups = make(works, cache, out)
        seen.extend(len(gr.works) for gr in groups)
        return groups

    monkeypatch.setattr("geomopt.optim.poet.make_groups", spy)
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_poet_equals_the_per_weight_step(case, float64, monkeypatch):
    def make(params):
        kw = dict(lr=2e-2, block_size=8, merge_every=7, foreach=True) | CASES[case]
        return geomopt.POET(params, **kw)

    seen = sizes_seen(monkeypatch)
    together, opt = train(make)
    assert max(seen) == 3 and sum(seen) == 24 * len(SHAPES)  # the three 20 x 20 weights went together
    if "safeguard" in case:
        assert opt.stats["early_merges"] > 0
    assert opt.stats["merges"] > 0
    seen.clear()
    monkeypatch.setattr(geomopt.POET, "_together", staticmethod(lambda group, params: False))
    alone, ref = train(make)
    assert set(seen) == {1}
    for a, b in zip(together, alone):
        assert rel_err(a, b) < 1e-12
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        for key in ("q_row", "q_col"):
            for x, y in zip(opt.state[p].get(key, []), ref.state[q].get(key, [])):
                assert (x - y).abs().max() < 1e-12
        assert opt.state[p]["step"] == ref.state[q]["step"]


def test_grouped_column_operations_equal_the_per_weight_references(float64):
    g = torch.Generator().manual_seed(0)
    lead, m, n, b = 3, 6, 20, 8
    x, grad = torch.randn(lead, m, n, generator=g), torch.randn(lead, m, n, generator=g)
    blocks = [block_layout(torch.randperm(n, generator=g), b, False) for _ in range(lead)]
    for j in range(2):  # the full blocks and the ragged one
        idx = torch.stack([bl[j] for bl in blocks])
        e = torch.randn(idx.shape[0] * idx.shape[1], idx.shape[2], idx.shape[2], generator=g)
        want = torch.cat([col_block_grad(x[i], grad[i], idx[i]) for i in range(lead)])
        assert (col_block_grads(x, grad, idx) - want).abs().max() < 1e-12
        per = e.view(lead, -1, *e.shape[1:])
        want = torch.stack([rotate_cols(x[i], idx[i], per[i]) for i in range(lead)])
        assert (rotate_cols_stacked_(x.clone(), idx, e) - want).abs().max() < 1e-12
    rows = stacked_rows(torch.stack([bl[0] for bl in blocks]), m)
    assert torch.equal(rows.view(lead, -1, b) - torch.arange(lead).view(-1, 1, 1) * m, torch.stack([bl[0]
                                                                                                   for bl in blocks]))


def test_grouped_fingerprints_catch_an_edit_and_only_it(monkeypatch):
    """Paper mode with weights stepped together: one weight of a group edited from outside is re-based, its
    group mates are not; a step in which a group mate has no gradient (the group changes) re-bases nothing."""
    def edit(step, layers):
        if step == 5:
            layers[1].weight.grad = None  # a step without it: the others' group differs
        if step == 9:
            with torch.no_grad():
                layers[2].weight.mul_(1.5)

    _, opt = train(lambda params: geomopt.POET(params, lr=1e-2, block_size=8, merge_every=50, foreach=True),
                   steps=12, edit=edit)
    rebases = [opt.state[p].get("rebases", 0) for p in opt.param_groups[0]["params"][: len(SHAPES)]]
    assert rebases == [0, 0, 1, 0, 0, 0, 0]


def test_grouped_step_writes_what_the_in_place_step_writes_for_bf16_weights(monkeypatch):
    """bf16 weights (fp32 factors) go through the stacked copy and a converting multi-tensor write: equal to the
    per-weight step's bits."""
    def make(params):
        for _, p in params:
            p.data = p.data.bfloat16()
        return geomopt.POET(params, lr=2e-2, block_size=8, merge_every=5, foreach=True)

    def run(together):
        layers, scale = make_chain(SHAPES[1:4], 0)
        opt = make([(f"w{i}", layer.weight) for i, layer in enumerate(layers)])
        monkeypatch.setattr(geomopt.POET, "_together", staticmethod(lambda group, params: together))
        g = torch.Generator().manual_seed(1)
        for _ in range(7):
            for layer in layers:
                layer.weight.grad = torch.randn(layer.weight.shape, generator=g).bfloat16()
            opt.step()
        return [layer.weight.detach().clone() for layer in layers]

    for a, b in zip(run(True), run(False)):
        assert a.dtype == torch.bfloat16 and (a.float() - b.float()).abs().max() <= 2 ** -7 * b.abs().max()


RELORA_CASES = {"plain": {}, "warm-start": dict(warm_start_steps=3), "reset": dict(prune="reset"),
                "fused": dict(foreach=None, fused=True)}


@pytest.mark.parametrize("case", list(RELORA_CASES))
def test_grouped_relora_equals_the_per_weight_step(case, float64, monkeypatch):
    """ReLoRAReset with the weights of one shape stepped together (stacked B^T G, G A^T and rewrite, one
    multi-tensor add) equals it weight by weight, through resets."""
    def make(params):
        kw = dict(lr=2e-2, rank=3, reset_every=5, foreach=True) | RELORA_CASES[case]
        return geomopt.ReLoRAReset(params, **kw)

    runs = []
    key_runs = geomopt.optim.relora.key_runs
    monkeypatch.setattr("geomopt.optim.relora.key_runs", lambda *a: runs.append(out := key_runs(*a)) or out)
    together, opt = train(make)
    assert max(len(r) for rs in runs for r in rs) == 3 and opt.stats["resets"] > 0
    monkeypatch.setattr(geomopt.ReLoRAReset, "_together", staticmethod(lambda group, params: False))
    alone, _ = train(make)
    for a, b in zip(together, alone):
        assert rel_err(a, b) < 1e-12


DLRA_CASES = {"heavy_ball": {}, "adam": dict(method="adam"), "stabilize": dict(stabilize_every=3),
              "adam-max-rank": dict(method="adam", max_rank=5)}


@pytest.mark.parametrize("case", list(DLRA_CASES))
def test_grouped_dlra_equals_the_per_weight_step(case, float64, monkeypatch):
    """DLRAMomentum with the weights of one shape and rank stacked (one batched projection, QR, SVD and transport
    per stage, one multi-tensor write) equals it weight by weight."""
    def make(params):
        return geomopt.DLRAMomentum(params, **(dict(lr=2e-2, rank=4, foreach=True) | DLRA_CASES[case]))

    runs = []
    key_runs = geomopt.optim.dlra.key_runs
    monkeypatch.setattr("geomopt.optim.dlra.key_runs", lambda *a: runs.append(out := key_runs(*a)) or out)
    together, _ = train(make)
    assert max(len(r) for rs in runs for r in rs) == 3
    monkeypatch.setattr(geomopt.DLRAMomentum, "_together", staticmethod(lambda group, params: False))
    alone, _ = train(make)
    for a, b in zip(together, alone):
        assert rel_err(a, b) < 1e-12


def test_dlra_with_rank_adaptivity_steps_weight_by_weight(float64, monkeypatch):
    """``rank_tol`` chooses each weight's rank from its own singular values: those weights never share a call."""
    runs = []
    key_runs = geomopt.optim.dlra.key_runs
    monkeypatch.setattr("geomopt.optim.dlra.key_runs", lambda *a: runs.append(out := key_runs(*a)) or out)
    _, opt = train(lambda ps: geomopt.DLRAMomentum(ps, lr=2e-2, rank=4, rank_tol=0.1, foreach=True), steps=4)
    assert runs and all(len(r) == 1 for rs in runs for r in rs) and opt.ranks
