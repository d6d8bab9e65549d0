"""The Triton ops, registered by importing this module (which needs triton):
importing the kernels (``ddpm_fast.kernels``) registers their ``triton_op``s,
``torch.ops.ddpm_fast.*_triton``; the differentiable ones get their autograd here.

Imported once, by ``_backend.load_triton_ops`` (on the first call of a Triton
backend; see there why at import and not in the loader's body).
"""

from ..kernels import ddpm_step, group_norm_silu, q_sample, randn  # noqa: F401  (register the ops)
from .group_norm_silu import register_triton_autograd as _register_group_norm_silu
from .q_sample import register_triton_autograd as _register_q_sample

_register_q_sample()
_register_group_norm_silu()
