"""Builders of the diffusers / transformers components from a :class:`DiffusionConfig`, and their local loaders.

Every builder returns a randomly initialised module; weights enter only through :func:`load_weights` from a local
diffusers folder (``unet``, ``vae``, ``scheduler``, ``text_encoder``, ``tokenizer`` subfolders).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import DiffusionConfig

__all__ = [
    "SCHEDULER_CLASSES",
    "build_unet",
    "PixelSpace",
    "build_vae",
    "build_text_encoder",
    "scheduler_config",
    "load_weights",
    "load_scheduler_config",
    "load_tokenizer",
    "encode_text",
    "subfolder",
]

logger = logging.getLogger(__name__)

SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpm_multistep": DPMSolverMultistepScheduler,
}


def build_unet(config: DiffusionConfig, in_channels: int) -> UNet2DConditionModel:
    """A random-init UNet taking ``in_channels`` latent channels and predicting ``vae_latent_channels``."""
    return UNet2DConditionModel(
        sample_size=config.resolution // config.vae_scale_factor,
        in_channels=in_channels,
        out_channels=config.vae_latent_channels,
        down_block_types=tuple(config.unet_down_block_types),
        up_block_types=tuple(config.unet_up_block_types),
        block_out_channels=tuple(config.unet_block_out_channels),
        layers_per_block=config.unet_layers_per_block,
        attention_head_dim=config.unet_attention_head_dim,
        norm_num_groups=config.unet_norm_num_groups,
        cross_attention_dim=config.cross_attention_dim,
    )


class PixelSpace(ModelMixin, ConfigMixin):
    """The identity "autoencoder" of pixel-space diffusion: latents are the pixels in [-1, 1].

    It speaks ``AutoencoderKL``'s interface (``encode(x).latent_dist``, ``decode(z).sample``, ``config.scaling_factor``
    and ``config.latent_channels``; one ``block_out_channels`` entry, so the pipelines' scale factor is 1), which lets
    the diffusers pipelines run a small UNet directly on pixels, where no trained VAE exists.
    """

    @register_to_config
    def __init__(self, latent_channels: int = 3, scaling_factor: float = 1.0,
                 block_out_channels: tuple[int, ...] = (3,)) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # carries the device and dtype

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """A point-mass posterior at ``x`` ``[B, 3, H, W]``."""
        dist = DiagonalGaussianDistribution(torch.cat([x, torch.zeros_like(x)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
               ) -> DecoderOutput | tuple:
        """The latents themselves, ``[B, 3, H, W]``."""
        return DecoderOutput(sample=z) if return_dict else (z,)


def build_vae(config: DiffusionConfig) -> AutoencoderKL | PixelSpace:
    """A random-init KL autoencoder with one down/up block per ``vae_block_out_channels`` entry, or the identity of
    pixel-space diffusion when ``config.vae_type == "pixel"``."""
    if config.vae_type == "pixel":
        return PixelSpace(latent_channels=config.vae_latent_channels, scaling_factor=config.vae_scaling_factor)
    num_blocks = len(config.vae_block_out_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=tuple(config.vae_block_out_channels),
        layers_per_block=config.vae_layers_per_block,
        latent_channels=config.vae_latent_channels,
        norm_num_groups=config.vae_norm_num_groups,
        sample_size=config.resolution,
        scaling_factor=config.vae_scaling_factor,
    )


def build_text_encoder(config: DiffusionConfig) -> CLIPTextModel:
    """A random-init CLIP text encoder; like CLIP, the last two ids of the vocabulary are BOS and EOS."""
    text_config = CLIPTextConfig(
        vocab_size=config.text_encoder_vocab_size,
        hidden_size=config.cross_attention_dim,
        intermediate_size=config.text_encoder_ffn_dim,
        num_hidden_layers=config.text_encoder_layers,
        num_attention_heads=config.text_encoder_heads,
        max_position_embeddings=config.num_prompt_tokens,
        bos_token_id=config.text_encoder_vocab_size - 2,
        eos_token_id=config.text_encoder_vocab_size - 1,
        pad_token_id=config.text_encoder_vocab_size - 1,
    )
    return CLIPTextModel(text_config)


def scheduler_config(config: DiffusionConfig) -> dict[str, Any]:
    """The noise-schedule config (Stable Diffusion v1.5 style) described by ``config``."""
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "beta_schedule": config.beta_schedule,
        "prediction_type": config.prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    }


def subfolder(root: Path, name: str, field: str) -> Path:
    """``root / name``, or ``FileNotFoundError`` naming the folder and the config field."""
    path = root / name
    if not path.is_dir():
        raise FileNotFoundError(f"{field}: missing subfolder {name!r} in the diffusers folder {root} ({path})")
    return path


def load_weights(module: nn.Module, cls: Any, root: Path, name: str, field: str) -> None:
    """Load ``root/name`` (a diffusers or transformers folder) into ``module`` strictly.

    Args:
        module: the module built from the config; its architecture must match the folder's.
        cls: the class whose ``from_pretrained`` reads the folder.
        root: the diffusers pipeline folder.
        name: the subfolder (``unet``, ``vae``, ``text_encoder``).
        field: the config field to name in errors.
    """
    path = subfolder(root, name, field)
    dtype = next(module.parameters()).dtype
    loaded = cls.from_pretrained(root, subfolder=name, local_files_only=True, torch_dtype=dtype)
    try:
        module.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not match the architecture built from the config ({field}): {error}")
    logger.info("loaded %s weights from %s", name, path)


def load_scheduler_config(root: Path, field: str) -> dict[str, Any]:
    """The ``scheduler`` subfolder's config as a plain dict."""
    subfolder(root, "scheduler", field)
    return dict(DDPMScheduler.load_config(root, subfolder="scheduler", local_files_only=True))


def load_tokenizer(root: Path, field: str) -> CLIPTokenizer:
    """The CLIP tokenizer of the ``tokenizer`` subfolder."""
    subfolder(root, "tokenizer", field)
    return CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)


def encode_text(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, texts: list[str], length: int) -> torch.Tensor:
    """CLIP text embeddings of ``texts`` padded/truncated to ``length`` tokens, ``[N, length, C]``."""
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state  # [N, length, C]
