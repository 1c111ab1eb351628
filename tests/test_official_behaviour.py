"""The arguments that reproduce the official POET and ReLoRA code, checked in float64 against the official formulas
written out here: the Cayley-Neumann polynomials, POETAdamW's update, ReLoRA's reset point and warm-up ramp."""
import math

import pytest
import torch
from chain_model import chain_forward, make_chain
from conftest import rel_err
from poet_reference import RefPOETLinear
from torch import nn

import geomopt
from geomopt.geometry import cayley_neumann, cayley_series, pack_skew, unpack_skew
from geomopt.optim import LegacyAdamW
from geomopt.optim.poet_settings import RotationMap
from geomopt.schedules import jagged_cosine

SHAPES = [(24, 13), (20, 24), (10, 20), (7, 10)]


def eye_like(Q):
    return torch.eye(Q.shape[-1], dtype=Q.dtype).expand_as(Q)


def official_torch_map(Q):
    """The official torch fallback: 2 (Q + Q^2 + Q^3) + 2 Q^4, plus I on the diagonal."""
    Q2 = Q @ Q
    return 2.0 * (Q + Q2 + Q2 @ Q) + 2.0 * Q2 @ Q2 + eye_like(Q)


def official_kernel_map(Q):
    """The polynomial of the official Triton kernel: I + 2Q + 2Q^2 + 2Q^3 + Q^4."""
    p = [torch.linalg.matrix_power(Q, j) for j in range(5)]
    return p[0] + 2 * p[1] + 2 * p[2] + 2 * p[3] + p[4]


