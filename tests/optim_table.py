"""The optimizer configurations under test: every entry goes through the same tests (test_conformance,
test_contract, test_step_guarantees), as torch's own optimizers go through ``OptimizerInfo`` entries in
test/test_optim.py. The table wraps ``geomopt.registry``: every registered geomopt optimizer is an entry (with the
spec's ``test_kwargs``), so a new one is tested without touching this file; ``EXTRA`` adds variants that only the
tests need."""
import inspect
from dataclasses import dataclass, field

import torch
import torch_optimizer
from torch import nn

import geomopt
from geomopt import registry


@dataclass(frozen=True)
class Config:
    """One configuration: the class, its keyword arguments, and what the generic tests need to know of it (read
    from the class: its state marker, its cycles, whether it keeps a rank)."""
    cls: type
    kwargs: dict
    #: the arguments a weight with a side of 1 needs (rank 1)
    tiny: dict = field(default_factory=dict)
    #: why the inner rule moves a factor whose gradient is zero (None: it does not)
    moves_at_zero_grad: str | None = None
    #: the convergence test's cycle length, where 20 steps is not right
    cycle: int = 20

    @property
    def factor_key(self) -> str:
        return self.cls.STATE_MARKER

    @property
    def cycle_stat(self) -> str | None:
        """The stat that counts merges / resets (None: the method has no cycles)."""
        return self.cls.CYCLE_STAT

    @property
    def overwrites(self) -> bool:
        """Whether the method rewrites a weight from its factors (so edits from outside must be re-based), as the
        optimizer itself says for a group of these settings."""
        opt = self.build([("w", nn.Parameter(torch.zeros(8, 8, dtype=torch.float64)))])
        return bool(opt._overwrites(opt.param_groups[0]))

    @property
    def long_cycle(self) -> dict:
        """A longer merge / reset interval, for the convergence test."""
        return {self.cls.CYCLE_SETTING: self.cycle} if self.cls.CYCLE_SETTING else {}

    @property
    def target_rank(self) -> int | None:
        """The rank of the quadratic's target that the method can reach (None: the orthogonal orbit of W0, which
        has W0's singular values and so is reachable by POET, ReLoRA and any full-rank method)."""
        return self.kwargs["rank"] if self.cls.KEEPS_RANK else None

    def build(self, params, **over):
        return self.cls(params, **{**self.kwargs, **over})


def from_registry() -> dict:
    """One entry per registered geomopt optimizer, under its registry name."""
    return {spec.name: Config(spec.cls, {**spec.kwargs, **spec.test_kwargs}, spec.test_tiny)
            for spec in registry.REGISTRY.values() if issubclass(spec.cls, geomopt.FactorOptimizer)}


class _Table(dict):
    """The configurations by id; a name registered after the table was made is looked up in the registry."""

    def __missing__(self, name):
        found = from_registry().get(name)
        if found is None:
            raise KeyError(name)
        return found


RANK1 = dict(rank=1)
# id -> configuration beyond the registry's. Small blocks and merge intervals so that a few steps cross merges.
EXTRA = {
    "poet-exact": Config(geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, exact_cayley=True)),
    "poet-cnp5": Config(geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, neumann_terms=5)),
    "poet-b2": Config(geomopt.POET, dict(lr=1e-2, block_size=2, merge_every=5), cycle=5),  # 2 x 2 blocks mix slowly
    "poet-b3-lean": Config(geomopt.POET, dict(lr=1e-2, block_size=3, merge_every=5, store_base=False)),
    "poet-lamb": Config(geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, inner=torch_optimizer.Lamb,
                                           lr_ref_block=4)),  # lr tuned as the factors' lr at b = 4
    "relora-r1": Config(geomopt.ReLoRAReset, dict(lr=1e-2, rank=1, alpha=2, reset_every=4, restart_warmup_steps=0)),
    "relora-warm-random": Config(geomopt.ReLoRAReset, dict(lr=1e-2, rank=2, alpha=4, reset_every=7,
                                                           warm_start_steps=3, prune="random",
                                                           restart_warmup_steps=0), RANK1),
    # Lamb scales steps by ||factor||, which stalls the zero-initialized B: Yogi is the torch-optimizer
    # class under test here
    "relora-yogi-reset": Config(geomopt.ReLoRAReset, dict(lr=1e-2, rank=3, alpha=3, reset_every=5, prune="reset",
                                                          inner=torch_optimizer.Yogi), RANK1,
                                moves_at_zero_grad="Yogi starts both moments at initial_accumulator=1e-6, so its "
                                "first steps move a factor whose gradient is zero"),
    "dlra-r1": Config(geomopt.DLRAMomentum, dict(lr=1e-2, rank=1, method="adam", stabilize_every=2)),
    "dlra-adaptive": Config(geomopt.DLRAMomentum, dict(lr=5e-2, rank=2, rank_tol=0.05, max_rank=5, stabilize_every=3),
                            dict(rank=1, max_rank=1)),
}

CONFIGS = _Table({**from_registry(), **EXTRA})
IDS = list(CONFIGS)


def methods(cycle: int, **settings) -> dict:
    """One optimizer per method of the registry (its first registered variant: poet, relora, dlra, ...), as
    ``name -> (model -> optimizer)``, for the tests that train a model with each method: the spec's test settings,
    the merge / reset interval ``cycle``, and those of ``settings`` the class takes (``block_size=8``, ``rank=4`` ...;
    one that no method takes is refused, so a typo does not go unnoticed)."""
    first: dict = {}
    for spec in registry.REGISTRY.values():
        if issubclass(spec.cls, geomopt.FactorOptimizer):
            first.setdefault(spec.cls, spec)
    takes = {cls: set(inspect.signature(cls).parameters) for cls in first}
    unused = set(settings) - set().union(*takes.values())
    if unused:
        raise TypeError(f"no method takes {sorted(unused)}")

    def maker(spec):
        fixed = {**spec.test_kwargs, **{k: v for k, v in settings.items() if k in takes[spec.cls]}}
        if spec.cls.CYCLE_SETTING:
            fixed[spec.cls.CYCLE_SETTING] = cycle
        return lambda model, **over: spec.build(model, **{**fixed, **over})

    return {spec.name: maker(spec) for spec in first.values()}
