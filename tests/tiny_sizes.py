"""The tiny decoder sizes of the CPU tests: the ``decoders`` sections of ``configs/tiny.yaml``, their one source."""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from vllm2 import VLLM2Config, load_config


@cache
def _tiny() -> VLLM2Config:
    return load_config("tiny")


def tiny_decoder_config(name: str, **overrides: Any) -> Any:
    """A fresh copy of decoder ``name``'s config in ``configs/tiny.yaml``, with ``overrides`` replacing fields.

    Args:
        name: the decoder's registry name (``gdino``, ``keypoint``, ``sd``, ``ip2p``).
        overrides: field values; the config validates them as its constructor does.
    Returns:
        The decoder's config dataclass.
    """
    return dataclasses.replace(_tiny().decoders[name], **overrides)
