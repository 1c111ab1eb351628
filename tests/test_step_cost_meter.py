"""benchmarks/step_cost.py: the meter counts ops, bytes and host syncs as its docstring defines them, on cases
whose counts are known, and a tiny preset runs end to end (no timing is asserted)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import step_cost  # noqa: E402


def test_known_counts():
    x, y = torch.zeros(100), torch.ones(100)
    with step_cost.StepCost() as m:
        x.add_(y)  # one op reading x and y and writing x: x counts once
    assert (m.ops, m.bytes, m.syncs) == (1, 800, 0)
    with step_cost.StepCost() as m:
        x.view(10, 10)  # a view: an op, no bytes
        torch.empty_like(x)  # an allocation that writes nothing: no bytes
        torch.ops.aten._unsafe_view(x, (10, 10))  # an alias aten does not mark as a view: no bytes either
    assert (m.ops, m.bytes, m.syncs) == (3, 0, 0)
    with step_cost.StepCost() as m:
        y.view(1, 100).expand(7, 100).sum(0)  # a broadcast operand is read once: 400 + 400 bytes
    assert m.bytes == 800
    with step_cost.StepCost() as m:
        z = x + y  # reads two tensors, writes a third
        float(z.sum())  # sum (reads z, writes a scalar), then a host sync reading the scalar
        x[:50].add_(1)  # a view (50 entries), then an in-place op on it
        x.tolist()  # a device-to-host copy on a GPU
    assert m.ops == 5 and m.syncs == 2  # tolist is no aten op, but a sync
    assert m.bytes == 1200 + (400 + 4) + 4 + 200
    assert m.bytes_by_op == {"add": 1200, "add_": 200, "sum": 404, "_local_scalar_dense": 4}  # by op, same total


def test_torchs_fused_adamw_moves_each_of_its_four_tensors_once():
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 10))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.randn(4, 30)).sum().backward()
    opt.step()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with step_cost.StepCost() as m:
        opt.step()
    assert m.syncs == 0 and 4.0 <= m.bytes / param_bytes < 4.05  # weights, gradients and two moments


def test_a_tiny_preset_reports_every_optimizer_and_step_kind(tmp_path):
    res = step_cost.main(["--preset", "tiny", "--optimizers", "adamw-fused,poet,relora", "--cycle", "3",
                          "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "step_cost.json").read_text())
    assert {(r["optimizer"], r["step"]) for r in saved["rows"]} == {
        (name, kind) for name in ("adamw-fused", "poet", "relora") for kind in ("plain", "merge")}
    assert set(res["results"]) == {"adamw-fused", "poet", "relora"} and saved["info"]["preset"] == "tiny"
    for r in res["results"].values():
        assert r["plain"]["ops"] > 0 and r["merge"]["ops"] >= r["plain"]["ops"] * 0.5
    text = (tmp_path / "step_cost.md").read_text()
    assert "| poet | merge |" in text
    for name, r in res["results"].items():  # the split by op adds up to the step's bytes
        top = r["plain"]["top_bytes"]
        assert top and sum(b for _, b in top) <= r["plain"]["bytes"] and f"| {name} | {top[0][0]} " in text


def _measure(make, layers):
    from torch import nn

    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(24, 24), nn.Tanh()]
    model = nn.Sequential(*mods)
    opt = make(model)
    x = torch.randn(8, 24)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    opt.zero_grad()
    model(x).square().mean().backward()
    with step_cost.StepCost() as m:
        opt.step()
    return m


def test_host_syncs_of_a_plain_step_do_not_grow_with_the_weights():
    """With the fused kernel for the AdamW-routed tensors (torch's loop reads each CPU step count): POET syncs
    twice (the plan's flags, the safeguard's bounds), ReLoRA and DLRA once (the plan's flags), whatever the
    number of weights; POET lean mode with ``capturable=True`` (decisions on the device) never."""
    import geomopt

    makers = {"poet": (lambda m: geomopt.POET(m, lr=1e-2, block_size=8, merge_every=50, fused=True), 2),
              "poet-lean": (lambda m: geomopt.POET(m, lr=1e-2, block_size=8, store_base=False, fused=True), 2),
              "relora": (lambda m: geomopt.ReLoRAReset(m, lr=1e-2, rank=4, reset_every=50, fused=True), 1),
              "dlra": (lambda m: geomopt.DLRAMomentum(m, lr=1e-2, rank=4, fused=True), 1),
              "poet-lean+capturable": (lambda m: geomopt.POET(m, lr=1e-2, block_size=8, store_base=False,
                                                              capturable=True, foreach=True), 0)}
    for name, (make, want) in makers.items():
        assert _measure(make, 2).syncs == _measure(make, 6).syncs == want, name


def test_ops_of_a_grouped_step_do_not_grow_with_the_weights():
    """With the multi-tensor path (``fused=True`` here; the default on a GPU) the weights of one shape share
    their calls: a plain step of 2 layers and of 6 layers dispatch the same number of ops (POET in both modes,
    ReLoRA, DLRA); the per-weight path (``foreach=False``) grows with the weights."""
    import geomopt

    for kw in (dict(), dict(store_base=False), dict(store_base=False, capturable=True), None, "dlra"):
        def make(m, flags):
            if kw == "dlra":
                return geomopt.DLRAMomentum(m, lr=1e-2, rank=4, **flags)
            if kw is None:
                return geomopt.ReLoRAReset(m, lr=1e-2, rank=4, reset_every=50, **flags)
            return geomopt.POET(m, lr=1e-2, block_size=8, merge_every=50, **flags, **kw)

        grouped = [_measure(lambda m: make(m, dict(fused=True)), n).ops for n in (2, 6)]
        alone = [_measure(lambda m: make(m, dict(foreach=False)), n).ops for n in (2, 6)]
        assert grouped[0] == grouped[1], (kw, grouped)
        assert alone[1] > alone[0] + 4 * 10, (kw, alone)  # POET: about 55 ops per weight, ReLoRA 12
