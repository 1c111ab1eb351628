"""Triton kernels for geomopt, installed as ``geomopt.kernels``.

Each kernel has exactly the signature of its torch reference in ``geomopt.geometry`` and registers
itself with ``geomopt.geometry.dispatch.register_kernel``. This module is imported only when triton is
importable and a CUDA tensor reaches the dispatch point. No kernel is registered yet: every call runs
the torch reference.
"""
