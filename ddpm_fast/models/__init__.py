"""Models built on the fused ops: the DDPM U-Net and its diffusers interop."""

from .unet import UNet

__all__ = ["UNet"]
