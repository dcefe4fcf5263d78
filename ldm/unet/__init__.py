"""The denoising UNet: named sizes of diffusers' UNet2DConditionModel."""

from ldm.unet.model import UNET_SIZES, build_unet, check_unet_matches, unet_config

__all__ = ["UNET_SIZES", "build_unet", "check_unet_matches", "unet_config"]
