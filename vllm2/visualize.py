"""Pictures of results: boxes with labels, masks, keypoint skeletons drawn on the image."""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["contact_sheet", "draw_result", "PALETTE"]

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def draw_result(image: Image.Image, result: dict, phrases: Sequence[str] = (),
                skeleton: Sequence[tuple[int, int]] = (), min_score: float = 0.3,
                min_side: int = 384) -> Image.Image:
    """Draw a detection/segmentation/pose result.

    Args:
        image: the original image.
        result: ``boxes [n,4]`` xyxy pixels, ``labels [n]`` group indices, ``scores [n]``, optional ``masks [n,H,W]``,
            ``semantic [H,W]`` (group index per pixel, -1 none) and ``keypoints [n,K,3]``.
        phrases: the name of each group (label index -> text).
        skeleton: keypoint index pairs to connect.
        min_score: results scoring less are not drawn (the best one always is).
        min_side: small images are enlarged (nearest neighbour) until their shorter side reaches this, so labels stay
            readable.
    Returns:
        A new RGB image.
    """
    labels = _to_numpy(result.get("labels", [])).astype(int).reshape(-1)
    scores = _to_numpy(result.get("scores", np.ones(len(labels)))).reshape(-1)
    keep = scores >= min(min_score, scores.max()) if len(scores) else np.zeros(0, dtype=bool)
    canvas = image.convert("RGB")
    masks = []  # (bool [H, W], group index) pairs to tint
    if result.get("masks") is not None:
        masks += list(zip(_to_numpy(result["masks"]).astype(bool)[keep], labels[keep]))
    if result.get("semantic") is not None:
        semantic = _to_numpy(result["semantic"]).astype(int)  # [H, W]
        masks += [(semantic == g, g) for g in np.unique(semantic[semantic >= 0])]
    if masks:
        arr = np.asarray(canvas, dtype=np.float32).copy()  # [H, W, 3]
        for mask, label in masks:
            arr[mask] = 0.5 * arr[mask] + 0.5 * np.array(PALETTE[label % len(PALETTE)], dtype=np.float32)
        canvas = Image.fromarray(arr.astype(np.uint8))
    scale = max(1, -(-min_side // min(canvas.size)))
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    boxes = _to_numpy(result.get("boxes", np.zeros((0, 4)))).reshape(-1, 4) * scale
    for box, label, score in zip(boxes[keep], labels[keep], scores[keep]):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle([float(v) for v in box], outline=colour, width=2)
        name = phrases[label] if 0 <= label < len(phrases) else str(label)
        draw.text((float(box[0]) + 3, float(box[1]) + 2), f"{name} {score:.2f}", fill=colour)
    people = _to_numpy(result.get("keypoints", np.zeros((0, 0, 3))))
    for person in people[keep] if len(people) == len(keep) else people:
        points = [(float(x) * scale, float(y) * scale) for x, y, _ in person]
        for a, b in skeleton:
            if a < len(points) and b < len(points):
                draw.line([points[a], points[b]], fill=(255, 255, 255), width=2)
        for k, (x, y) in enumerate(points):
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=PALETTE[k % len(PALETTE)], outline=(0, 0, 0))
    return canvas


def contact_sheet(tiles: Sequence[tuple[Image.Image | None, str]], side: int = 192, columns: int = 4,
                  text_lines: int = 5) -> Image.Image:
    """Pictures side by side, each scaled to ``side`` pixels with its caption wrapped underneath.

    Args:
        tiles: ``(picture or None, caption)`` pairs; None leaves the picture area blank.
        side: picture size of a tile.
        columns: tiles per row.
        text_lines: caption lines kept per tile.
    Returns:
        The sheet (RGB, white background).
    """
    width = max(1, side // 6)  # characters per caption line of the default font
    height = side + 12 * text_lines + 8
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * side + (columns + 1) * 4, rows * height + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (picture, caption) in enumerate(tiles):
        x, y = 4 + (i % columns) * (side + 4), 4 + (i // columns) * height
        if picture is not None:
            sheet.paste(picture.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width)[:text_lines]
        draw.multiline_text((x, y + side + 4), "\n".join(lines), fill=(0, 0, 0), spacing=2)
    return sheet
