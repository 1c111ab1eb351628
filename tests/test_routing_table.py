"""``opt.routing()``: one row per parameter with its name, shape, route and reason, equal to what the optimizer
steps; the one-line summary in ``repr(opt)``; the table survives deepcopy, pickling and a state_dict round trip."""
import copy
import pickle

import pytest
import torch
from torch import nn

import geomopt
from geomopt.optim.routing import is_factorized

MAKERS = {"POET": lambda m, **k: geomopt.POET(m, block_size=4, **k),
          "ReLoRAReset": lambda m, **k: geomopt.ReLoRAReset(m, rank=2, **k),
          "DLRAMomentum": lambda m, **k: geomopt.DLRAMomentum(m, rank=2, **k)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.q_proj, self.up = nn.Linear(8, 8), nn.Linear(8, 12)
        self.conv = nn.Conv1d(8, 8, 1)
        self.scale = nn.Parameter(torch.ones(4, 4))  # 2-D, but no Linear owns it
        self.lm_head = nn.Linear(12, 16, bias=False)


def expected(model, opt):
    """The routes, from what the optimizer steps (an independent read of its groups)."""
    method = next(k for k in MAKERS if type(opt).__name__.startswith(k))
    return {n: method if any(p is q and is_factorized(q, g) for g in opt.param_groups for q in g["params"])
            else "AdamW" for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", MAKERS)
def test_rows_agree_with_what_is_stepped_and_say_why(method):
    model = Net()
    opt = MAKERS[method](model, exclude="up")
    rows = opt.routing()
    assert [r.name for r in rows] and sorted(r.name for r in rows) == sorted(n for n, _ in model.named_parameters())
    assert {r.name: r.route for r in rows} == expected(model, opt)
    assert {r.name: r.shape for r in rows} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    why = {r.name: r.reason for r in rows}
    assert why["q_proj.weight"] == "Linear weight" and why["up.weight"] == "exclude matched 'up'"
    assert why["embed.weight"].startswith("nn.Embedding") and why["q_proj.bias"] == "1-D"
    assert why["lm_head.weight"] == "name rule: 'lm_head.weight'" and why["conv.weight"] == "3-D"
    assert why["scale"] == "2-D, not a Linear weight (Net)"
    text = str(rows)
    assert all(r.name in text and r.reason in text for r in rows)
    summary = f"routing: 1 tensor (64 values) to {method}, 8 tensors (524 values) to AdamW"
    assert rows.summary() == summary and summary in repr(opt) and repr(opt).startswith(type(opt).__name__)


def test_include_and_unnamed_groups_and_added_groups():
    model = Net()
    opt = geomopt.POET(model.named_parameters(), include="lm_head", block_size=4)
    routed = {r.name: r.reason for r in opt.routing() if r.route == "POET"}
    assert routed == {"lm_head.weight": "include matched 'lm_head'"}
    opt.add_param_group({"params": [("extra", nn.Parameter(torch.randn(8, 8)))]})
    assert opt.routing()[-1] == ("extra", (8, 8), "POET", "2-D, in a param group (groups are not routed by name)")
    from_model = geomopt.POET(model, block_size=4)
    from_model.add_param_group({"params": [nn.Parameter(torch.randn(8, 8))], "factorize": False})
    assert from_model.routing()[-1] == ("group2.0", (8, 8), "AdamW", "its group has factorize=False")
    with pytest.warns(UserWarning):
        plain = geomopt.POET([{"params": [model.q_proj.weight]}, {"params": [model.up.weight], "factorize": False}],
                             block_size=4)
    assert [tuple(r[2:]) for r in plain.routing()] == [
        ("POET", "2-D, in a param group (groups are not routed by name)"), ("AdamW", "its group has factorize=False")]
    frozen = Net()
    frozen.q_proj.weight.requires_grad_(False)
    row = next(r for r in geomopt.POET(frozen, block_size=4).routing() if r.name == "q_proj.weight")
    assert row.route == "POET" and row.reason.endswith("requires_grad=False (steps once it has a gradient)")


@pytest.mark.parametrize("method", MAKERS)
def test_the_table_survives_copies_and_checkpoints(method):
    model = Net()
    opt = MAKERS[method](model, exclude="up")
    rows = list(opt.routing())
    assert list(copy.deepcopy(opt).routing()) == rows
    assert list(pickle.loads(pickle.dumps(opt)).routing()) == rows
    fresh = MAKERS[method](model, exclude="up")
    fresh.load_state_dict(opt.state_dict())
    assert list(fresh.routing()) == rows
    old = pickle.loads(pickle.dumps(opt))
    del old._routes  # an optimizer pickled before the table existed: reasons from the groups, names by position
    assert [r.route for r in old.routing()] == [r.route for r in rows]


@pytest.mark.parametrize("method", MAKERS)
def test_a_group_whose_weights_were_replaced_by_flat_tensors_is_refused(method):
    """What DeepSpeed ZeRO 1/2 do to a client optimizer (tests/test_deepspeed.py runs the real thing)."""
    model = Net()
    opt = MAKERS[method](model)
    group = opt.param_groups[0]
    flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).requires_grad_()
    flat.grad = torch.ones_like(flat)
    group["params"] = [flat]
    before = flat.detach().clone()
    with pytest.raises(RuntimeError, match=r"param group 0 held 2 weight\(s\) routed to the method .* DeepSpeed ZeRO"):
        opt.step()
    assert torch.equal(flat, before) and not opt.state


def test_factorize_set_to_false_mid_run_is_not_mistaken_for_replaced_tensors():
    model = Net()
    opt = geomopt.POET(model, block_size=4)
    opt.param_groups[0]["factorize"] = False  # documented: the weights move to AdamW
    model.lm_head(model.up(model.q_proj(model.embed(torch.arange(3))))).sum().backward()
    opt.step()
    assert all(r.route == "AdamW" for r in opt.routing())
