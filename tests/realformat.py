"""Tiny, random, real-format model folders, each written by its own library exactly as the library saves it.

They stand in for the folders a user points the ``pretrained`` keys at (``configs/vllmv2-7b.yaml``): a transformers
CLIP (``CLIPModel`` + ``CLIPProcessor``, as openai/clip-vit-large-patch14-336), a Vicuna-style Llama (float16 shards,
a SentencePiece ``tokenizer.model`` beside the ``tokenizer.json`` transformers writes), a Qwen2 (bfloat16, tied
embeddings padded past the vocabulary, a byte-level BPE ``tokenizer.json``), GroundingDINO
(``GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor``), Stable Diffusion 1.5 and InstructPix2Pix
(``save_pretrained`` of the diffusers pipelines), a Swin image classifier (as microsoft/swin-tiny-patch4-window7-224)
and an open_clip checkpoint (the ``open_clip_model.safetensors`` open_clip writes for the hub). Nothing is downloaded.

Sizes come from the config the folders are written for (:func:`write_all`), so a loader reads them into a model of
that config; the writers use only the libraries' own classes and ``save_pretrained``.
"""

from __future__ import annotations

import io
import string
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from decoders.diffusion.config import DiffusionConfig
from decoders.gdino.config import GroundingDinoDecoderConfig
from decoders.keypoint.config import KeypointDecoderConfig
from vllm2.config import VLLM2Config, VisionConfig
from vllm2.tokenizer import _TINY_CORPUS

__all__ = ["JOURNEY", "SP_VOCAB", "RealFolders", "clip_tokenizer", "folder_tensors", "write_all", "write_clip", "write_gdino",
           "write_ip2p", "write_llama", "write_open_clip", "write_qwen2", "write_sd", "write_sentencepiece",
           "write_swin"]

JOURNEY = Path(__file__).resolve().parent / "data" / "journey.yaml"  # the sizes the folders are written for

LLM_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048)
SP_VOCAB = 512  # the SentencePiece vocabulary of the Llama folder (256 byte-fallback pieces + merges + 3 specials)


