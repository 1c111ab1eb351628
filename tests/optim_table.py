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
}
IDS = list(OPTIMIZERS)
