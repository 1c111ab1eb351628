"""Triton kernels for geomopt, installed as ``geomopt.kernels``: one folder per op, each holding the ``@triton.jit``
kernels (``kernel.py``) and launchers with exactly the signatures of their torch references, which stay in
``geomopt.geometry`` (and, for a stage of an optimizer's step, beside it in ``geomopt.optim``), plus the tolerances
its tests hold it to (``TOLERANCE``) and what it takes at most (``LIMITS``). Shared host helpers are in ``tiling``.

- ``cayley``: the Cayley-Neumann map and its backward, one packed skew block per program;
- ``tile_grads``: POET's block gradients of both sides from one read of G and W, with the finite flags and the row
  checksums, every weight of one shape in one launch;
- ``tile_rewrite``: POET's rewrite of W, both sides' products per tile, in place (lean) or from W0 (paper);
- ``factor_update``: POET's b x b work of a step fused per block (the map, the inverse, the backward, Adam, the new
  map, the safeguard's bound and the incremental rotation);
- ``retract``: CholeskyQR2 for DLRAMomentum's retraction.

``geomopt.geometry.dispatch`` imports this module only when triton is importable, kernels are enabled
(``GEOMOPT_KERNELS=1``; off until they are measured on a GPU) and a CUDA tensor reaches it. Without triton,
importing it raises a ModuleNotFoundError that says so; the optimizers never need it (they run their references).
"""
# From the repository root (``python -m ...`` puts it on sys.path) this folder is also importable as a
# top-level ``kernels``, a name another PyPI package owns and that transformers probes for: then it
# must import nothing.
if __name__ == "geomopt.kernels":
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("geomopt.kernels needs triton (Linux: pip install 'geomopt[triton]'); geomopt's "
                                  "optimizers run without it, on their torch references", name="triton") from e
    from ..geometry.dispatch import register_kernel
    from . import cayley, factor_update, retract, tile_grads, tile_rewrite

    OPS = (cayley, tile_grads, tile_rewrite, factor_update, retract)
    for _mod in OPS:
        for _name in _mod.__all__:
            register_kernel(_name, getattr(_mod, _name), getattr(_mod, "CAN", {}).get(_name, ()),
                            getattr(_mod, "LIMITS", None))
