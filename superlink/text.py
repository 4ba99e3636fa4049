"""Text transmission (the VisionLLM v1 baseline): boxes and points written as location tokens in the LLM's own text.

Instead of query embeddings, the LLM writes coordinates as location tokens ``<loc-512>`` ... ``<loc512>`` (``n`` bins
spread evenly over the image side, ``-(n-1)/2`` at the left/top edge and ``(n-1)/2`` at the right/bottom edge; the
v1 default is 1025 bins) and tags elements with semantics-free class tokens ``<c0>`` ... ``<c511>`` that the prompt
binds to names (``circle<c0>, square<c1>``). An answer is a sequence of elements:

- ``<ck>`` + 4 locations: a box ``x1 y1 x2 y2`` of class ``k`` (detection; the object of a pose instance);
- 4 locations without a class token: a box (grounding);
- ``<ck>`` + 2 locations: a point ``x y`` of class ``k``, belonging to the last box before it (keypoints).

Anything else (a wrong number of locations, a point before any box, a box with ``x2 < x1``) is malformed: it is
skipped and counted, never raised. This module is pure string handling; the tokenizer holds :attr:`TextLink.tokens`
as single ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["CLASS_TOKEN", "TextLink", "ParsedText", "TextBox"]

CLASS_TOKEN = re.compile(r"<c(\d+)>")  # a class token; group 1 is its index
_LOC = re.compile(r"<loc(-?\d+)>")


@dataclass
class TextBox:
    """One parsed box: its class token index (None: untagged), ``xyxy`` pixels and the points written after it."""

    label: int | None
    box: tuple[float, float, float, float]
    points: dict[int, tuple[float, float]] = field(default_factory=dict)  # class index -> (x, y)


@dataclass
class ParsedText:
    """The elements of one answer: its boxes in text order and the number of malformed elements skipped."""

    boxes: list[TextBox] = field(default_factory=list)
    malformed: int = 0


@dataclass(frozen=True)
class TextLink:
    """The location and class vocabulary of text transmission.

    Args:
        location_bins: bins per image side (odd counts centre on ``<loc0>``; v1: 1025).
        class_tokens: number of class tokens ``<c0>`` ... (v1: 512).
    """

    location_bins: int = 1025
    class_tokens: int = 512

    def __post_init__(self) -> None:
        if self.location_bins < 2:
            raise ValueError(f"superlink.location_bins must be >= 2, got {self.location_bins}")
        if self.class_tokens < 1:
            raise ValueError(f"superlink.class_tokens must be >= 1, got {self.class_tokens}")

    @property
    def _low(self) -> int:
        return -((self.location_bins - 1) // 2)

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every location token (left to right) then every class token."""
        locs = tuple(f"<loc{v}>" for v in range(self._low, self._low + self.location_bins))
        return locs + tuple(f"<c{k}>" for k in range(self.class_tokens))

    # -------------------------------------------------------------------------------------------- writing

    def cls(self, k: int) -> str:
        """The class token of index ``k``."""
        if not 0 <= k < self.class_tokens:
            raise ValueError(f"class index {k} needs more class tokens (superlink.class_tokens={self.class_tokens})")
        return f"<c{k}>"

    def loc(self, value: float, extent: float) -> str:
        """The location token nearest to ``value`` pixels on a side of ``extent`` pixels (clamped to the image)."""
        step = round(min(max(value / extent, 0.0), 1.0) * (self.location_bins - 1))
        return f"<loc{self._low + step}>"

    def box(self, box: Sequence[float], width: float, height: float) -> str:
        """Four location tokens of an ``xyxy`` pixel box."""
        x1, y1, x2, y2 = box
        return self.loc(x1, width) + self.loc(y1, height) + self.loc(x2, width) + self.loc(y2, height)

    def point(self, x: float, y: float, width: float, height: float) -> str:
        """Two location tokens of a pixel point."""
        return self.loc(x, width) + self.loc(y, height)

    def declare(self, names: Sequence[str]) -> str:
        """The prompt clause binding names to class tokens: ``Classes: circle<c0>, square<c1>.``"""
        return "Classes: " + ", ".join(f"{name}{self.cls(k)}" for k, name in enumerate(names)) + "."

    # -------------------------------------------------------------------------------------------- reading

    def _step(self, token: str) -> int | None:
        """The bin (0 .. location_bins - 1) of a location token, else None."""
        match = _LOC.fullmatch(token)
        step = int(match.group(1)) - self._low if match else -1
        return step if 0 <= step < self.location_bins else None

    def _class(self, token: str) -> int | None:
        match = CLASS_TOKEN.fullmatch(token)
        return int(match.group(1)) if match and int(match.group(1)) < self.class_tokens else None

    def parse(self, tokens: Sequence[str], width: float, height: float) -> ParsedText:
        """Read the elements of an answer.

        Args:
            tokens: the answer's tokens as strings (other tokens end an element).
            width, height: the image size in pixels.
        Returns:
            The boxes (with their points) and the malformed count.
        """
        out = ParsedText()
        label: int | None = None
        steps: list[int] | None = None  # the bins of the element being read; None between elements

        def flush() -> None:
            if steps is None:
                return
            xs = [s / (self.location_bins - 1) * (width if i % 2 == 0 else height) for i, s in enumerate(steps)]
            if len(xs) == 4 and xs[2] >= xs[0] and xs[3] >= xs[1]:
                out.boxes.append(TextBox(label, (xs[0], xs[1], xs[2], xs[3])))
            elif len(xs) == 2 and label is not None and out.boxes and label not in out.boxes[-1].points:
                out.boxes[-1].points[label] = (xs[0], xs[1])
            else:
                out.malformed += 1

        for token in tokens:
            k, step = self._class(token), self._step(token)
            if k is not None:
                flush()
                label, steps = k, []
            elif step is not None:
                if steps is None:
                    label, steps = None, []
                steps.append(step)
            else:
                flush()
                steps = None
        flush()
        return out
