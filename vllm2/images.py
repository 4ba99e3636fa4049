"""Image loading (safe conversions, clear errors) and the dynamic-resolution ("anyres") tiling rule."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["MAX_IMAGE_PIXELS", "ImageTooLarge", "load_image", "decode_image", "to_rgb", "choose_grid", "anyres_tiles"]

MAX_IMAGE_PIXELS = 89_478_485  # decompression-bomb limit (PIL's default); the default of every image loader


class ImageTooLarge(ValueError):
    """An image with more pixels than allowed (a possible decompression bomb)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert grayscale, 16-bit, palette, CMYK and alpha images to 8-bit RGB (alpha composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)  # [H, W]
        scale = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read an image file as RGB.

    Args:
        path: image file.
        max_pixels: images with more pixels are refused (decompression bombs).
    Returns:
        The decoded RGB image.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image, or is too large.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    return _read(path, repr(str(path)), max_pixels)


def decode_image(data: bytes, max_pixels: int, name: str = "from bytes") -> Image.Image:
    """Decode the bytes of an image file as RGB, with the guards of :func:`load_image`.

    Args:
        data: the file's bytes (PNG, JPEG, ...).
        max_pixels: images with more pixels are refused before decoding (decompression bombs).
        name: how error messages name the image.
    Raises:
        ValueError: not a readable image; :class:`ImageTooLarge` (a ``ValueError``): too many pixels.
    """
    return _read(io.BytesIO(data), name, max_pixels)


def _read(source: Path | BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Open, check the pixel count from the header, then decode and convert to RGB."""
    try:
        with Image.open(source) as img:
            if img.width * img.height > max_pixels:
                raise ImageTooLarge(f"image {name} has {img.width}x{img.height} pixels, over the limit of "
                                    f"{max_pixels} (possible decompression bomb)")
            img.load()
            return to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image {name}: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {name}: {err}") from err


def choose_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """The official anyres grid choice.

    Candidates are grids ``(cols, rows)`` with ``1 <= cols*rows <= max_tiles``, visited by increasing area. The grid
    whose aspect ratio is closest to ``width/height`` wins; on an exact tie a later (larger) grid wins only when the
    image area exceeds half the grid's pixel area.

    Returns:
        ``(cols, rows)``.
    """
    aspect = width / height
    grids = sorted(
        {(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1) if i * j <= max_tiles},
        key=lambda g: (g[0] * g[1], g[0], g[1]),
    )
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def anyres_tiles(image: Image.Image, tile: int, max_tiles: int) -> list[Image.Image]:
    """Cut an image into row-major ``tile x tile`` tiles of its best grid, plus a global thumbnail LAST when the grid
    has more than one tile."""
    cols, rows = choose_grid(image.width, image.height, tile, max_tiles)
    resized = image.resize((cols * tile, rows * tile), Image.BICUBIC)
    tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((tile, tile), Image.BICUBIC))
    return tiles
