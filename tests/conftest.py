"""Shared fixtures: seeded, deterministic, tiny."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random-but-deterministic RGB image with a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        arr[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(100, 255, size=3)
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def tiny_cfg():
    from vllm2 import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_processor(tiny_cfg):
    from vllm2 import VisionLLMv2Processor

    return VisionLLMv2Processor.from_config(tiny_cfg)


@pytest.fixture(scope="session")
def real_folders(tmp_path_factory):
    """The tiny real-format folders of ``tests/realformat.py`` (CLIP, Llama, Qwen2, GroundingDINO, SD, IP2P, Swin,
    open_clip), sized for ``tests/data/journey.yaml``, written once per session."""
    from realformat import JOURNEY, write_all
    from vllm2 import load_config

    return write_all(tmp_path_factory.mktemp("realformat"), load_config(JOURNEY))
