"""Configs of the generation (``sd``) and editing (``ip2p``) decoders.

Defaults are the official 7B dimensions: Stable Diffusion v1.5 (UNet, VAE, CLIP-L text encoder, 768-wide prompt
embeddings of 77 tokens) and the InstructPix2Pix variant (8-channel UNet input, 256-px images); the CPU test sizes
are the ``decoders.sd`` / ``decoders.ip2p`` sections of ``configs/tiny.yaml``. The number of super-link query states
per group (K, 64 officially) is not a field here: it is the ``num_embs`` of the decoder's routes
(``superlink.routes``), which the model hands to the decoder when it binds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn, Optional

__all__ = [
    "DiffusionConfig",
    "SDConfig",
    "IP2PConfig",
    "INFERENCE_SCHEDULERS",
    "NULL_PROMPT_MODES",
]

INFERENCE_SCHEDULERS = ("pndm", "ddim", "ddpm", "euler", "euler_ancestral", "dpm_multistep")
NULL_PROMPT_MODES = ("empty", "learned")


@dataclass
class DiffusionConfig:
    """Fields shared by the ``sd`` and ``ip2p`` decoders.

    Mapper (the K query states of a group, K from its routes -> prompt embeddings):
        cross_attention_dim: width of the prompt embeddings (the UNet's cross-attention width, C_text).
        num_prompt_tokens: number of prompt embeddings (learnable mapper queries), 77 as CLIP's context.
        mapper_encoder_layers / mapper_decoder_layers / mapper_heads / mapper_ffn_dim / mapper_dropout: the pre-norm
            ``nn.Transformer`` between the projected query states (source) and the learnable queries (target).

    Diffusion model (random init from these fields; ``load_pretrained`` fills the weights):
        resolution: square training image side in pixels, and the default generation size (multiple of 8).
        unet_*: ``UNet2DConditionModel`` fields (``unet_attention_head_dim`` is diffusers' per-block head count).
        vae_type: ``"kl"`` (an ``AutoencoderKL``; latent diffusion as in Stable Diffusion) or ``"pixel"`` (no
            autoencoder: the UNet denoises pixels, for small models trained from scratch; needs 3 latent channels
            and scaling factor 1).
        vae_*: ``AutoencoderKL`` fields; one down/up block per entry of ``vae_block_out_channels``.
        use_text_encoder, text_encoder_*: the frozen CLIP text encoder (width = ``cross_attention_dim``, context =
            ``num_prompt_tokens``) used for the alignment loss and the empty-prompt embedding. Its tokenizer comes
            only from ``load_pretrained`` (or ``set_tokenizer``).
        text_tokenizer: where the text encoder's tokenizer comes from: ``"clip"`` (the ``tokenizer`` subfolder read
            by ``load_pretrained``) or ``"llm"`` (the project's LLM tokenizer, set by the model when it loads its
            components: a frozen random text encoder then still gives the alignment loss a distinct target per
            caption, which teaches the query states to carry the caption when no CLIP weights exist).
        num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type: the noise schedule (used when no
            pretrained ``scheduler`` folder is loaded).

    Training:
        train_unet: whether the UNet is trained (a frozen UNet still passes gradients to the prompt embeddings).
        align_loss_weight: weight of MSE(mapper output, CLIP text embedding of the caption); 0 disables it. When
            it is on, training on a captioned sample without a text-encoder tokenizer raises.
        noise_samples: draws of timestep and noise per training image, averaged in the diffusion loss: more draws
            lower the variance of the UNet's gradient (few images per step in a task mixture) for UNet compute only.
        snr_gamma: Min-SNR-gamma weighting of the diffusion loss (each timestep's MSE weighted by
            min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction; diffusers' ``compute_snr``, as its training
            scripts' ``--snr_gamma``); None for the plain MSE.
        null_prompt: the unconditional prompt for conditioning dropout and guidance: ``"empty"`` (the text
            encoder's embedding of ``""``, needs the tokenizer) or ``"learned"`` (a parameter ``null_prompt_embeds``).
        gradient_checkpointing: enable UNet gradient checkpointing.

    Inference (``predict`` options of the same names override them):
        inference_scheduler: one of ``INFERENCE_SCHEDULERS``; num_inference_steps, guidance_scale, seed.
        pretrained_path: local diffusers folder read by ``load_pretrained()`` when it is called without a path
            (the constructor never reads it).
    """

    cross_attention_dim: int = 768
    num_prompt_tokens: int = 77
    mapper_encoder_layers: int = 1
    mapper_decoder_layers: int = 1
    mapper_heads: int = 8
    mapper_ffn_dim: int = 3072
    mapper_dropout: float = 0.0

    resolution: int = 512
    unet_block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    unet_down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    unet_up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    unet_layers_per_block: int = 2
    unet_attention_head_dim: int = 8
    unet_norm_num_groups: int = 32
    vae_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    vae_latent_channels: int = 4
    vae_norm_num_groups: int = 32
    vae_scaling_factor: float = 0.18215
    vae_type: str = "kl"
    use_text_encoder: bool = True
    text_encoder_layers: int = 12
    text_encoder_heads: int = 12
    text_encoder_ffn_dim: int = 3072
    text_encoder_vocab_size: int = 49408
    text_tokenizer: str = "clip"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"

    train_unet: bool = False
    align_loss_weight: float = 0.1
    noise_samples: int = 1
    snr_gamma: Optional[float] = None
    null_prompt: str = "empty"
    gradient_checkpointing: bool = False

    inference_scheduler: str = "pndm"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    pretrained_path: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    def _fail(self, field: str, why: str) -> NoReturn:
        raise ValueError(f"{type(self).__name__}.{field}: {why}")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if self.resolution <= 0 or self.resolution % 8:
            self._fail("resolution", f"must be a positive multiple of 8, got {self.resolution}")
        if self.vae_type not in ("kl", "pixel"):
            self._fail("vae_type", f"must be 'kl' or 'pixel', got {self.vae_type!r}")
        if self.vae_type == "pixel" and (self.vae_latent_channels != 3 or self.vae_scaling_factor != 1.0):
            self._fail("vae_type", "'pixel' needs vae_latent_channels=3 and vae_scaling_factor=1.0")
        if self.null_prompt not in NULL_PROMPT_MODES:
            self._fail("null_prompt", f"must be one of {NULL_PROMPT_MODES}, got {self.null_prompt!r}")
        if self.inference_scheduler not in INFERENCE_SCHEDULERS:
            choice = self.inference_scheduler
            self._fail("inference_scheduler", f"must be one of {INFERENCE_SCHEDULERS}, got {choice!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            self._fail("prediction_type", f"must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if self.cross_attention_dim % self.mapper_heads:
            width = self.cross_attention_dim
            self._fail("mapper_heads", f"{self.mapper_heads} does not divide cross_attention_dim {width}")
        if len(self.unet_down_block_types) != len(self.unet_block_out_channels):
            self._fail("unet_down_block_types", "needs one entry per unet_block_out_channels entry")
        if len(self.unet_up_block_types) != len(self.unet_block_out_channels):
            self._fail("unet_up_block_types", "needs one entry per unet_block_out_channels entry")
        if self.text_tokenizer not in ("clip", "llm"):
            self._fail("text_tokenizer", f"must be 'clip' or 'llm', got {self.text_tokenizer!r}")
        if self.null_prompt == "empty" and not self.use_text_encoder:
            self._fail("null_prompt", "'empty' needs use_text_encoder=True; use 'learned' without a text encoder")
        if self.align_loss_weight < 0:
            self._fail("align_loss_weight", f"must be >= 0, got {self.align_loss_weight}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            self._fail("snr_gamma", f"must be positive or null, got {self.snr_gamma}")
        for name in ("num_prompt_tokens", "num_inference_steps", "noise_samples"):
            if getattr(self, name) <= 0:
                self._fail(name, f"must be positive, got {getattr(self, name)}")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell."""
        return 1 if self.vae_type == "pixel" else 2 ** (len(self.vae_block_out_channels) - 1)


def _check_probability(config: DiffusionConfig, name: str) -> None:
    value = getattr(config, name)
    if not 0.0 <= value <= 1.0:
        config._fail(name, f"must be a probability in [0, 1], got {value}")


@dataclass
class SDConfig(DiffusionConfig):
    """Text-to-image decoder (``[GEN]``).

    Args:
        cfg_drop_prob: probability that a training sample's prompt is replaced by the null prompt (exactly this
            rate; the official code drops at twice its configured ``cfg_drop_rate`` 0.1).
    """

    cfg_drop_prob: float = 0.1

    def validate(self) -> None:
        super().validate()
        _check_probability(self, "cfg_drop_prob")


@dataclass
class IP2PConfig(DiffusionConfig):
    """Image-editing decoder (``[EDIT]``), InstructPix2Pix style.

    The three dropout events are mutually exclusive per training sample (the IP2P recipe uses 0.05 for each):
        text_drop_prob: only the prompt is replaced by the null prompt.
        image_drop_prob: only the input-image latent is zeroed.
        both_drop_prob: both are dropped.
    image_guidance_scale: the pipeline's image guidance (>= 1).
    """

    resolution: int = 256
    train_unet: bool = True
    inference_scheduler: str = "euler_ancestral"
    text_drop_prob: float = 0.05
    image_drop_prob: float = 0.05
    both_drop_prob: float = 0.05
    image_guidance_scale: float = 1.5

    def validate(self) -> None:
        super().validate()
        for name in ("text_drop_prob", "image_drop_prob", "both_drop_prob"):
            _check_probability(self, name)
        if self.text_drop_prob + self.image_drop_prob + self.both_drop_prob > 1.0:
            self._fail("text_drop_prob", "text_drop_prob + image_drop_prob + both_drop_prob must not exceed 1")
        if self.image_guidance_scale < 1.0:
            self._fail("image_guidance_scale", f"must be >= 1, got {self.image_guidance_scale}")
