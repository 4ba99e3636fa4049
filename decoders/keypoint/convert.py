"""Official VisionLLM v2 checkpoint keys of the keypoint decoder (``unipose.*``) -> this decoder's keys.

Only the super-link projections (``unipose.projection_*`` -> ``keypoint.projection_*``) convert; the rest of
``unipose.`` (UniPose's backbone and transformer) has no counterpart in our keypoint decoder.
"""

from __future__ import annotations

from ..keyrules import KeyRule

__all__ = ["OFFICIAL_KEY_RULES"]

OFFICIAL_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("unipose.{part:projection_llava|projection_kpt_llava}.{rest}", ("keypoint.{part}.{rest}",),
            "keypoint decoder: the super-link projections"),
    KeyRule("unipose.{rest}", (), "UniPose's backbone and transformer differ from our keypoint decoder"),
)
"""The keypoint rows of the official -> ours key table (see the module docstring)."""