@dataclass(frozen=True)
class RealFolders:
    """Where :func:`write_all` put each folder."""

    clip: Path
    llama: Path
    qwen2: Path
    gdino: Path
    sd: Path
    ip2p: Path
    swin: Path
    open_clip: Path


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files directly in ``folder`` (all shards), as stored."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def clip_tokenizer(vocab_size: int = 64) -> CLIPTokenizer:
    """A character-level ``CLIPTokenizer`` (BOS and EOS the last two ids, as in CLIP's vocabulary)."""
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({f"{c}</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), vocab_size - 2)})
    vocab.update({"<|startoftext|>": vocab_size - 2, "<|endoftext|>": vocab_size - 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def write_clip(folder: Path, vision: VisionConfig) -> None:
    """A whole ``CLIPModel`` (vision + text towers) with its ``CLIPProcessor``, the vision tower of ``vision``'s
    sizes."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(11)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, bos_token_id=62, eos_token_id=63, pad_token_id=63),
        vision_config=dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                           num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                           image_size=vision.image_size, patch_size=vision.patch_size),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    size = vision.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(folder)


def write_sentencepiece(path: Path, vocab_size: int = SP_VOCAB) -> None:
    """Train a Llama-style SentencePiece BPE model (byte fallback; ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) on the tiny
    corpus and write it to ``path``."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_TINY_CORPUS.strip().splitlines() * 4), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(model.getvalue())


def write_llama(folder: Path) -> None:
    """A Vicuna-style folder: float16 ``LlamaForCausalLM`` in several safetensors shards, ``tokenizer.model``
    (SentencePiece) and the ``tokenizer.json`` transformers converts it to."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_sentencepiece(folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(folder, local_files_only=True)  # converts tokenizer.model
    torch.manual_seed(12)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=1,
                                       eos_token_id=2, **LLM_SIZES))
    llm.to(torch.float16).save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)


def write_qwen2(folder: Path) -> None:
    """A Qwen2-style folder: bfloat16 ``Qwen2ForCausalLM`` with tied embeddings padded to a multiple of 64 rows and a
    byte-level BPE ``tokenizer.json`` (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = Qwen2Tokenizer(tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    torch.manual_seed(13)
    rows = -(-len(tokenizer) // 64) * 64  # Qwen2 pads its embedding past the vocabulary (151936 rows, 151665 tokens)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=rows, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                                       **LLM_SIZES))
    llm.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_gdino(folder: Path, config: GroundingDinoDecoderConfig) -> None:
    """``GroundingDinoForObjectDetection`` of the decoder config's sizes (a tiny BERT text branch) with its
    ``GroundingDinoProcessor``."""
    from transformers import BertConfig, BertTokenizer, GroundingDinoForObjectDetection, GroundingDinoImageProcessor
    from transformers import GroundingDinoProcessor

    from decoders.gdino.model import build_hf_config

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *_TINY_CORPUS.split()[:60]]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w.lower() for w in words))}
    hf_config = build_hf_config(config)
    hf_config.text_config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(14)
    GroundingDinoForObjectDetection(hf_config).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(),
                           tokenizer=BertTokenizer(vocab=vocab)).save_pretrained(folder)


def _pipeline_parts(config: DiffusionConfig, in_channels: int, seed: int) -> dict:
    """UNet, VAE, CLIP text encoder and tokenizer of a diffusion decoder config's sizes, and a CLIP image processor."""
    from transformers import CLIPImageProcessor

    from decoders.diffusion.components import build_text_encoder, build_unet, build_vae

    torch.manual_seed(seed)
    return dict(unet=build_unet(config, in_channels), vae=build_vae(config), text_encoder=build_text_encoder(config),
                tokenizer=clip_tokenizer(config.text_encoder_vocab_size),
                feature_extractor=CLIPImageProcessor(), safety_checker=None, requires_safety_checker=False)


def write_sd(folder: Path, config: DiffusionConfig) -> None:
    """``StableDiffusionPipeline.save_pretrained`` (SD 1.5 layout: PNDM scheduler) of the ``sd`` config's sizes."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    parts = _pipeline_parts(config, config.vae_latent_channels, seed=15)
    StableDiffusionPipeline(scheduler=scheduler, **parts).save_pretrained(folder)


def write_ip2p(folder: Path, config: DiffusionConfig) -> None:
    """``StableDiffusionInstructPix2PixPipeline.save_pretrained`` (8-channel UNet input, Euler ancestral
    scheduler, as timbrooks/instruct-pix2pix) of the ``ip2p`` config's sizes."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1)
    parts = _pipeline_parts(config, 2 * config.vae_latent_channels, seed=16)
    StableDiffusionInstructPix2PixPipeline(scheduler=scheduler, **parts).save_pretrained(folder)


def write_swin(folder: Path, config: KeypointDecoderConfig) -> None:
    """A ``SwinForImageClassification`` of the keypoint config's backbone sizes with its image processor."""
    from transformers import SwinConfig, SwinForImageClassification, ViTImageProcessor

    torch.manual_seed(17)
    swin = SwinForImageClassification(SwinConfig(
        embed_dim=config.backbone_embed_dim, depths=list(config.backbone_depths),
        num_heads=list(config.backbone_num_heads), window_size=config.backbone_window_size, num_labels=10))
    swin.save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)


def write_open_clip(path: Path, vision: VisionConfig) -> None:
    """The open_clip model ``vision.open_clip_model`` (image and text towers) as open_clip writes it for the hub:
    ``save_file(model.state_dict())`` to ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    from vllm2.vision import create_open_clip

    torch.manual_seed(18)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(create_open_clip(vision).state_dict(), path)


def write_all(root: Path, cfg: VLLM2Config) -> RealFolders:
    """Write every folder under ``root`` with the sizes of ``cfg`` (its vision tower and its ``gdino``, ``keypoint``,
    ``sd`` and ``ip2p`` decoders); the open_clip checkpoint is the tiny ViT of ``configs/open_clip``."""
    folders = RealFolders(*(root / name for name in ("clip", "llama", "qwen2", "gdino", "sd", "ip2p", "swin")),
                          open_clip=root / "open_clip" / "open_clip_model.safetensors")
    write_clip(folders.clip, cfg.vision)
    write_llama(folders.llama)
    write_qwen2(folders.qwen2)
    write_gdino(folders.gdino, cfg.decoders["gdino"])
    write_sd(folders.sd, cfg.decoders["sd"])
    write_ip2p(folders.ip2p, cfg.decoders["ip2p"])
    write_swin(folders.swin, cfg.decoders["keypoint"])
    write_open_clip(folders.open_clip, replace(cfg.vision, backend="open_clip", open_clip_model="vllm2-tiny-vit"))
    return folders
