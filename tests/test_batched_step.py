"""The fast paths of the optimizer step equal their plain forms: the Cayley-Neumann map in powers of Q^2 (and its
hand-written backward) equals Horner's scheme through autograd, the Newton-Schulz inverse equals an LU inverse,
the batched POET step equals itself cut into runs, in-place rotations equal out-of-place ones, the fused and
foreach Adam paths equal the loop, and the one-norm non-finite check flags exactly what isfinite flags (float64)."""
import chain_model
import pytest
import torch
from chain_model import chain_forward, make_chain
from conftest import rel_err

import geomopt
from geomopt.geometry import cayley_exact, cayley_neumann, rotate_cols, rotate_rows, skew_norm_bound, skew_size
from geomopt.geometry.blocks import block_layout, rotate_cols_, rotate_rows_
from geomopt.geometry.cayley import cayley_neumann_horner, cayley_neumann_with_bound, rotation_inverse
from geomopt.optim import batching, functional
from geomopt.optim.checks import finite_flags

f64 = torch.float64


def rand_q(nblk, b, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nblk, skew_size(b), generator=g, dtype=f64) * scale


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("b", [2, 5, 16, 33])
def test_cayley_neumann_equals_horner_with_its_gradient(b, terms):
    q = rand_q(4, b, seed=b + terms, scale=0.3 / b ** 0.5).requires_grad_()
    up = torch.randn(4, b, b, generator=torch.Generator().manual_seed(terms), dtype=f64)
    fast, plain = cayley_neumann(q, b, terms), cayley_neumann_horner(q, b, terms)
    assert (fast - plain).abs().max() < 1e-14
    g_fast, = torch.autograd.grad(fast, q, up)
    g_plain, = torch.autograd.grad(plain, q, up)
    assert (g_fast - g_plain).abs().max() < 1e-13 * max(1.0, float(g_plain.abs().max()))


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5])
def test_cayley_neumann_backward_passes_gradcheck(terms):
    q = rand_q(2, 6, seed=terms, scale=0.4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: cayley_neumann(x, 6, terms), (q,))


def test_cayley_neumann_keeps_leading_dims_and_refuses_a_second_derivative():
    q = rand_q(6, 4, seed=0, scale=0.2)
    assert torch.equal(cayley_neumann(q.view(2, 3, -1), 4, 5), cayley_neumann(q, 4, 5).view(2, 3, 4, 4))
    leaf = q.clone().requires_grad_()
    g, = torch.autograd.grad(cayley_neumann(leaf, 4, 5).sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|twice"):  # never a silently wrong value
        g.sum().backward()


@pytest.mark.parametrize("terms", [1, 3, 4, 5, 7])
def test_map_with_bound_equals_the_map_and_the_bound(terms):
    q = rand_q(9, 11, seed=terms, scale=0.2)
    r, bound = cayley_neumann_with_bound(q, 11, terms)
    assert (r - cayley_neumann(q, 11, terms)).abs().max() < 1e-14
    assert (bound - skew_norm_bound(q, 11)).abs().max() < 1e-14


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.05, 0.2])
@pytest.mark.parametrize("terms", [None, 4, 5])
def test_newton_schulz_inverse_equals_lu(scale, terms):
    q = rand_q(20, 16, seed=3, scale=scale / 4)
    d = cayley_exact(q, 16) if terms is None else cayley_neumann(q, 16, terms)
    assert (rotation_inverse(d) - torch.linalg.inv(d)).abs().max() < 1e-13


def test_newton_schulz_falls_back_to_the_normal_equations_far_from_orthogonal():
    """Far from orthogonal, the inverse comes from the normal equations (Cholesky of D^T D, no LU): equal to the LU
    inverse to float64 rounding times D's squared condition number."""
    d = torch.randn(5, 7, 7, generator=torch.Generator().manual_seed(0), dtype=f64) + 3 * torch.eye(7, dtype=f64)
    cond2 = float(torch.linalg.cond(d).max()) ** 2
    assert (rotation_inverse(d) - torch.linalg.inv(d)).abs().max() < 10 * cond2 * torch.finfo(f64).eps


