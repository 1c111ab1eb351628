"""One table of optimizer configurations under test: every entry goes through the same tests (test_conformance,
test_contract), as torch's own optimizers go through ``OptimizerInfo`` entries in test/test_optim.py."""
from dataclasses import dataclass, field

import torch_optimizer

import geomopt


@dataclass(frozen=True)
class Config:
    """One configuration: the class, its keyword arguments, and what the generic tests need to know of it."""
    cls: type
    kwargs: dict
    #: the arguments a weight with a side of 1 needs (rank 1)
    tiny: dict = field(default_factory=dict)
    #: why the inner rule moves a factor whose gradient is zero (None: it does not)
    moves_at_zero_grad: str | None = None

    @property
    def factor_key(self) -> str:
        return self.cls.STATE_MARKER

    @property
    def cycle_stat(self) -> str | None:
        """The stat that counts merges / resets (None: the method has no cycles)."""
        return {geomopt.POET: "merges", geomopt.ReLoRAReset: "resets"}.get(self.cls)

    @property
    def overwrites(self) -> bool:
        """Whether the method rewrites a weight from its factors (so edits from outside must be re-based)."""
        return self.cls is geomopt.DLRAMomentum or (self.cls is geomopt.POET and self.kwargs.get("store_base", True))

    @property
    def long_cycle(self) -> dict:
        """A longer merge / reset interval, for the convergence test (2 x 2 blocks mix slowly: they merge often)."""
        if self.cls is geomopt.POET:
            return dict(merge_every=5 if self.kwargs.get("block_size") == 2 else 20)
        return dict(reset_every=20) if self.cls is geomopt.ReLoRAReset else {}

    @property
    def target_rank(self) -> int | None:
        """The rank of the quadratic's target that the method can reach (None: the orthogonal orbit of W0, which
        has W0's singular values and so is reachable by POET, ReLoRA and any full-rank method)."""
        return self.kwargs["rank"] if self.cls is geomopt.DLRAMomentum else None

    def build(self, params, **over):
        return self.cls(params, **{**self.kwargs, **over})


RANK1 = dict(rank=1)
# id -> configuration. Small blocks and merge intervals so that a few steps cross merges.
CONFIGS = {
    "poet-bs": Config(geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7)),
    "poet-fs": Config(geomopt.POET, dict(lr=1e-2, block_size=0.5, mode="fs", merge_every=7)),
    "poet-lean": Config(geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, store_base=False)),
    "poet-exact": Config(geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, exact_cayley=True)),
    "poet-cnp4": Config(geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, neumann_terms=4)),
    "poet-b2": Config(geomopt.POET, dict(lr=1e-2, block_size=2, merge_every=5)),
    "poet-b3-lean": Config(geomopt.POET, dict(lr=1e-2, block_size=3, merge_every=5, store_base=False)),
    "poet-lamb": Config(geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, inner=torch_optimizer.Lamb,
                                           lr_ref_block=4)),  # lr tuned as the factors' lr at b = 4
    "relora": Config(geomopt.ReLoRAReset, dict(lr=1e-2, rank=2, alpha=4, reset_every=7, restart_warmup_steps=2),
                     RANK1),
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
    "dlra-hb": Config(geomopt.DLRAMomentum, dict(lr=5e-2, rank=2), RANK1),
    "dlra-adam": Config(geomopt.DLRAMomentum, dict(lr=1e-2, rank=2, method="adam"), RANK1),
    "dlra-r1": Config(geomopt.DLRAMomentum, dict(lr=1e-2, rank=1, method="adam", stabilize_every=2)),
    "dlra-adaptive": Config(geomopt.DLRAMomentum, dict(lr=5e-2, rank=2, rank_tol=0.05, max_rank=5, stabilize_every=3),
                            dict(rank=1, max_rank=1)),
}
IDS = list(CONFIGS)

# the older names test_conformance reads
OPTIMIZERS = {k: (c.cls, c.kwargs) for k, c in CONFIGS.items()}
FACTOR_KEY = {c.cls: c.factor_key for c in CONFIGS.values()}
CYCLE_STAT = {c.cls: c.cycle_stat for c in CONFIGS.values()}
