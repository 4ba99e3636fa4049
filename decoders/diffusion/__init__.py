"""Generation (``sd``, route ``[GEN]``) and editing (``ip2p``, route ``[EDIT]``) decoders built on diffusers.

Importing this package registers both decoders.
"""

from __future__ import annotations

from .common import LatentDiffusionDecoder, drop_mask, ip2p_drop_masks
from .config import TINY_DIFFUSION, DiffusionConfig, IP2PConfig, SDConfig, tiny_ip2p_config, tiny_sd_config
from .ip2p import InstructPix2PixDecoder
from .mapper import PromptMapper
from .sd import StableDiffusionDecoder

__all__ = [
    "DiffusionConfig",
    "SDConfig",
    "IP2PConfig",
    "TINY_DIFFUSION",
    "tiny_sd_config",
    "tiny_ip2p_config",
    "PromptMapper",
    "LatentDiffusionDecoder",
    "StableDiffusionDecoder",
    "InstructPix2PixDecoder",
    "drop_mask",
    "ip2p_drop_masks",
]
