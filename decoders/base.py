"""The decoder protocol and registry.

A decoder receives super-link query states gathered from the LLM (``[B, G, K, C]`` at the LLM width, plus a group
mask) together with the images and targets of the samples that routed to it. It owns its projection from the LLM
width, its own image preprocessing, its losses and its post-processing. It knows nothing of the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from transformers.utils import ModelOutput

from superlink import Route

__all__ = ["Decoder", "DecoderOutput", "register_decoder", "build_decoder", "DECODERS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the pixel statistics the image decoders normalise with
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DecoderOutput(ModelOutput):
    """What a decoder returns in training (a ``ModelOutput``, i.e. a dict, so ZeRO-3's hooks find its tensors).

    Attributes:
        loss: weighted total loss of this decoder (scalar), or None when no target was given.
        loss_dict: the individual (weighted) loss terms, for logging.
        preds: raw predictions (decoder specific), useful for debugging and tests.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    preds: Any = None


class Decoder(nn.Module):
    """Base class of every task decoder.

    Subclasses set ``name`` (the registry key, used by route tables in configs) and ``config_class`` (a dataclass whose
    defaults are the full-size dimensions; YAML presets fill it), and implement:

    - ``prepare(images, targets)``: turn original PIL images (and optional raw targets in original pixel
      coordinates) into the decoder's input tensors (a dict). Runs on the CPU outside autograd.
    - ``forward(queries, query_mask, inputs, route_ids)``: training; returns a :class:`DecoderOutput`.
    - ``predict(queries, query_mask, inputs, route_ids, **options)``: inference; one structured result per sample,
      in original image coordinates.

    ``queries`` is ``[B, G, K, C]`` (B samples that routed to this decoder, G groups, K = its routes' ``num_embs``,
    C the LLM width), ``query_mask`` is ``[B, G]`` (True = real group), ``route_ids`` is ``[B, G]`` (the route token
    id of each group, -1 on padding) so a decoder serving several routes can tell them apart.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = dict
    tied_weights_keys: ClassVar[dict[str, str]] = {}  # HF-style {target pattern: source}, relative to the decoder

    num_embs: int | None = None
    """K, the query states per group its routes carry (``Route.num_embs``); set by :meth:`bind_routes`."""

    def bind_routes(self, own: dict[int, Route], absorbed: dict[int, Route]) -> None:
        """Learn which route token ids reach this decoder: its own routes and the routes it absorbs (e.g. the object
        classes of a pose answer), keyed by token id, and take K (:attr:`num_embs`) from them. Called once by the
        model; the default keeps them.

        Raises:
            ValueError: the routes differ in ``num_embs`` (a :class:`~superlink.RouteTable` never gives such routes).
        """
        ks = {route.num_embs for route in [*own.values(), *absorbed.values()]}
        if len(ks) > 1:
            raise ValueError(f"{self.name}: its routes must share num_embs, got {sorted(ks)}")
        self.own_routes, self.absorbed_routes = dict(own), dict(absorbed)
        self.num_embs = ks.pop() if ks else None

    def prepare(self, images: list[Any], targets: list[dict] | None = None) -> dict[str, Any]:
        """Build decoder inputs from original images and raw targets."""
        raise NotImplementedError

    def forward(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        inputs: dict[str, Any],
        route_ids: torch.Tensor | None = None,
    ) -> DecoderOutput:
        raise NotImplementedError

    @torch.no_grad()
    def predict(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        inputs: dict[str, Any],
        route_ids: torch.Tensor | None = None,
        **options: Any,
    ) -> list[Any]:
        raise NotImplementedError


DECODERS: dict[str, type[Decoder]] = {}


def register_decoder(name: str) -> Callable[[type[Decoder]], type[Decoder]]:
    """Class decorator: register a :class:`Decoder` subclass under ``name``.

    Example:
        >>> @register_decoder("counter")
        ... class Counter(Decoder): ...
    """

    def wrap(cls: type[Decoder]) -> type[Decoder]:
        if name in DECODERS and DECODERS[name] is not cls:
            raise ValueError(f"decoder {name!r} is already registered by {DECODERS[name].__qualname__}")
        cls.name = name
        DECODERS[name] = cls
        return cls

    return wrap


def build_decoder(name: str, config: Any, llm_hidden_size: int) -> Decoder:
    """Build a registered decoder from its config (random init; weights load through explicit loaders)."""
    if name not in DECODERS:
        raise KeyError(f"unknown decoder {name!r}; registered: {sorted(DECODERS)}")
    return DECODERS[name](config, llm_hidden_size)
