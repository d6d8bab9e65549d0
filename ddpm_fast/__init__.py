"""ddpm_fast: denoising diffusion probabilistic models on fused kernels.

Layers (shared/DESIGN.md): schedules -> diffusion math -> ops -> models ->
sampler / trainer -> CLI.
"""

from . import _extension, diffusion, models, nn, ops
from .models.diffusers_interop import patch_diffusers  # imports diffusers only when called
from .sampler import Sampler
from .schedules import NoiseSchedule

__version__ = "0.1.0"
__all__ = ["NoiseSchedule", "Sampler", "diffusion", "models", "nn", "ops", "patch_diffusers", "__version__"]
