"""Generation (``sd``, route ``[GEN]``) and editing (``ip2p``, route ``[EDIT]``) decoders built on diffusers.

Importing this package registers both decoders.
"""

from __future__ import annotations

from .common import LatentDiffusionDecoder, drop_mask, ip2p_drop_masks
from .config import DiffusionConfig, IP2PConfig, SDConfig
from .ip2p import InstructPix2PixDecoder
from .mapper import PromptMapper
from .sd import StableDiffusionDecoder

__all__ = [
    "DiffusionConfig",
    "SDConfig",
    "IP2PConfig",
    "PromptMapper",
    "LatentDiffusionDecoder",
    "StableDiffusionDecoder",
    "InstructPix2PixDecoder",
    "drop_mask",
    "ip2p_drop_masks",
]
