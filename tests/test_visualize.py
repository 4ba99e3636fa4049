"""Result pictures: small images are enlarged, low scores are left out (the best result always drawn), masks tint."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vllm2.visualize import PALETTE, draw_result


def test_boxes_masks_and_threshold():
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    masks = torch.zeros(2, 48, 64, dtype=torch.bool)
    masks[0, 10:20, 10:20] = True
    masks[1, 30:40, 40:50] = True
    result = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0], [40.0, 30.0, 50.0, 40.0]]),
              "labels": torch.tensor([0, 1]), "scores": torch.tensor([0.9, 0.1]), "masks": masks}
    picture = np.asarray(draw_result(image, result, ["circle", "square"], min_side=192))
    assert picture.shape == (192, 256, 3)  # enlarged 4x
    assert tuple(picture[15 * 4 + 2, 10 * 4]) == PALETTE[0]  # the kept box's left edge
    assert (picture[35 * 4, 45 * 4] == 255).all()  # the low-score mask and box are not drawn
    tinted = picture[15 * 4 + 2, 15 * 4]
    assert not (tinted == 255).all() and (tinted >= 127).all()  # half white, half the first colour

    low = {**result, "scores": torch.tensor([0.2, 0.1])}
    picture = np.asarray(draw_result(image, low, ["circle", "square"], min_side=48))
    assert tuple(picture[15, 10]) == PALETTE[0] and (picture[35, 45] == 255).all()  # only the best one


def test_a_semantic_map_tints_its_groups_and_leaves_the_background():
    image = Image.new("RGB", (8, 8), (255, 255, 255))
    semantic = torch.full((8, 8), -1)
    semantic[0:4, 0:4] = 1
    picture = np.asarray(draw_result(image, {"semantic": semantic}, ["circle", "square"], min_side=8))
    expected = (0.5 * 255 + 0.5 * np.array(PALETTE[1])).astype(np.uint8)
    assert (picture[:4, :4] == expected).all() and (picture[4:, :] == 255).all() and (picture[:, 4:] == 255).all()
