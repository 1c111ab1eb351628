"""torch.compile of the model together with a geomopt optimizer: it trains, the optimizer's in-place weight
rewrites cause no graph break and no recompilation in the model's graph (the step itself stays eager)."""
import pytest
import torch
from grow_models import llama
from optim_table import methods

from geomopt.data import load_corpus, sample_batch

dynamo = pytest.importorskip("torch._dynamo")

MAKERS = methods(3, block_size=8, rank=4, alpha=8)


# inductor (what users get by default) for POET, about 25 s of compilation on 2 cores; aot_eager (the same
# dynamo graph capture and autograd, no code generation) for the others
BACKENDS = {"poet": "inductor", "relora": "aot_eager", "dlra": "aot_eager"}


@pytest.mark.parametrize("name", list(MAKERS))
def test_compiled_model_trains_without_graph_breaks_or_recompiles(name):
    dynamo.reset()
    dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager, compiled_model = llama(), llama()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend=BACKENDS[name])
    opts = [MAKERS[name](eager), MAKERS[name](compiled_model)]
    train, _ = load_corpus(max_bytes=100_000)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(8):  # crosses merges / resets
        batch = sample_batch(train % 64, 8, 16, gen)
        step = []
        for model, opt in zip((eager, compiled), opts):
            model.train()
            opt.zero_grad()
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            step.append(loss.item())
        losses.append(step)
    assert dict(dynamo.utils.counters["graph_break"]) == {}
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, never recompiled after steps
    assert losses[-1][1] < losses[0][1]
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        assert float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12)) < 1e-4
