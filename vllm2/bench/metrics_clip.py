"""CLIP-based metrics for text-to-image generation and image editing, on an open_clip model with local weights.

- CLIP score: mean over prompts of ``100 * max(cos(image, text), 0)`` (Hessel et al.; torchmetrics multiplies by
  100 the same way but clamps the mean instead of each term; the two agree whenever no cosine is negative).
- CLIP-I: mean ``cos(output image, target image)``.
- CLIP-T: mean ``cos(output image, target caption or instruction)``.
- Directional CLIP similarity (InstructPix2Pix): mean ``cos(img_out - img_in, text_out - text_in)`` on unit
  embeddings. With input/output captions the text pair is (input caption, output caption); with only an instruction
  it is (the empty text ``""``, the instruction), i.e. the direction the instruction moves a null prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["ClipScorer", "clip_directional_similarity", "clip_image_similarity", "clip_score",
           "clip_text_similarity", "edit_metrics", "load_clip_scorer"]

logger = logging.getLogger(__name__)


@dataclass
class ClipScorer:
    """An open_clip model with its eval transform and tokenizer.

    Attributes:
        model: the CLIP model (``encode_image``, ``encode_text``).
        preprocess: PIL image -> ``[3, S, S]`` tensor.
        tokenizer: list of texts -> ``[N, L]`` token ids.
        batch_size: images / texts encoded per forward.
    """

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    batch_size: int = 32

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit image embeddings ``[N, D]``."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start : start + self.batch_size]])
            out.append(self.model.encode_image(pixels.to(self.device)).float())  # [n, D]
        return F.normalize(torch.cat(out), dim=-1)  # [N, D]

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings ``[N, D]``."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)  # [n, L]
            out.append(self.model.encode_text(ids).float())  # [n, D]
        return F.normalize(torch.cat(out), dim=-1)  # [N, D]


def load_clip_scorer(model_name: str, pretrained: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
    """An open_clip model from a LOCAL checkpoint file (never downloads).

    Args:
        model_name: an open_clip model name (built in, registered, or in ``configs/open_clip``), or the path of an
            open_clip model config JSON (its file stem becomes the name).
        pretrained: the checkpoint file (``.pt`` / ``.bin`` state dict or ``.safetensors``).
        device: where the model runs.
    Returns:
        The :class:`ClipScorer`.
    """
    import open_clip

    from ..vision import OPEN_CLIP_CONFIG_DIR

    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights: no checkpoint file at {path}")
    if model_name.endswith(".json"):
        config = Path(model_name)
        if not config.is_file():
            raise FileNotFoundError(f"CLIP model config {str(config)!r} does not exist")
        open_clip.add_model_config(config)
        model_name = config.stem
    elif model_name not in open_clip.list_models() and OPEN_CLIP_CONFIG_DIR.is_dir():
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
    if model_name not in open_clip.list_models():
        raise ValueError(f"CLIP model: unknown open_clip model {model_name!r} (register its config first)")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab > getattr(model, "vocab_size", vocab):
        raise ValueError(f"CLIP model {model_name!r}: its text vocabulary ({model.vocab_size}) is smaller than its "
                         f"tokenizer's ({vocab}); set text_cfg.vocab_size to {vocab} in the model config")
    logger.info("loaded CLIP scorer %s from %s", model_name, path)
    return ClipScorer(model.eval(), preprocess, tokenizer)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)  # [N]


def _check(n: int, **others: Sequence[Any]) -> None:
    for name, values in others.items():
        if len(values) != n:
            raise ValueError(f"{n} images but {len(values)} {name}")


def clip_score(scorer: ClipScorer, images: Sequence[Image.Image], texts: Sequence[str]) -> float:
    """Mean of ``100 * max(cos(image_i, text_i), 0)``."""
    _check(len(images), texts=texts)
    cos = _cosines(scorer.image_embeds(images), scorer.text_embeds(texts))  # [N]
    return float((100 * cos.clamp(min=0)).mean())


def clip_image_similarity(scorer: ClipScorer, outputs: Sequence[Image.Image], targets: Sequence[Image.Image]) -> float:
    """CLIP-I: mean cosine of output and target image embeddings."""
    _check(len(outputs), targets=targets)
    return float(_cosines(scorer.image_embeds(outputs), scorer.image_embeds(targets)).mean())


def clip_text_similarity(scorer: ClipScorer, outputs: Sequence[Image.Image], texts: Sequence[str]) -> float:
    """CLIP-T: mean cosine of output image and text embeddings."""
    _check(len(outputs), texts=texts)
    return float(_cosines(scorer.image_embeds(outputs), scorer.text_embeds(texts)).mean())


def clip_directional_similarity(
    scorer: ClipScorer,
    inputs: Sequence[Image.Image],
    outputs: Sequence[Image.Image],
    texts_in: Sequence[str],
    texts_out: Sequence[str],
) -> float:
    """Mean ``cos(E(out) - E(in), T(text_out) - T(text_in))`` over edits, on unit embeddings."""
    _check(len(inputs), outputs=outputs, texts_in=texts_in, texts_out=texts_out)
    image_dir = scorer.image_embeds(outputs) - scorer.image_embeds(inputs)  # [N, D]
    text_dir = scorer.text_embeds(texts_out) - scorer.text_embeds(texts_in)  # [N, D]
    return float(F.cosine_similarity(image_dir, text_dir, dim=-1).mean())


def edit_metrics(
    scorer: ClipScorer,
    inputs: Sequence[Image.Image],
    outputs: Sequence[Image.Image],
    targets: Sequence[Image.Image] | None,
    instructions: Sequence[str],
    input_captions: Sequence[str] | None = None,
    output_captions: Sequence[str] | None = None,
) -> dict[str, float]:
    """CLIP-I (when target images exist), CLIP-T and directional similarity of a set of edits.

    CLIP-T uses the output captions when given, else the instructions. The directional text pair is
    (input caption, output caption) when both are given, else (``""``, instruction).
    """
    texts = list(output_captions) if output_captions is not None else list(instructions)
    if input_captions is not None and output_captions is not None:
        pair_in, pair_out = list(input_captions), list(output_captions)
    else:
        pair_in, pair_out = [""] * len(instructions), list(instructions)
    result = {"CLIP-T": clip_text_similarity(scorer, outputs, texts),
              "CLIP-dir": clip_directional_similarity(scorer, inputs, outputs, pair_in, pair_out)}
    if targets is not None:
        result["CLIP-I"] = clip_image_similarity(scorer, outputs, targets)
    return result
