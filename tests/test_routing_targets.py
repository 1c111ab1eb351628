"""``include`` / ``exclude``: module-name patterns choose which weights get the method, on a model and on named
parameters, for every optimizer; patterns that match nothing, bad patterns and unnamed parameters are refused."""
import pytest
import torch
from torch import nn

import geomopt
from geomopt.optim.routing import is_factorized

MAKERS = [lambda m, **k: geomopt.POET(m, block_size=4, **k), lambda m, **k: geomopt.ReLoRAReset(m, rank=2, **k),
          lambda m, **k: geomopt.DLRAMomentum(m, rank=2, **k)]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.ModuleDict({k: nn.Linear(8, 8) for k in ("q_proj", "v_proj")})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(8, 16), "down_proj": nn.Linear(16, 8)})
        self.attention = nn.ModuleDict({"output": nn.ModuleDict({"dense": nn.Linear(8, 8)})})  # BERT naming


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(8, 16, bias=False)


def routed(opt):
    names = {id(p): n for n, p in TINY.named_parameters()}
    return sorted(names[id(p)] for g in opt.param_groups for p in g["params"] if is_factorized(p, g))


TINY = Tiny()
ALL = [f"layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj",
                                                        "mlp.down_proj", "attention.output.dense")]


@pytest.mark.parametrize("make", MAKERS)
def test_default_include_and_exclude(make):
    assert routed(make(TINY)) == sorted(ALL)  # BERT's attention.output.dense is routed; the untied lm_head is not
    assert routed(make(TINY, include="q_proj")) == ["layers.0.self_attn.q_proj.weight",
                                                    "layers.1.self_attn.q_proj.weight"]
    assert routed(make(TINY, include=r"layers\.\d+\.mlp\..*")) == sorted(n for n in ALL if ".mlp." in n)
    assert routed(make(TINY, exclude=["v_proj", "layers.1.mlp.up_proj"])) == sorted(
        n for n in ALL if "v_proj" not in n and n != "layers.1.mlp.up_proj.weight")
    assert routed(make(TINY, include=["lm_head"])) == ["lm_head.weight"]  # include overrides the name rule
    assert routed(make(TINY.named_parameters(), include="q_proj", exclude=r"layers\.1\..*")) == [
        "layers.0.self_attn.q_proj.weight"]


def test_include_never_routes_what_cannot_be_factorized():
    with pytest.raises(ValueError, match=r"include: \['embed_tokens'\] match no module with a routable weight"):
        geomopt.POET(TINY, include=["embed_tokens", "q_proj"], block_size=4)  # an Embedding is not an nn.Linear


@pytest.mark.parametrize("kw,err,words", [
    (dict(include="q_prj"), ValueError, r"include: \['q_prj'\] match no module"),
    (dict(exclude=["v_proj", "nope"]), ValueError, r"exclude: \['nope'\] match no module"),
    (dict(include="("), ValueError, "include: '\\(' is not a valid regular expression"),
    (dict(include=3), TypeError, "include must be a module-name pattern"),
    (dict(exclude=[]), TypeError, "exclude must be a module-name pattern"),
])
def test_bad_patterns_are_refused_by_name(kw, err, words):
    with pytest.raises(err, match=words):
        geomopt.POET(TINY, block_size=4, **kw)


def test_patterns_need_names():
    with pytest.raises(ValueError, match="pass the model or model.named_parameters"):
        geomopt.POET([p for p in TINY.parameters() if p.dim() == 2], include="q_proj")


def test_an_included_model_steps():
    model = Tiny()
    opt = geomopt.POET(model, include="q_proj", block_size=4)
    before = model.layers[0].self_attn.q_proj.weight.detach().clone()
    model.lm_head(model.layers[0].self_attn.q_proj(model.embed_tokens(torch.arange(4)))).square().sum().backward()
    opt.step()
    assert not torch.equal(before, model.layers[0].self_attn.q_proj.weight)
    assert opt.state[model.layers[0].self_attn.q_proj.weight]  # stepped by POET: it has POET's state
    assert "perm_row" in opt.state[model.layers[0].self_attn.q_proj.weight]
