"""Adding a decoder: subclass ``Decoder``, register it, build it by name, train and predict through the protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from decoders import DECODERS, Decoder, DecoderOutput, build_decoder, register_decoder
from superlink import QueryProjection


@dataclass
class MeanColourConfig:
    """Config of the example decoder: the width of its projection."""

    hidden_dim: int = 16


class MeanColourDecoder(Decoder):
    """Example decoder: predicts each image's mean colour from the first query group."""

    def __init__(self, config: MeanColourConfig, llm_hidden_size: int) -> None:
        super().__init__()
        self.proj = QueryProjection(llm_hidden_size, config.hidden_dim, 3, num_layers=2)

    def prepare(self, images: list[Any], targets: list[dict] | None = None) -> dict[str, Any]:
        colours = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).mean((0, 1)) / 255
                               for im in images])  # [B, 3]
        return {"colours": colours}

    def forward(self, queries, query_mask, inputs, route_ids=None) -> DecoderOutput:
        predicted = self.proj(queries[:, 0].mean(1))  # [B, 3]
        loss = nn.functional.mse_loss(predicted, inputs["colours"])
        return DecoderOutput(loss=loss, loss_dict={"loss_mse": loss}, preds=predicted)

    @torch.no_grad()
    def predict(self, queries, query_mask, inputs, route_ids=None, **options) -> list[Any]:
        return [tuple(colour.tolist()) for colour in self.proj(queries[:, 0].mean(1))]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: faster for tiny tensors on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def registered():
    register_decoder("mean_colour")(MeanColourDecoder)
    yield
    DECODERS.pop("mean_colour", None)


def test_new_decoder_trains_and_predicts_through_the_protocol(registered):
    decoder = build_decoder("mean_colour", MeanColourConfig(), llm_hidden_size=8)
    assert isinstance(decoder, MeanColourDecoder) and decoder.name == "mean_colour"
    images = [Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (5, 7), (0, 0, 255))]
    inputs = decoder.prepare(images)
    queries = nn.Parameter(torch.randn(2, 1, 4, 8))
    query_mask = torch.ones(2, 1, dtype=torch.bool)
    optimizer = torch.optim.Adam(list(decoder.parameters()) + [queries], lr=1e-2)
    first = decoder(queries, query_mask, inputs).loss.item()
    for _ in range(150):
        out = decoder(queries, query_mask, inputs)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.loss.item() < 0.05 * first
    red, blue = decoder.predict(queries, query_mask, inputs)
    assert red[0] > 0.8 and red[2] < 0.2 and blue[2] > 0.8 and blue[0] < 0.2


def test_registering_another_class_under_a_taken_name_fails(registered):
    class Other(MeanColourDecoder):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_decoder("mean_colour")(Other)


def test_unknown_decoder_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="registered"):
        build_decoder("no_such_decoder", None, 8)