def random_generators(n, b, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, b * (b - 1) // 2, generator=g, dtype=torch.float64) * scale


def test_series_form_is_the_official_torch_polynomial():
    q = random_generators(6, 8, 0.05)
    Q = unpack_skew(q, 8)
    assert rel_err(cayley_series(q, 8, 5), official_torch_map(Q)) < 1e-15
    for k in range(2, 8):
        expect = eye_like(Q) + 2 * sum(torch.linalg.matrix_power(Q, j) for j in range(1, k))
        assert rel_err(cayley_series(q, 8, k), expect) < 1e-14, k


def test_paper_form_at_three_terms_is_the_official_kernel_polynomial():
    q = random_generators(6, 8, 0.05, seed=1)
    assert rel_err(cayley_neumann(q, 8, 3), official_kernel_map(unpack_skew(q, 8))) < 1e-14


@pytest.mark.parametrize("form,k", [("series", 5), ("series", 3), ("paper", 5), ("paper", 4)])
@pytest.mark.parametrize("c", [0.1, 0.3, 0.5])
def test_orthogonality_bound_of_each_form(form, k, c):
    """||I - D D^T||_2 <= RotationMap.residual(c) for blocks with ||Q||_2 = c: the bound the Newton-Schulz
    inverses are sized by."""
    Q = unpack_skew(random_generators(20, 16, 1.0, seed=2), 16)
    Q = Q * (c / torch.linalg.matrix_norm(Q, ord=2)).view(-1, 1, 1)
    q = pack_skew(Q)
    d = cayley_series(q, 16, k) if form == "series" else cayley_neumann(q, 16, k)
    err = torch.linalg.matrix_norm(eye_like(Q) - d @ d.transpose(1, 2), ord=2).max()
    bound = RotationMap(k, form).residual(c)
    assert err <= bound + 1e-14, (float(err), bound)  # rounding: the paper form meets its bound exactly
    assert err > bound / 100  # the bound is of the right order, not vacuous


class OfficialPOETAdamW:
    """The official POETAdamW's update, written from its formulas: eps added to sqrt(v) before the bias
    correction, the POET groups' lr times poet_scale, the decoupled decay after the update."""

    def __init__(self, params, lr, poet_scale=0.5, eps=1e-6, betas=(0.9, 0.999), weight_decay=0.0):
        self.params, self.lr, self.scale, self.eps, self.betas, self.wd = list(params), lr, poet_scale, eps, betas, \
            weight_decay
        self.state = {}

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        lr = self.lr * self.scale
        for p in self.params:
            st = self.state.setdefault(p, {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
            st["t"] += 1
            st["m"] = b1 * st["m"] + (1 - b1) * p.grad
            st["v"] = b2 * st["v"] + (1 - b2) * p.grad * p.grad
            size = lr * math.sqrt(1 - b2 ** st["t"]) / (1 - b1 ** st["t"])
            p -= size * st["m"] / (st["v"].sqrt() + self.eps)
            if self.wd > 0:
                p -= lr * self.wd * p

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def test_legacy_adamw_is_the_official_update(float64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g)
    a, b = nn.Parameter(x.clone()), nn.Parameter(x.clone())
    mine = LegacyAdamW([a], lr=torch.tensor(3e-2), weight_decay=0.1)
    ref = OfficialPOETAdamW([b], lr=3e-2, poet_scale=1.0, weight_decay=0.1)
    for _ in range(12):
        grad = torch.randn(5, 7, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        mine.step(), ref.step()
        assert rel_err(a, b) < 1e-14
    assert rel_err(a, x) > 1e-2  # it moved


@pytest.mark.parametrize("bad,match", [(dict(eps=-1.0), "eps"), (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
                                       (dict(weight_decay="x"), "weight_decay"),
                                       (dict(correct_bias=1), "correct_bias")])
def test_legacy_adamw_names_a_bad_argument(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        LegacyAdamW([nn.Parameter(torch.zeros(2))], **bad)


@pytest.mark.parametrize("store_base", [True, False], ids=["paper-mode", "lean"])
def test_poet_with_the_official_arguments_is_the_official_method(float64, store_base):
    """POET(neumann_form="series", inner=LegacyAdamW, lr=0.5 L, lr_ref_block=None, max_q_norm=None,
    exact_merge=False) steps its
    weights as a module POET with the official torch polynomial whose generators the official POETAdamW steps at
    lr L (poet_scale 0.5), merged every 15 steps with the optimizer state reset."""
    lr, merge_every, steps = 4e-3, 15, 40
    layers, scale = make_chain(SHAPES, 0)
    named = [(f"layers.{i}.weight", layer.weight) for i, layer in enumerate(layers)] + [("scale", scale)]
    opt = geomopt.POET(named, lr=0.5 * lr, dense_lr=lr, block_size=8, neumann_form="series", neumann_terms=5,
                       inner=LegacyAdamW, inner_kwargs=dict(eps=1e-6), lr_ref_block=None, max_q_norm=None,
                       exact_merge=False, merge_every=merge_every, weight_decay=0.0, store_base=store_base)
    for p in [layer.weight for layer in layers] + [scale]:  # a zero step at lr 0 draws the permutations
        p.grad = torch.zeros_like(p)
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    for group in opt.param_groups:
        group["lr"] = 0.5 * lr
    opt.zero_grad()
    refs = [RefPOETLinear(layer.weight, opt.state[layer.weight]["perm_row"], opt.state[layer.weight]["perm_col"], 8,
                          False, official_torch_map) for layer in layers]
    ref_scale = nn.Parameter(scale.detach().clone())
    start = [layer.weight.detach().clone() for layer in layers]

    def factor_opt():
        return OfficialPOETAdamW([q for r in refs for q in list(r.q_row) + list(r.q_col)], lr=lr)

    q_opt, s_opt = factor_opt(), torch.optim.AdamW([ref_scale], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for t in range(1, steps + 1):
        x, y = torch.randn(32, SHAPES[0][1], generator=g), torch.randn(32, SHAPES[-1][0], generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(chain_forward([layer.weight for layer in layers], scale, x), y).backward()
        opt.step()
        q_opt.zero_grad(), s_opt.zero_grad()
        nn.functional.mse_loss(chain_forward([r.weight() for r in refs], ref_scale, x), y).backward()
        q_opt.step(), s_opt.step()
        if t % merge_every == 0:
            with torch.no_grad():
                for r, layer in zip(refs, layers):
                    st = opt.state[layer.weight]
                    r.reset(r.weight(), st["perm_row"], st["perm_col"])
            q_opt = factor_opt()
        with torch.no_grad():
            worst = max([worst] + [rel_err(layer.weight, r.weight()) for r, layer in zip(refs, layers)])
    assert opt.stats["merges"] == len(layers) * (steps // merge_every)
    assert worst < 1e-10, worst
    assert all(rel_err(layer.weight, w) > 1e-3 for layer, w in zip(layers, start))  # the weights moved


def test_neumann_form_is_checked():
    model = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="neumann_form must be one of"):
        geomopt.POET(model, block_size=4, neumann_form="official")
    with pytest.raises(ValueError, match="neumann_terms must be >= 2"):
        geomopt.POET(model, block_size=4, neumann_form="series", neumann_terms=1)


def test_state_dict_without_the_new_settings_loads_and_keeps_the_factors():
    """A state_dict saved before ``neumann_form`` / ``reset_offset`` existed loads; the factors are not rebuilt."""
    for make in (lambda m: geomopt.POET(m, lr=1e-2, block_size=4), lambda m: geomopt.ReLoRAReset(m, lr=1e-2, rank=2)):
        model = nn.Linear(8, 8)
        opt = make(model)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).sum().backward()
            opt.step()
        sd = opt.state_dict()
        for group in sd["param_groups"]:
            group.pop("neumann_form", None), group.pop("reset_offset", None)
        for st in sd["state"].values():
            st.get("built_with", {}).pop("neumann_form", None)
        fresh = make(model)
        fresh.load_state_dict(sd)
        fresh.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        fresh.step()
        assert fresh.stats["rebuilds"] == 0


def relora_run(offset, steps=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))
    opt = geomopt.ReLoRAReset(model, lr=1e-2, rank=2, reset_every=3, reset_offset=offset, restart_warmup_steps=0)
    g = torch.Generator().manual_seed(1)
    resets, weights = [], []
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 12, generator=g)).pow(2).sum().backward()
        opt.step()
        resets.append(opt.stats["resets"] // 2)  # two routed weights
        weights.append(model[0].weight.detach().clone())
    return resets, weights


def test_reset_offset_one_resets_after_steps_kR_plus_1():
    """The official loop merges after update steps R + 1, 2R + 1, ...: ``reset_offset=1``."""
    plain, w_plain = relora_run(0)
    official, w_official = relora_run(1)
    assert plain == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]  # after steps 3, 6, 9
    assert official == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # after steps 4, 7, 10
    assert all(torch.equal(a, b) for a, b in zip(w_plain[:3], w_official[:3]))  # the same until the first reset
    assert not torch.equal(w_plain[3], w_official[3])


def official_relora_schedule(step, *, total, warmup, restart_every, restart_warmup, min_ratio):
    """The official ReLoRA ``get_cosine_schedule_with_multiple_warmups`` lambda (no step adjustment)."""
    if step < warmup:
        return step / max(1, warmup)
    restart_step, restart_number = step % restart_every, step // restart_every
    if restart_step < restart_warmup and step >= restart_every:
        end = (restart_number * restart_every + restart_warmup - warmup) / max(1, total - warmup)
        peak = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * end))
        return restart_step / max(1, restart_warmup) * peak
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def test_ramp_target_end_is_the_official_schedule():
    kw = dict(total=1000, warmup=50, restart_every=200, restart_warmup=40, min_ratio=0.1)
    end = jagged_cosine(total_steps=1000, warmup_steps=50, restart_every=200, restart_warmup_steps=40,
                        min_lr_ratio=0.1, ramp_target="end")
    current = jagged_cosine(total_steps=1000, warmup_steps=50, restart_every=200, restart_warmup_steps=40,
                            min_lr_ratio=0.1)
    worst, ramp_gap = 0.0, 0.0
    for t in range(1000):
        worst = max(worst, abs(end(t) - official_relora_schedule(t, **kw)))
        ramp_gap = max(ramp_gap, abs(end(t) - current(t)))
    assert worst < 1e-15
    assert ramp_gap > 1e-3  # the default ramp is a different curve
    assert end(240) == current(240)  # after the ramp the two agree
    with pytest.raises(ValueError, match="ramp_target must be one of"):
        jagged_cosine(total_steps=10, ramp_target="last")
