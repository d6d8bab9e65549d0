"""float32 to a tensor's element type in Triton, rounded to nearest everywhere.

A GPU's float32 -> bfloat16 cast rounds to nearest (ties to even); Triton's CPU
interpreter, which CI runs the kernels in, truncates, so CI's results were up to
one unit in the last place off the GPU's and the reference's. Rounding by bits
first makes the cast exact on both, for normal numbers, infinities and NaN: CI
then checks the rounding a GPU does. (Not for bfloat16 subnormals, below 1.2e-38,
which the interpreter's cast flushes to zero. float16 casts round to nearest in both.)
"""

import triton
import triton.language as tl


@triton.jit
def round_to_bfloat16(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), as a float32."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    # A NaN stays a NaN: quieted, so that the top of its payload survives a truncating
    # cast (the carry from a low payload could otherwise reach the sign: -0).
    return tl.where(x != x, (bits | 0x400000).to(tl.float32, bitcast=True), rounded)


@triton.jit
def to_element_type(x, DTYPE: tl.constexpr):
    """float32 ``x`` as ``DTYPE`` (a pointer's ``dtype.element_ty``), rounded to nearest."""
    if DTYPE == tl.bfloat16:
        x = round_to_bfloat16(x)
    return x.to(DTYPE)
