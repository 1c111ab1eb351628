"""Triton kernels for geomopt, installed as ``geomopt.kernels``.

Each kernel has exactly the signature of its torch reference in ``geomopt.geometry`` and is
registered with ``geomopt.geometry.dispatch``, which imports this module only when triton is
importable, kernels are enabled (``GEOMOPT_KERNELS=1``; off until they are measured on a GPU) and a
CUDA tensor reaches it. Registered so far: the block rotations and block gradients
(``block_ops``). The Cayley-Neumann map still runs its torch reference everywhere.
"""
# From the repository root (``python -m ...`` puts it on sys.path) this folder is also importable as a
# top-level ``kernels``, a name another PyPI package owns and that transformers probes for: then it
# must import nothing.
if __name__ == "geomopt.kernels":
    from ..geometry.dispatch import register_kernel
    from . import block_ops

    for _name in block_ops.__all__:
        register_kernel(_name, getattr(block_ops, _name))
