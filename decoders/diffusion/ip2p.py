"""The ``ip2p`` decoder: instruction-based image editing from ``[EDIT]`` query states with InstructPix2Pix."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from PIL import Image

from ..base import register_decoder
from .common import LatentDiffusionDecoder, check_image, image_to_pixels, ip2p_drop_masks
from .config import IP2PConfig

__all__ = ["InstructPix2PixDecoder"]


@register_decoder("ip2p")
class InstructPix2PixDecoder(LatentDiffusionDecoder):
    """InstructPix2Pix conditioned on prompt embeddings mapped from super-link query states.

    The UNet reads 8 channels: the noisy latent of the edited image ⊕ the VAE posterior mode of the input image.
    Input and target images are resized to ``resolution`` squared; the edited image is resized back to the input's
    size. Training drops the prompt, the image, or both (exclusive events at ``text_drop_prob``,
    ``image_drop_prob``, ``both_drop_prob``). Inference: ``StableDiffusionInstructPix2PixPipeline`` with ``image=``,
    ``prompt_embeds`` and the null prompt as ``negative_prompt_embeds``.

    Args:
        config: :class:`IP2PConfig`.
        llm_hidden_size: width of the query states.
    """

    config_class = IP2PConfig

    config: IP2PConfig
    latent_groups = 2
    inference_options_extra = ("image_guidance_scale",)

    def __init__(self, config: IP2PConfig, llm_hidden_size: int) -> None:
        super().__init__(config, llm_hidden_size)

    def prepare(self, images: list[Any], targets: list[dict] | None = None) -> dict[str, Any]:
        """Input (and target) images to ``[B, 3, R, R]`` pixels in [-1, 1].

        Args:
            images: per sample the PIL image to edit.
            targets: per sample ``{"image": PIL edited image, "caption": optional str}``; None at inference.

        Returns:
            ``{"input_pixels", "input_sizes": list[(width, height)]}`` plus ``"target_pixels"`` and ``"captions"``
            with targets.
        """
        size = self.config.resolution
        inputs_rgb = [check_image(image, f"ip2p input image {i}") for i, image in enumerate(images)]
        prepared: dict[str, Any] = {
            "input_pixels": torch.stack([image_to_pixels(image, size, False) for image in inputs_rgb]),
            "input_sizes": [image.size for image in inputs_rgb],
        }
        if targets is not None:
            if len(targets) != len(images):
                raise ValueError(f"ip2p: {len(targets)} targets for {len(images)} images")
            prepared["target_pixels"] = torch.stack(
                [
                    image_to_pixels(check_image(target.get("image"), f"ip2p target {i} 'image'"), size, False)
                    for i, target in enumerate(targets)
                ]
            )
            prepared["captions"] = [target.get("caption") for target in targets]
        return prepared

    def conditioning(self, prompts: torch.Tensor, inputs: dict[str, Any], sample_index: torch.Tensor,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts and input-image latents, with the IP2P text / image / both dropout in training."""
        image_latents = self.encode_latents(inputs["input_pixels"], sample=False)[sample_index]  # [N, c, h, w]
        if not self.training:
            return prompts, image_latents
        cfg = self.config
        drop_text, drop_image = ip2p_drop_masks(
            prompts.shape[0], cfg.text_drop_prob, cfg.image_drop_prob, cfg.both_drop_prob, generator, self.device
        )  # [N], [N]
        prompts = torch.where(drop_text[:, None, None], self.null_prompt(prompts.shape[0]), prompts)
        return prompts, image_latents * (~drop_image).to(image_latents.dtype)[:, None, None, None]

    @torch.no_grad()
    def predict(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        inputs: dict[str, Any],
        route_ids: torch.Tensor | None = None,
        **options: Any,
    ) -> list[Image.Image | None]:
        """Edit each sample's input image with its first valid group.

        Args:
            queries: ``[B, G, K, C_llm]`` query states.
            query_mask: ``[B, G]`` bool.
            inputs: ``prepare(images, None)``.
            route_ids: unused.
            **options: ``num_inference_steps``, ``guidance_scale``, ``image_guidance_scale``, ``seed``, ``scheduler``.

        Returns:
            Per sample the edited PIL image at the input image's size, or None for a sample without a valid group.
        """
        opts = self.inference_options(options)
        if "input_pixels" not in inputs:
            raise ValueError("ip2p.predict: inputs must come from prepare(images) (missing 'input_pixels')")
        prompts, sample_index = self.first_group_prompts(queries, query_mask)  # [N, T, C], [N]
        results: list[Image.Image | None] = [None] * queries.shape[0]
        if prompts.shape[0] == 0:
            return results
        pipeline = self.pipeline(StableDiffusionInstructPix2PixPipeline, opts["scheduler"])
        dtype = self.sd_unet.dtype
        pixels = inputs["input_pixels"][sample_index.cpu()].to(self.device)  # [N, 3, R, R]
        images = pipeline(
            image=(pixels + 1.0) / 2.0,
            prompt_embeds=prompts.to(dtype),
            negative_prompt_embeds=self.null_prompt(prompts.shape[0]).to(dtype),
            num_inference_steps=opts["num_inference_steps"],
            guidance_scale=opts["guidance_scale"],
            image_guidance_scale=opts["image_guidance_scale"],
            generator=self.generators(prompts.shape[0], opts["seed"]),
            output_type="pil",
        ).images
        for i, image in zip(sample_index.tolist(), images):
            results[i] = image.resize(inputs["input_sizes"][i], Image.Resampling.BICUBIC)
        return results
