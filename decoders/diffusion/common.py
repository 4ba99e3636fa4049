"""What the generation and editing decoders share: image preprocessing, conditioning dropout, and
:class:`LatentDiffusionDecoder` (mapper, UNet, VAE, text encoder, noise schedule, losses, local loading)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from ..base import Decoder, DecoderOutput
from .components import (
    SCHEDULER_CLASSES,
    build_text_encoder,
    build_unet,
    build_vae,
    encode_text,
    load_scheduler_config,
    load_tokenizer,
    load_weights,
    scheduler_config,
)
from .config import DiffusionConfig
from .mapper import PromptMapper

__all__ = ["LatentDiffusionDecoder", "drop_mask", "ip2p_drop_masks", "image_to_pixels", "check_image"]

logger = logging.getLogger(__name__)


def check_image(image: Any, where: str) -> Image.Image:
    """Return ``image`` as RGB, or raise ``TypeError`` naming ``where``."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{where} must be a PIL image, got {type(image).__name__}")
    return image.convert("RGB")


def image_to_pixels(image: Image.Image, size: int, center_crop: bool) -> torch.Tensor:
    """An RGB PIL image as a ``[3, size, size]`` float tensor in [-1, 1].

    Args:
        image: RGB image.
        size: output side.
        center_crop: resize the shorter side to ``size`` and crop the centre (keeps the aspect ratio); otherwise
            resize both sides to ``size``.
    """
    if center_crop:
        image = TF.center_crop(TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC), [size, size])
    else:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return TF.pil_to_tensor(image).float() / 127.5 - 1.0  # [3, size, size]


def drop_mask(n: int, prob: float, generator: torch.Generator | None = None, device: Any = None) -> torch.Tensor:
    """Bernoulli(``prob``) mask ``[n]`` (True = drop the condition), exactly at rate ``prob``."""
    return torch.rand(n, generator=generator, device=device) < prob  # [n]


