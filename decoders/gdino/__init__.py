"""GroundingDINO decoder behind [DET], [SEG] and [GRD]: detection, instance/semantic segmentation, grounding and
region-prompted segmentation over super-link category queries."""

from .config import GroundingDinoDecoderConfig
from .model import GroundingDinoDecoder, GroundingOutput, build_hf_config
from .postprocess import MODES, masks_to_rle

__all__ = [
    "MODES",
    "GroundingDinoDecoder",
    "GroundingDinoDecoderConfig",
    "GroundingOutput",
    "build_hf_config",
    "masks_to_rle",
]
