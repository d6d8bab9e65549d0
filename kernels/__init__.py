"""Triton kernels of ddpm_fast, installed as ``ddpm_fast.kernels``.

Each module holds one op: its ``@triton.jit`` kernel, a launcher, and its
registration as a ``torch.library.triton_op`` (``torch.ops.ddpm_fast.*_triton``)
so that torch.compile sees inside it. Importing a module needs triton.
"""