def ip2p_drop_masks(
    n: int,
    text_prob: float,
    image_prob: float,
    both_prob: float,
    generator: torch.Generator | None = None,
    device: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructPix2Pix conditioning dropout: three exclusive events per sample.

    With one uniform draw ``u``: ``[0, text)`` drops only the prompt, ``[text, text+both)`` drops both and
    ``[text+both, text+both+image)`` drops only the image, so the prompt is dropped at rate ``text+both`` and the
    image at rate ``image+both``.

    Returns:
        ``(drop_text [n], drop_image [n])`` bool masks.
    """
    u = torch.rand(n, generator=generator, device=device)  # [n]
    drop_text = u < text_prob + both_prob  # [n]
    drop_image = (u >= text_prob) & (u < text_prob + both_prob + image_prob)  # [n]
    return drop_text, drop_image


class LatentDiffusionDecoder(PromptMapper, Decoder):
    """Base of the ``sd`` and ``ip2p`` decoders.

    Attribute names follow the official checkpoint: ``emb_proj``, ``llm2sd_mapper``, ``llm2sd_mapper_queries``,
    ``sd_unet``, ``sd_vae``, ``sd_text_encoder``. The VAE and the text encoder are frozen; the UNet trains when
    ``config.train_unet`` (frozen, it still passes gradients to the prompt embeddings). ``null_prompt_embeds``
    exists only with ``null_prompt="learned"``.

    Args:
        config: the decoder config.
        llm_hidden_size: width of the query states.
    """

    latent_groups: ClassVar[int] = 1
    """UNet input = this many latent-sized tensors concatenated on channels (1: noisy latent; 2: ⊕ input image)."""
    inference_options_extra: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DiffusionConfig, llm_hidden_size: int) -> None:
        config.validate()
        super().__init__(
            llm_hidden_size,
            config.cross_attention_dim,
            config.num_prompt_tokens,
            config.mapper_encoder_layers,
            config.mapper_decoder_layers,
            config.mapper_heads,
            config.mapper_ffn_dim,
            config.mapper_dropout,
        )
        self.config = config
        self.sd_unet = build_unet(config, config.vae_latent_channels * self.latent_groups)
        self.sd_vae = build_vae(config)
        self.sd_text_encoder = build_text_encoder(config) if config.use_text_encoder else None
        self.sd_tokenizer: PreTrainedTokenizerBase | None = None
        self.scheduler_config = scheduler_config(config)
        self.sd_noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        if config.null_prompt == "learned":
            self.null_prompt_embeds = nn.Parameter(torch.zeros(1, config.num_prompt_tokens, config.cross_attention_dim))
        self.register_buffer("empty_prompt_embeds", None, persistent=False)
        self.sd_vae.requires_grad_(False)
        if self.sd_text_encoder is not None:
            self.sd_text_encoder.requires_grad_(False)
        self.sd_unet.requires_grad_(config.train_unet)
        if config.gradient_checkpointing:
            self.sd_unet.enable_gradient_checkpointing()
        self._warned_truncated = False

    @property
    def device(self) -> torch.device:
        return self.llm2sd_mapper_queries.device

    # ----------------------------------------------------------------- query states -> prompt embeddings
    def _check_queries(self, queries: torch.Tensor, query_mask: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``queries`` is ``[B, G, K, C]`` with its routes' K (any K while unbound)."""
        if queries.dim() != 4 or (self.num_embs is not None and queries.shape[2] != self.num_embs):
            k = "K" if self.num_embs is None else self.num_embs
            raise ValueError(f"{self.name}: queries must be [B, G, {k}, C] (K = its routes' num_embs), "
                             f"got {tuple(queries.shape)}")
        if query_mask.shape != queries.shape[:2]:
            raise ValueError(
                f"{self.name}: query_mask {tuple(query_mask.shape)} must be [B, G] = {tuple(queries.shape[:2])}"
            )

    def group_prompts(self, queries: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings of every valid group.

        Args:
            queries: ``[B, G, K, C_llm]``.
            query_mask: ``[B, G]`` bool.

        Returns:
            ``(prompts [N, T, C_text], sample_index [N])`` for the N valid groups, in (sample, group) order.
        """
        self._check_queries(queries, query_mask)
        sample_index, group_index = query_mask.nonzero(as_tuple=True)  # [N], [N]
        return self.map_queries(queries[sample_index, group_index]), sample_index.to(self.device)  # [N, T, C]

    def first_group_prompts(self, queries: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings of each sample's first valid group: ``(prompts [N, T, C], sample_index [N])``."""
        self._check_queries(queries, query_mask)
        sample_index = query_mask.any(dim=1).nonzero(as_tuple=True)[0]  # [N]
        group_index = query_mask.int().argmax(dim=1)[sample_index]  # [N]
        return self.map_queries(queries[sample_index, group_index]), sample_index.to(self.device)  # [N, T, C]

    def null_prompt(self, n: int) -> torch.Tensor:
        """The unconditional prompt embedding repeated ``n`` times, ``[n, T, C]``."""
        if self.config.null_prompt == "learned":
            return self.null_prompt_embeds.expand(n, -1, -1)  # [n, T, C]
        if self.empty_prompt_embeds is None:
            if self.sd_tokenizer is None:
                raise RuntimeError(
                    f"{self.name}: null_prompt='empty' needs the CLIP tokenizer; call load_pretrained(path) or "
                    "set_tokenizer(tokenizer), or set null_prompt='learned'"
                )
            with torch.no_grad():
                self.empty_prompt_embeds = encode_text(
                    self.sd_text_encoder, self.sd_tokenizer, [""], self.config.num_prompt_tokens
                )  # [1, T, C]
        return self.empty_prompt_embeds.to(self.llm2sd_mapper_queries.dtype).expand(n, -1, -1)  # [n, T, C]

    @torch.no_grad()
    def reset_null_prompt(self) -> None:
        """Set the learned null prompt to the text encoder's embedding of the empty caption, the unconditional
        prompt a pretrained UNet was trained with (as InstructPix2Pix's)."""
        self.null_prompt_embeds.copy_(self.caption_prompts([""]))

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Set the text encoder's tokenizer (CLIP's, or with ``text_tokenizer="llm"`` the LLM's) used for the
        alignment loss and the empty-prompt embedding."""
        if tokenizer is not None and self.sd_text_encoder is not None:
            size, vocab = len(tokenizer), self.config.text_encoder_vocab_size
            if size > vocab:
                raise ValueError(f"{self.name}.text_encoder_vocab_size: {vocab} is smaller than the tokenizer's "
                                 f"{size} tokens")
        self.sd_tokenizer = tokenizer
        self.empty_prompt_embeds = None

    # ----------------------------------------------------------------- training
    @torch.no_grad()
    def encode_latents(
        self, pixels: torch.Tensor, sample: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """VAE latents of ``pixels`` ``[B, 3, H, W]`` in [-1, 1].

        Args:
            sample: draw from the posterior and apply the scaling factor (diffusion targets); otherwise the
                unscaled posterior mode (the InstructPix2Pix image condition).

        Returns:
            ``[B, latent_channels, H / f, W / f]``.
        """
        posterior = self.sd_vae.encode(pixels.to(device=self.sd_vae.device, dtype=self.sd_vae.dtype)).latent_dist
        if sample:
            return posterior.sample(generator) * self.sd_vae.config.scaling_factor  # [B, c, h, w]
        return posterior.mode()  # [B, c, h, w]

    def denoising_loss(
        self,
        latents: torch.Tensor,
        prompts: torch.Tensor,
        image_latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Diffusion loss: MSE between the UNet's prediction and the noise (or velocity).

        Args:
            latents: ``[N, c, h, w]`` scaled target latents.
            prompts: ``[N, T, C]`` prompt embeddings (cross-attention context).
            image_latents: ``[N, c, h, w]`` extra condition concatenated on channels, or None.
            generator: draws the noise and the timesteps (random when None).
        """
        num_timesteps = self.sd_noise_scheduler.config.num_train_timesteps
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
        noisy = self.sd_noise_scheduler.add_noise(latents, noise, timesteps)  # [N, c, h, w]
        if image_latents is not None:
            noisy = torch.cat([noisy, image_latents], dim=1)  # [N, 2c, h, w]
        unet_dtype = self.sd_unet.dtype
        pred = self.sd_unet(noisy.to(unet_dtype), timesteps, encoder_hidden_states=prompts.to(unet_dtype)).sample
        v_prediction = self.sd_noise_scheduler.config.prediction_type == "v_prediction"
        target = self.sd_noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        if self.config.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        snr = compute_snr(self.sd_noise_scheduler, timesteps)  # [N]
        weights = snr.clamp(max=self.config.snr_gamma) / (snr + 1 if v_prediction else snr)  # [N]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)  # [N]
        return (weights * per_sample).mean()

    def alignment_loss(self, prompts: torch.Tensor, captions: list[str | None]) -> torch.Tensor | None:
        """MSE between prompt embeddings and the frozen CLIP text embedding of their captions.

        Returns None (no term) when the weight is 0, no caption is given, or there is no text encoder.

        Raises:
            ValueError: captions are given and the loss is on, but the text encoder has no tokenizer.
        """
        keep = [i for i, caption in enumerate(captions) if caption is not None]
        if self.config.align_loss_weight == 0 or self.sd_text_encoder is None or not keep:
            return None
        text = self.caption_prompts([captions[i] for i in keep])  # [M, T, C]
        return F.mse_loss(prompts[keep].float(), text.float())

    @torch.no_grad()
    def caption_prompts(self, captions: list[str]) -> torch.Tensor:
        """The frozen text encoder's embeddings of ``captions``, ``[N, T, C]``: what a pretrained UNet is conditioned
        on (:mod:`vllm2.decoder_pretrain`), and the target the alignment loss pulls the mapped query states to.

        Raises:
            ValueError: no text encoder, or no tokenizer for it.
        """
        if self.sd_text_encoder is None:
            raise ValueError(f"{self.name}: caption prompts need the text encoder ({self.name}.use_text_encoder)")
        if self.sd_tokenizer is None:
            raise ValueError(f"{self.name}: the alignment loss needs the text encoder's tokenizer, and none is set: "
                             "give pretrained_path (a folder with tokenizer/), text_tokenizer: llm, or call "
                             f"set_tokenizer; or turn the loss off with {self.name}.align_loss_weight: 0")
        self._warn_truncated(captions)
        return encode_text(self.sd_text_encoder, self.sd_tokenizer, captions, self.config.num_prompt_tokens)

    def _warn_truncated(self, texts: list[str]) -> None:
        """Warn once when a caption is longer than the text encoder's ``num_prompt_tokens`` context: its end (often
        the words that tell captions apart) is cut from the alignment target."""
        if self._warned_truncated:
            return
        limit = self.config.num_prompt_tokens
        longest = max(len(ids) for ids in self.sd_tokenizer(texts).input_ids)
        if longest > limit:
            logger.warning("%s: a caption of %d tokens is cut to num_prompt_tokens=%d in the alignment target; raise "
                           "%s.num_prompt_tokens to keep whole captions", self.name, longest, limit, self.name)
            self._warned_truncated = True

    def conditioning(self, prompts: torch.Tensor, inputs: dict[str, Any], sample_index: torch.Tensor,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's conditioning for the valid groups: prompt embeddings ``[N, T, C]`` (after conditioning
        dropout in training) and the input-image latents ``[N, c, h, w]`` or None."""
        raise NotImplementedError

    def forward(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        inputs: dict[str, Any],
        route_ids: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Training losses for every valid group (each group denoises towards its sample's target image, with
        ``noise_samples`` draws of timestep, noise and conditioning dropout).

        Args:
            queries: ``[B, G, K, C_llm]`` query states.
            query_mask: ``[B, G]`` bool.
            inputs: from :meth:`prepare`; an optional ``"generator"`` fixes noise, timesteps and dropout.
            route_ids: unused.

        Returns:
            ``DecoderOutput(loss, {"loss_diffusion", "loss_align"?}, preds=prompt embeddings [N, T, C])``;
            ``loss`` is None without targets.
        """
        prompts, sample_index = self.group_prompts(queries, query_mask)  # [N, T, C], [N]
        if "target_pixels" not in inputs:
            return DecoderOutput(loss=None, preds=prompts)
        if prompts.shape[0] == 0:
            zero = self.zero_loss(queries)
            return DecoderOutput(loss=zero, loss_dict={"loss_diffusion": zero}, preds=prompts)
        losses = {"loss_diffusion": self.diffusion_loss(prompts, sample_index, inputs)}
        captions = inputs.get("captions") or [None] * queries.shape[0]
        align = self.alignment_loss(prompts, [captions[i] for i in sample_index.tolist()])
        if align is not None:
            losses["loss_align"] = self.config.align_loss_weight * align
        return DecoderOutput(loss=sum(losses.values()), loss_dict=losses, preds=prompts)

    def diffusion_loss(self, prompts: torch.Tensor, sample_index: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The denoising loss of prompts ``[N, T, C]`` towards their samples' targets (``sample_index`` ``[N]`` into
        ``inputs``), with ``noise_samples`` draws of timestep, noise and conditioning dropout each."""
        generator = inputs.get("generator")
        draws = self.config.noise_samples
        draw_index = sample_index.repeat_interleave(draws)  # [N * draws]
        latents = self.encode_latents(inputs["target_pixels"], sample=True, generator=generator)[draw_index]
        condition, image_latents = self.conditioning(prompts.repeat_interleave(draws, 0), inputs, draw_index,
                                                     generator)  # [N * draws, T, C]
        return self.denoising_loss(latents, condition, image_latents, generator)

    def zero_loss(self, queries: torch.Tensor) -> torch.Tensor:
        """A zero loss connected to the query states and the mapper (no valid group in the batch)."""
        return queries.sum() * 0.0 + self.llm2sd_mapper_queries.sum() * 0.0

    # ----------------------------------------------------------------- inference
    def inference_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Config defaults overridden by ``predict`` options; unknown options raise ``ValueError``."""
        resolved: dict[str, Any] = {
            "num_inference_steps": self.config.num_inference_steps,
            "guidance_scale": self.config.guidance_scale,
            "seed": self.config.seed,
            "scheduler": self.config.inference_scheduler,
        }
        for name in self.inference_options_extra:
            resolved[name] = getattr(self.config, name, None)
        unknown = sorted(set(options) - set(resolved))
        if unknown:
            raise ValueError(f"{self.name}.predict: unknown options {unknown}; known: {sorted(resolved)}")
        resolved.update(options)
        if resolved["scheduler"] not in SCHEDULER_CLASSES:
            raise ValueError(f"{self.name}.predict: scheduler must be one of {sorted(SCHEDULER_CLASSES)}")
        return resolved

    def pipeline(self, pipeline_cls: type, scheduler: str) -> Any:
        """A diffusers pipeline over this decoder's VAE and UNet, fed prompt embeddings (no text encoder)."""
        pipeline = pipeline_cls(
            vae=self.sd_vae,
            text_encoder=None,
            tokenizer=None,
            unet=self.sd_unet,
            scheduler=self.make_scheduler(scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def make_scheduler(self, name: str) -> Any:
        """A fresh inference scheduler of kind ``name`` on this decoder's noise schedule."""
        return SCHEDULER_CLASSES[name].from_config(self.scheduler_config)

    def generators(self, n: int, seed: int) -> list[torch.Generator]:
        """One generator per image, all seeded with ``seed``: an image does not depend on its batch."""
        return [torch.Generator(device=self.device).manual_seed(seed) for _ in range(n)]

    # ----------------------------------------------------------------- loading
    def load_pretrained(self, path: str | None = None) -> None:
        """Load the UNet, VAE, scheduler and (when configured) text encoder and tokenizer from a local diffusers folder.

        The architecture built from the config must match the folder's weights (loaded strictly). A pixel-space
        decoder (``vae_type: pixel``) has no VAE to load; with ``text_tokenizer: llm`` the tokenizer is the LLM's,
        set before this call. With ``null_prompt="learned"`` the learned null prompt starts from the text encoder's
        empty-prompt embedding.

        Args:
            path: the folder (subfolders ``unet``, ``vae``, ``scheduler``, ``text_encoder``, ``tokenizer``);
                defaults to ``config.pretrained_path``.
        """
        field = f"{self.name}.pretrained_path"
        path = path or self.config.pretrained_path
        if not path:
            raise ValueError(f"{field}: no diffusers folder given")
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{field}: diffusers folder {root} does not exist")
        load_weights(self.sd_unet, UNet2DConditionModel, root, "unet", field)
        if self.config.vae_type != "pixel":
            self._load_vae(root, field)
        self.scheduler_config = load_scheduler_config(root, field)
        self.sd_noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        if self.sd_text_encoder is not None:
            load_weights(self.sd_text_encoder, CLIPTextModel, root, "text_encoder", field)
            if self.config.text_tokenizer == "clip":
                self.set_tokenizer(load_tokenizer(root, field))
            if self.config.null_prompt == "learned" and self.sd_tokenizer is not None:
                self.reset_null_prompt()
        logger.info("%s: loaded pretrained diffusion weights from %s", self.name, root)

    def _load_vae(self, root: Path, field: str) -> None:
        """Load ``root/vae`` strictly; its scaling factor must be the config's."""
        load_weights(self.sd_vae, AutoencoderKL, root, "vae", field)
        loaded_scaling = AutoencoderKL.load_config(root, subfolder="vae", local_files_only=True)["scaling_factor"]
        if loaded_scaling != self.sd_vae.config.scaling_factor:
            raise ValueError(
                f"{root / 'vae'}: scaling_factor {loaded_scaling} differs from {self.name}.vae_scaling_factor "
                f"{self.sd_vae.config.scaling_factor}"
            )

    def save_pretrained(self, path: str | Path) -> None:
        """Write the UNet, VAE (none in pixel space), scheduler, text encoder and CLIP tokenizer as the local diffusers
        folder :meth:`load_pretrained` reads (safetensors)."""
        root = Path(path)
        self.sd_unet.save_pretrained(root / "unet")
        if self.config.vae_type != "pixel":
            self.sd_vae.save_pretrained(root / "vae")
        self.sd_noise_scheduler.save_pretrained(root / "scheduler")
        if self.sd_text_encoder is not None:
            self.sd_text_encoder.save_pretrained(root / "text_encoder")
            if self.config.text_tokenizer == "clip" and self.sd_tokenizer is not None:
                self.sd_tokenizer.save_pretrained(root / "tokenizer")
