"""Task decoders behind the super link: the protocol, the registry and the built-in decoders."""

from .base import DECODERS, Decoder, DecoderOutput, build_decoder, register_decoder

__all__ = ["DECODERS", "Decoder", "DecoderOutput", "build_decoder", "register_decoder"]
