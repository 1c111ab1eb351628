"""Triton kernels for geomopt, installed as ``geomopt.kernels``.

Each kernel has exactly the signature of its torch reference in ``geomopt.geometry`` and is
registered with ``geomopt.geometry.dispatch``, which imports this module only when triton is
importable, kernels are enabled (``GEOMOPT_KERNELS=1``; off until they are measured on a GPU) and a
CUDA tensor reaches it: the Cayley-Neumann map with its backward (``cayley``), the block rotations and
block gradients (``block_ops``) and the CholeskyQR2 retraction (``retract``). The exact Cayley map
(a batched Cholesky factorization) stays on torch. Without triton, importing this module raises a
ModuleNotFoundError that says so; the optimizers never need it (they run their torch references).
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
    from . import block_ops, cayley, retract

    for _mod in (block_ops, cayley, retract):
        for _name in _mod.__all__:
            register_kernel(_name, getattr(_mod, _name))
