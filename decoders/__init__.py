"""Task decoders behind the super link: the protocol, the registry and the built-in decoders."""

from .base import DECODERS, Decoder, DecoderOutput, build_decoder, register_decoder
from . import diffusion, gdino, keypoint  # noqa: E402,F401  (importing registers "sd", "ip2p", "gdino", "keypoint")

__all__ = ["DECODERS", "Decoder", "DecoderOutput", "build_decoder", "register_decoder"]
