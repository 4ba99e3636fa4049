"""Stage 0 of a diffusion decoder: train its UNet alone on the text encoder's embeddings of the captions.

The real decoders come pretrained: Stable Diffusion and InstructPix2Pix learned on CLIP text embeddings long before
VisionLLM v2 maps its ``[GEN]`` / ``[EDIT]`` query states onto that space (the alignment loss pulls the mapped
states to the text encoder's embedding of the caption or instruction). A small world has no such weights, so this
makes them: the ``sd`` or ``ip2p`` decoder of a config, alone, denoises its tasks' targets conditioned on the frozen
text encoder's embedding of each caption (with the decoder's own conditioning dropout; the null prompt is the
embedding of the empty caption, as in InstructPix2Pix), and the result is written as a local diffusers folder
(``unet``, ``vae`` unless pixel-space, ``scheduler``, ``text_encoder``), the folder ``decoders.<name>.pretrained_path``
loads. No LLM is involved, so it can run beside the tower's stage 0 and stage 1.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from decoders import build_decoder
from decoders.diffusion import LatentDiffusionDecoder

from .config import VLLM2Config
from .data import build_mixture
from .data.mixture import READERS
from .modeling import load_decoder_weights
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["pretrain_diffusion", "decoder_data"]


def decoder_data(cfg: VLLM2Config, name: str) -> dict[str, Any]:
    """``cfg.data`` narrowed to the datasets whose task routes to decoder ``name`` (e.g. ``t2i`` for ``sd``).

    Raises:
        ValueError: no route goes to ``name``, or no dataset has one of its tasks.
    """
    tasks = {task for route in cfg.route_table().routes if route.decoder == name for task in route.tasks}
    if not tasks:
        raise ValueError(f"decoder {name!r}: no route in superlink.routes goes to it")
    entries = [e for e in cfg.data["datasets"] if (e.get("task") or getattr(READERS.get(e.get("type")), "task", None))
               in tasks]
    if not entries:
        raise ValueError(f"config key data.datasets: no dataset of the tasks {sorted(tasks)} of decoder {name!r}")
    return {**cfg.data, "datasets": entries}


def _build(cfg: VLLM2Config, name: str) -> LatentDiffusionDecoder:
    """The decoder of ``cfg.decoders[name]`` with its text encoder's tokenizer (and ``pretrained_path`` loaded)."""
    config = cfg.decoders.get(name)
    if config is None:
        raise ValueError(f"config key decoders.{name}: not configured")
    decoder = build_decoder(name, config, cfg.llm.hidden_size)
    if not isinstance(decoder, LatentDiffusionDecoder) or decoder.sd_text_encoder is None:
        raise ValueError(f"config key decoders.{name}: stage 0 trains a diffusion decoder with a text encoder "
                         "(use_text_encoder: true)")
    load_decoder_weights(decoder, config, lambda: load_tokenizer(*cfg.tokenizer_source(), routes=cfg.route_table()))
    return decoder


def pretrain_diffusion(cfg: VLLM2Config, name: str, out: str | Path, steps: int, batch_size: int = 24,
                       lr: float = 2e-3, seed: int = 0,
                       progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train decoder ``name``'s UNet on caption embeddings and write ``OUT`` (a diffusers folder) and
    ``OUT/stage0.json``.

    Args:
        cfg: the project config (its ``decoders.<name>``, routes and data).
        name: ``"sd"`` or ``"ip2p"`` (any diffusion decoder with a text encoder).
        out: output folder.
        steps / batch_size / lr: AdamW steps (cosine decay after 5% warm-up), samples per step, peak learning rate.
        seed: seed of the batches, noise and dropout (the text encoder is the config's, seeded by ``training.seed``).
        progress: called with (step, loss) after each step.
    Returns:
        The summary written to ``stage0.json``.
    """
    torch.manual_seed(cfg.training.seed)
    decoder = _build(cfg, name).train()
    data = build_mixture(decoder_data(cfg, name), cfg.route_table(), max_image_pixels=cfg.vision.max_image_pixels)
    decoder.requires_grad_(False)
    decoder.sd_unet.requires_grad_(True)
    if decoder.config.null_prompt == "learned":
        decoder.reset_null_prompt()
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, round(0.05 * steps), steps)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        samples = [data[int(i)] for i in rng.integers(len(data), size=batch_size)]
        targets = [s.targets[name] for s in samples]
        inputs = decoder.prepare([s.images[0] if s.images else None for s in samples], targets)
        prompts = decoder.caption_prompts([t["caption"] for t in targets])  # [B, T, C]
        loss = decoder.diffusion_loss(prompts, torch.arange(batch_size), inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.training.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, losses[-1])
    out = Path(out)
    decoder.save_pretrained(out)
    summary = {"decoder": name, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
               "samples": len(data), "seconds": round(time.perf_counter() - start, 1), "first_loss": losses[0],
               "last_loss": float(np.mean(losses[-50:])), "folder": str(out)}
    (out / "stage0.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("stage 0 of %s: %d steps in %.0f s, loss %.3f -> %.3f; wrote %s", name, steps, summary["seconds"],
                losses[0], summary["last_loss"], out)
    return summary
