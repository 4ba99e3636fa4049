"""Pictures of results: boxes with labels, masks, keypoint skeletons drawn on the image."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["draw_result", "PALETTE"]

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def draw_result(image: Image.Image, result: dict, phrases: Sequence[str] = (),
                skeleton: Sequence[tuple[int, int]] = ()) -> Image.Image:
    """Draw a detection/segmentation/pose result.

    Args:
        image: the original image.
        result: ``boxes [n,4]`` xyxy pixels, ``labels [n]`` group indices, ``scores [n]``, optional ``masks [n,H,W]``
            and ``keypoints [n,K,3]``.
        phrases: the name of each group (label index -> text).
        skeleton: keypoint index pairs to connect.
    Returns:
        A new RGB image.
    """
    canvas = image.convert("RGB").copy()
    labels = _to_numpy(result.get("labels", [])).astype(int).reshape(-1)
    if result.get("masks") is not None:
        arr = np.asarray(canvas, dtype=np.float32)
        for mask, label in zip(_to_numpy(result["masks"]).astype(bool), labels):
            arr[mask] = 0.5 * arr[mask] + 0.5 * np.array(PALETTE[label % len(PALETTE)], dtype=np.float32)
        canvas = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    scores = _to_numpy(result.get("scores", np.ones(len(labels)))).reshape(-1)
    for box, label, score in zip(_to_numpy(result.get("boxes", np.zeros((0, 4)))).reshape(-1, 4), labels, scores):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle([float(v) for v in box], outline=colour, width=2)
        name = phrases[label] if 0 <= label < len(phrases) else str(label)
        draw.text((float(box[0]) + 2, float(box[1]) + 1), f"{name} {score:.2f}", fill=colour)
    for person in _to_numpy(result.get("keypoints", np.zeros((0, 0, 3)))):
        for a, b in skeleton:
            if a < len(person) and b < len(person):
                draw.line([tuple(person[a][:2]), tuple(person[b][:2])], fill=(255, 255, 255), width=2)
        for k, (x, y, _) in enumerate(person):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=PALETTE[k % len(PALETTE)])
    return canvas
