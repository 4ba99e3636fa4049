"""Anyres grid rule on hand-computed cases, tiling order, and image loading/conversion errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vllm2.images import anyres_tiles, choose_grid, load_image, to_rgb


@pytest.mark.parametrize(
    "size, expected",
    [
        ((336, 336), (1, 1)),  # square, small: tie between 1x1 and 2x2 kept at 1x1 (area <= half of 2x2)
        ((1000, 1000), (2, 2)),  # square, large: tie -> 2x2 since 1e6 > 0.5 * 336^2 * 4
        ((1344, 336), (4, 1)),  # wide 4:1
        ((336, 1344), (1, 4)),  # tall 1:4
        ((700, 330), (2, 1)),  # 2.12 closest to 2
        ((20, 10), (2, 1)),  # tiny wide image still picks the 2:1 grid
        ((10, 10), (1, 1)),  # tiny square
        ((8000, 6000), (2, 2)),  # huge 4:3: 1x1 and 2x2 tie at |1.33-1|; the image is large, so 2x2 wins
        ((9000, 3000), (3, 1)),  # huge 3:1
    ],
)
def test_choose_grid_hand_computed(size, expected):
    assert choose_grid(*size, tile=336, max_tiles=4) == expected


def test_choose_grid_respects_max_tiles():
    assert choose_grid(6000, 1000, tile=336, max_tiles=6) == (6, 1)
    assert choose_grid(6000, 1000, tile=336, max_tiles=4) == (4, 1)


def test_anyres_tiles_row_major_and_thumbnail_last():
    arr = np.zeros((112, 56, 3), dtype=np.uint8)  # 1 column x 2 rows at tile 56
    arr[:56] = (255, 0, 0)
    arr[56:] = (0, 0, 255)
    tiles = anyres_tiles(Image.fromarray(arr), tile=56, max_tiles=4)
    assert len(tiles) == 3  # 2 grid tiles + thumbnail
    assert np.asarray(tiles[0])[28, 28].tolist() == [255, 0, 0]
    assert np.asarray(tiles[1])[28, 28].tolist() == [0, 0, 255]
    thumb = np.asarray(tiles[2])
    assert thumb.shape == (56, 56, 3) and thumb[5, 28, 0] > 200 and thumb[50, 28, 2] > 200


def test_single_tile_has_no_thumbnail():
    assert len(anyres_tiles(Image.new("RGB", (50, 50)), tile=56, max_tiles=4)) == 1


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "1"])
def test_modes_convert_to_rgb(mode, tmp_path):
    img = Image.new(mode, (10, 8))
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 10), 65535, dtype=np.uint16))
    path = tmp_path / ("x.tiff" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (10, 8)
    if mode == "I;16":
        assert np.asarray(out).min() == 255  # full-scale 16-bit maps to white, not clipped garbage


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_missing_image_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_corrupt_image_names_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(path)


def test_decompression_bomb_refused(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (200, 200)).save(path)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(path, max_pixels=1000)
