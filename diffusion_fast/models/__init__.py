"""Models: the SD-style conditional UNet and the small prompt encoder."""

from .unet import UNet2DConditionModel, UNetConfig

__all__ = ["UNet2DConditionModel", "UNetConfig"]
