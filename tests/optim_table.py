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
    "dlra-hb": (geomopt.DLRAMomentum, dict(lr=5e-2, rank=2)),
    "dlra-adam": (geomopt.DLRAMomentum, dict(lr=1e-2, rank=2, method="adam")),
    "dlra-adaptive": (geomopt.DLRAMomentum, dict(lr=5e-2, rank=2, rank_tol=0.05, max_rank=5, stabilize_every=3)),
}
# a state key that only a factorized parameter has, per optimizer class
FACTOR_KEY = {geomopt.POET: "perm_row", geomopt.ReLoRAReset: "draws", geomopt.DLRAMomentum: "U"}
# the stat that counts merges / resets, per optimizer class (None: the method has no cycles)
CYCLE_STAT = {geomopt.POET: "merges", geomopt.ReLoRAReset: "resets", geomopt.DLRAMomentum: None}
IDS = list(OPTIMIZERS)
# a longer cycle for the convergence test, per optimizer class
LONG_CYCLE = {geomopt.POET: dict(merge_every=20), geomopt.ReLoRAReset: dict(reset_every=20), geomopt.DLRAMomentum: {}}
# the rank of the quadratic's target that each method can reach (None: the orthogonal orbit of W0,
# which has W0's singular values and so is reachable by POET, ReLoRA and any full-rank method)
TARGET_RANK = {geomopt.POET: None, geomopt.ReLoRAReset: None, geomopt.DLRAMomentum: 2}
