"""Triton kernels for geomopt, installed as ``geomopt.kernels``.

Each kernel has exactly the signature of its torch reference in ``geomopt.geometry`` and is
registered with ``geomopt.geometry.dispatch``, which imports this module only when triton is
importable, kernels are enabled (``GEOMOPT_KERNELS=1``; off until they are measured on a GPU) and a
CUDA tensor reaches it: the Cayley-Neumann map with its backward (``cayley``), the block rotations and
block gradients (``block_ops``) and the CholeskyQR2 retraction (``retract``). The exact Cayley map
(a batched solve) stays on torch.
"""
# From the repository root (``python -m ...`` puts it on sys.path) this folder is also importable as a
# top-level ``kernels``, a name another PyPI package owns and that transformers probes for: then it
# must import nothing.
if __name__ == "geomopt.kernels":
    from ..geometry.dispatch import register_kernel
    from . import block_ops, cayley, retract

    for _mod in (block_ops, cayley, retract):
        for _name in _mod.__all__:
            register_kernel(_name, getattr(_mod, _name))
