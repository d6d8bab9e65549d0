"""The shared Philox normal stream (csrc/philox.h, shared/DESIGN.md) in Triton.

Written out rather than taken from ``tl.randn`` so that 64-bit counters mean the
same on every Triton version: counter words (c & 0xffffffff, c >> 32, 0, 0), key
(seed & 0xffffffff, seed >> 32). For counters below 2^32 this equals
``tl.randn(seed, counter)`` (tests/test_randn.py checks it).
"""

from typing import Any

import torch
import triton
import triton.language as tl

# Globals a kernel reads must be tl.constexpr objects (the compiler rejects
# plain ones and annotated ones). Expressions put them after a tensor
# (u * TWO_PI): Triton's CPU interpreter cannot apply a constexpr to a tensor.
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
PHILOX_ROUNDS = tl.constexpr(10)
UINT_TO_UNIFORM = tl.constexpr(4.6566127342e-10)  # (2^31 - 1) * scale < 1 in float32
TWO_PI = tl.constexpr(6.283185307179586)
MIN_UNIFORM = tl.constexpr(1.0e-7)

# The noise arguments of every kernel that calls philox_normal, kept as runtime
# values: Triton would otherwise compile an int argument equal to 1 into a
# constant, and recompile whenever a seed half or the offset happens to be 1.
# torch.compile's inductor ignores this list when it compiles a triton_op's
# kernel (an int argument it knows to be 1 becomes a constant all the same),
# so the kernels must also compile with these arguments as constants:
# philox_normal takes the seed halves with tl.cast (a constant has no `.to`;
# tests/triton_compile/compile_kernels.py --as-inductor checks it).
NOISE_ARGS = ["seed_lo", "seed_hi", "offset"]


@triton.jit
def _uint_to_uniform(bits):
    """A uniform in [0, 1) from a uint32 word read as int32 and folded onto [0, 2^31)."""
    x = bits.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    return x.to(tl.float32) * UINT_TO_UNIFORM


@triton.jit
def philox_normal(seed_lo, seed_hi, counter):
    """One standard normal per element of the int64 block ``counter``.

    ``seed_lo``/``seed_hi`` are the key's two 32-bit halves (scalars).
    """
    counter = counter.to(tl.int64)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    # tl.cast, not .to: a seed half may arrive as a constant (see NOISE_ARGS).
    k0 = tl.cast(seed_lo, tl.uint32)
    k1 = tl.cast(seed_hi, tl.uint32)
    for _ in tl.static_range(PHILOX_ROUNDS):
        p0 = c0
        p2 = c2
        c0 = tl.umulhi(p2, PHILOX_ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(p0, PHILOX_ROUND_A) ^ c3 ^ k1
        c1 = p2 * PHILOX_ROUND_B
        c3 = p0 * PHILOX_ROUND_A
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    u1 = tl.maximum(_uint_to_uniform(c0), MIN_UNIFORM)
    u2 = _uint_to_uniform(c1)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(u2 * TWO_PI)


def split_seed(seed: int) -> tuple[int, int]:
    """The key halves of a seed given as a signed or unsigned 64-bit int."""
    seed &= 0xFFFFFFFFFFFFFFFF
    return seed & 0xFFFFFFFF, seed >> 32


def launchable(kernel: Any) -> Any:
    """``kernel`` ready to launch inside a ``triton_op``.

    A compiled kernel goes through ``torch.library.wrap_triton`` so that
    torch.compile can trace it. Under Triton's CPU interpreter
    (TRITON_INTERPRET=1) torch cannot wrap it; it is launched directly, except on
    fake tensors (torch.compile's shape propagation), where there is nothing to run.
    """
    from torch.library import wrap_triton
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return wrap_triton(kernel)
    return _InterpretedLauncher(kernel)


class _InterpretedLauncher:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        from torch._subclasses.fake_tensor import is_fake
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        def launch(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and (is_fake(a) or a.is_meta) for a in args):
                if get_proxy_mode() is not None:
                    # AOTAutograd (aot_eager, inductor) is recording a graph: the
                    # kernel would be left out of it, and the compiled function
                    # would return unwritten memory.
                    raise RuntimeError(
                        "ddpm_fast: the Triton backend under TRITON_INTERPRET=1 cannot be traced by "
                        "torch.compile's AOTAutograd (aot_eager, inductor): compile with backend='eager', "
                        "or use ddpm_fast's cpu or reference backend"
                    )
                return None
            return self.kernel[grid](*args, **kwargs)

        return launch