@pytest.mark.parametrize("m,n,b", [(24, 16, 8), (37, 5, 6), (63, 20, 16)])
def test_in_place_rotations_equal_out_of_place(m, n, b):
    g = torch.Generator().manual_seed(m)
    x, src = torch.randn(m, n, generator=g, dtype=f64), torch.randn(m, n, generator=g, dtype=f64)
    for idx in block_layout(torch.randperm(m, generator=g), b, False):
        d = torch.randn(idx.shape[0], idx.shape[1], idx.shape[1], generator=g, dtype=f64)
        assert torch.equal(rotate_rows_(x.clone(), idx, d), rotate_rows(x, idx, d))
        want = x.clone()
        want[idx.reshape(-1)] = rotate_rows(src, idx, d)[idx.reshape(-1)]
        assert torch.equal(rotate_rows_(x.clone(), idx, d, src), want)
    for idx in block_layout(torch.randperm(n, generator=g), b, False):
        e = torch.randn(idx.shape[0], idx.shape[1], idx.shape[1], generator=g, dtype=f64)
        assert torch.equal(rotate_cols_(x.clone(), idx, e), rotate_cols(x, idx, e))


def test_by_key_round_trip_and_chunks():
    ts = [torch.full((c, 3), float(i)) for i, c in enumerate([2, 1, 4, 3])]
    batch = batching.ByKey(["a", "b", "a", "b"], [2, 1, 4, 3])
    cats = batch.cat(ts)
    assert list(cats) == ["a", "b"] and cats["a"].shape == (6, 3) and cats["b"].shape == (4, 3)
    assert all(torch.equal(x, y) for x, y in zip(batch.split(cats), ts))
    assert [o.tolist() for o in batch.owners([0, 1, 2, 3]).values()] == [[0, 0, 2, 2, 2, 2], [1, 3, 3, 3]]
    assert list(batching.chunks("abcde", [3, 3, 9, 1, 1], budget=6)) == [["a", "b"], ["c"], ["d", "e"]]
    with pytest.raises(ValueError, match="same length"):
        batching.ByKey(["a"], [1, 2])


SHAPES = [(24, 13), (20, 24), (10, 20), (7, 10)]


def train_chain(make, steps=30, seed=1):
    return chain_model.train_chain(make, SHAPES, steps, seed)


POET_CASES = {"paper": {}, "lean": dict(store_base=False), "fs": dict(mode="fs", block_size=0.5),
              "safeguard": dict(max_q_norm=0.05)}


@pytest.mark.parametrize("case", list(POET_CASES))
def test_poet_in_runs_equals_one_batch(case, float64, monkeypatch):
    def make(params):
        kw = dict(lr=2e-2, block_size=8, merge_every=7, lr_ref_block=8) | POET_CASES[case]
        return geomopt.POET(params, **kw)

    whole, opt = train_chain(make)
    if case == "safeguard":
        assert opt.stats["early_merges"] > 0  # the exact-Cayley path ran
    monkeypatch.setattr(batching, "BATCH_ELEMENTS", 1)  # every weight a run of its own
    runs = []
    step_run = geomopt.POET._step_run
    monkeypatch.setattr(geomopt.POET, "_step_run", lambda self, group, works, lr, **kw: (
        runs.append(len(works)), step_run(self, group, works, lr, **kw)))
    apart, _ = train_chain(make)
    assert set(runs) == {1} and len(runs) == 30 * len(SHAPES)
    for a, b in zip(whole, apart):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("name", ["poet", "relora"])
def test_fused_inner_adam_equals_the_loop(name, float64, monkeypatch):
    def make(**kw):
        def build(params):
            if name == "poet":
                return geomopt.POET(params, lr=2e-2, block_size=8, merge_every=7, lr_ref_block=8, **kw)
            return geomopt.ReLoRAReset(params, lr=2e-2, rank=3, reset_every=9, **kw)
        return build

    impls = []
    adam = functional.adam
    monkeypatch.setattr(functional, "adam", lambda *a, impl, **kw: (impls.append(impl), adam(*a, impl=impl, **kw)))
    fused, _ = train_chain(make())  # the factors take the fused kernel by default; the scale its loop
    calls = 2 if name == "poet" else 1  # POET: two factor lrs (the 7-row side is clamped below b: its own scale)
    assert impls.count("fused") == 30 * calls and impls.count("single") == 30
    impls.clear()
    loop, _ = train_chain(make(fused=False))
    assert set(impls) == {"single"}
    impls.clear()
    each, _ = train_chain(make(foreach=True))
    assert set(impls) == {"foreach"}
    for a, b, c in zip(fused, loop, each):
        assert rel_err(a, b) < 1e-10 and rel_err(c, b) < 1e-12


