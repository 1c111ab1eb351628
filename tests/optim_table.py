"""One table of optimizer configurations under test: every entry goes through the same tests."""
import torch_optimizer

import geomopt

# id -> (class, kwargs). Small blocks and merge intervals so that a few steps cross merges.
OPTIMIZERS = {
    "poet-bs": (geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7)),
    "poet-fs": (geomopt.POET, dict(lr=1e-2, block_size=0.5, mode="fs", merge_every=7)),
    "poet-lean": (geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, store_base=False)),
    "poet-exact": (geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, exact_cayley=True)),
    "poet-cnp4": (geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, neumann_terms=4)),
    "poet-lamb": (geomopt.POET, dict(lr=1e-2, block_size=4, merge_every=7, inner=torch_optimizer.Lamb)),
    "relora": (geomopt.ReLoRAReset, dict(lr=1e-2, rank=2, alpha=4, reset_every=7, restart_warmup_steps=2)),
    "relora-warm-random": (geomopt.ReLoRAReset, dict(lr=1e-2, rank=2, alpha=4, reset_every=7, warm_start_steps=3,
                                                     prune="random", restart_warmup_steps=0)),
    # Lamb scales steps by ||factor||, which stalls the zero-initialized B: Yogi is the torch-optimizer
    # class under test here
    "relora-yogi-reset": (geomopt.ReLoRAReset, dict(lr=1e-2, rank=3, alpha=3, reset_every=5, prune="reset",
                                                    inner=torch_optimizer.Yogi)),
}
# a state key that only a factorized parameter has, per optimizer class
FACTOR_KEY = {geomopt.POET: "perm_row", geomopt.ReLoRAReset: "rng"}
# the stat that counts merges / resets, per optimizer class
CYCLE_STAT = {geomopt.POET: "merges", geomopt.ReLoRAReset: "resets"}
IDS = list(OPTIMIZERS)
# a longer cycle for the convergence test, per optimizer class
LONG_CYCLE = {geomopt.POET: dict(merge_every=20), geomopt.ReLoRAReset: dict(reset_every=20)}
