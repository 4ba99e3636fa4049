"""The ``sd`` decoder: text-to-image generation from ``[GEN]`` query states with Stable Diffusion."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ..base import register_decoder
from .common import LatentDiffusionDecoder, check_image, drop_mask, image_to_pixels
from .config import SDConfig

__all__ = ["StableDiffusionDecoder"]


@register_decoder("sd")
class StableDiffusionDecoder(LatentDiffusionDecoder):
    """Stable Diffusion conditioned on prompt embeddings mapped from super-link query states.

    Training: ε-MSE on the VAE latents of the target image, plus ``align_loss_weight`` × MSE of the prompt embeddings
    against the CLIP text embedding of the caption (when given and a tokenizer is set). In training mode each prompt
    is replaced by the null prompt with probability ``cfg_drop_prob``.
    Inference: ``StableDiffusionPipeline`` with ``prompt_embeds`` and the null prompt as ``negative_prompt_embeds``.

    Args:
        config: :class:`SDConfig`.
        llm_hidden_size: width of the query states.
    """

    config_class = SDConfig

    config: SDConfig
    inference_options_extra = ("height", "width")

    def __init__(self, config: SDConfig, llm_hidden_size: int) -> None:
        super().__init__(config, llm_hidden_size)

    def prepare(self, images: list[Any], targets: list[dict] | None = None) -> dict[str, Any]:
        """Target images to ``[B, 3, R, R]`` pixels in [-1, 1] (shorter side resized to R, centre crop).

        Args:
            images: unused (text-to-image samples have no input image).
            targets: per sample ``{"image": PIL target, "caption": optional str}``; None at inference.

        Returns:
            ``{}`` without targets, else ``{"target_pixels": [B, 3, R, R], "captions": list[str | None]}``.
        """
        if targets is None:
            return {}
        pixels = [
            image_to_pixels(check_image(target.get("image"), f"sd target {i} 'image'"), self.config.resolution, True)
            for i, target in enumerate(targets)
        ]
        return {"target_pixels": torch.stack(pixels), "captions": [target.get("caption") for target in targets]}

    def conditioning(self, prompts: torch.Tensor, inputs: dict[str, Any], sample_index: torch.Tensor,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, None]:
        """Prompts, each replaced by the null prompt with probability ``cfg_drop_prob`` in training."""
        if not self.training:
            return prompts, None
        dropped = drop_mask(prompts.shape[0], self.config.cfg_drop_prob, generator, self.device)  # [N]
        return torch.where(dropped[:, None, None], self.null_prompt(prompts.shape[0]), prompts), None

    @torch.no_grad()
    def predict(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        inputs: dict[str, Any],
        route_ids: torch.Tensor | None = None,
        **options: Any,
    ) -> list[Image.Image | None]:
        """Generate one image per sample from its first valid group.

        Args:
            queries: ``[B, G, K, C_llm]`` query states.
            query_mask: ``[B, G]`` bool.
            inputs: unused (may be ``prepare(images, None)``).
            route_ids: unused.
            **options: ``num_inference_steps``, ``guidance_scale``, ``seed``, ``scheduler``, ``height``, ``width``
                (default: the config; size defaults to ``resolution``).

        Returns:
            Per sample a PIL image, or None for a sample without a valid group.
        """
        opts = self.inference_options(options)
        prompts, sample_index = self.first_group_prompts(queries, query_mask)  # [N, T, C], [N]
        results: list[Image.Image | None] = [None] * queries.shape[0]
        if prompts.shape[0] == 0:
            return results
        pipeline = self.pipeline(StableDiffusionPipeline, opts["scheduler"])
        dtype = self.sd_unet.dtype
        images = pipeline(
            prompt_embeds=prompts.to(dtype),
            negative_prompt_embeds=self.null_prompt(prompts.shape[0]).to(dtype),
            height=opts["height"] or self.config.resolution,
            width=opts["width"] or self.config.resolution,
            num_inference_steps=opts["num_inference_steps"],
            guidance_scale=opts["guidance_scale"],
            generator=self.generators(prompts.shape[0], opts["seed"]),
            output_type="pil",
        ).images
        for i, image in zip(sample_index.tolist(), images):
            results[i] = image
        return results
