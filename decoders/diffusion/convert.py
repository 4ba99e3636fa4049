"""Official VisionLLM v2 checkpoint keys of the Stable Diffusion / InstructPix2Pix decoders (``sd.*``, ``ip2p.*``).

Identical names except the CLIP text encoder, whose ``text_model.`` wrapper transformers 5 no longer has.
"""

from __future__ import annotations

from ..keyrules import KeyRule, same_key

__all__ = ["OFFICIAL_KEY_RULES"]

OFFICIAL_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("{d:sd|ip2p}.sd_text_encoder.text_model.{rest}", ("{d}.sd_text_encoder.{rest}",),
            "CLIP text encoder: transformers 5 has no text_model wrapper"),
    same_key("{d:sd|ip2p}.{rest}", "Stable Diffusion / InstructPix2Pix decoders"),
)
"""The diffusion rows of the official -> ours key table (see the module docstring)."""