def test_fused_inner_state_round_trips_and_accepts_a_loop_checkpoint(float64):
    def make(kw):
        return lambda params: geomopt.POET(params, lr=2e-2, block_size=8, merge_every=50, inner_kwargs=kw)

    _, loop_opt = train_chain(make({"weight_decay": 0.0, "fused": False}), steps=3)
    layers, scale = make_chain(SHAPES, 0)
    params = [(f"layers.{i}.weight", layer.weight) for i, layer in enumerate(layers)] + [("scale", scale)]
    fused = geomopt.POET(params, lr=2e-2, block_size=8, merge_every=50)
    fused.load_state_dict(loop_opt.state_dict())  # the loop's CPU step counts, then a fused step
    for layer in layers:
        layer.weight.grad = torch.randn_like(layer.weight)
    scale.grad = torch.randn_like(scale)
    fused.step()
    st = fused.state[layers[0].weight]["inner_row"][0]
    assert st["step"].dtype == torch.float32 and float(st["step"]) == 4.0


def test_finite_flags_flag_exactly_the_non_finite():
    big = torch.full((8,), 3e38)  # finite entries whose fp32 norm overflows
    half = torch.full((4,), 6e4, dtype=torch.float16)  # finite, norm above fp16's range
    ts = [torch.randn(3, 3), big, half, torch.randn(5, dtype=f64), torch.zeros(0)]
    assert finite_flags(ts).tolist() == [True] * 5
    ts[0][1, 1], ts[1][0], ts[3][2] = float("nan"), float("inf"), -float("inf")
    assert finite_flags(ts).tolist() == [False, False, True, False, True]
    assert finite_flags([]).numel() == 0


@pytest.mark.parametrize("terms", [1, 2, 4, 5])
@pytest.mark.parametrize("c", [0.05, 0.5])
def test_newton_schulz_with_the_bounds_iterations_equals_lu(terms, c):
    """The safeguard bounds ||Q||_2 <= c, hence ||I - D D^T|| <= 2 c^(k+1) + c^(2k+2) (odd k) or c^(2k+2) (even k);
    that many iterations (no host read) reach the inverse."""
    from geomopt.geometry.cayley import newton_schulz_inverse, newton_schulz_iterations

    q = rand_q(64, 16, seed=terms, scale=1.0)
    q = q * (c / skew_norm_bound(q, 16)).unsqueeze(-1)  # the bound at its limit for every block
    d = cayley_neumann(q, 16, terms)
    residual = 2 * c ** (terms + 1) + c ** (2 * terms + 2) if terms % 2 else c ** (2 * terms + 2)
    x, ok = newton_schulz_inverse(d, newton_schulz_iterations(residual, f64))
    assert bool(ok) and (x - torch.linalg.inv(d)).abs().max() < 1e-13
    x, ok = newton_schulz_inverse(d + 0.5 * torch.eye(16, dtype=f64), 2)  # far from orthogonal: flagged
    assert not bool(ok)


def test_a_generator_beyond_the_recorded_bound_reruns_the_step_with_converged_inverses(float64):
    """A state whose bound does not hold (here: set to 0 after the generators moved) is caught by the device flag
    read with the safeguard's bounds, and the step is computed again, before anything is committed."""
    def run(corrupt):
        layers, scale = make_chain(SHAPES, 0)
        params = [(f"layers.{i}.weight", layer.weight) for i, layer in enumerate(layers)] + [("scale", scale)]
        opt = geomopt.POET(params, lr=0.2, block_size=8, merge_every=50, max_q_norm=5.0)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            x, y = torch.randn(32, SHAPES[0][1], generator=g), torch.randn(32, SHAPES[-1][0], generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(chain_forward([layer.weight for layer in layers], scale, x), y).backward()
            if corrupt and step == 3:
                for layer in layers:
                    opt.state[layer.weight]["q_bound"] = 0.0  # says: no iterations needed
            opt.step()
        return [layer.weight.detach().clone() for layer in layers]

    for a, b in zip(run(False), run(True)):
        assert rel_err(a, b) < 1e-12
