"""Typed configuration: dataclasses composed into one :class:`VLLM2Config`, YAML presets and ``a.b=c`` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from superlink import RouteTable, TextLink
from superlink.routes import LEGACY_K_KEY

from .images import MAX_IMAGE_PIXELS

_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # where a wheel puts the repository's configs/
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else Path(__file__).resolve().parent.parent / "configs"

__all__ = [
    "VisionConfig",
    "RegionConfig",
    "BridgeConfig",
    "LoraConfig",
    "LLMConfig",
    "SuperlinkConfig",
    "TrainingConfig",
    "VLLM2Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """Image encoder. Defaults: CLIP ViT-L/14-336 with the official anyres tiling."""

    backend: str = "hf"  # "hf" (transformers CLIPVisionModel) or "open_clip"
    pretrained: str | None = None  # local folder (hf) or checkpoint file (open_clip)
    open_clip_model: str = "ViT-L-14-336"  # open_clip model name (or a config registered with open_clip)
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    output_layer: int = -2  # hidden-state index fed to the LLM (CLS dropped)
    image_mode: str = "anyres"  # "anyres" | "resize"
    max_tiles: int = 4
    freeze: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decompression-bomb limit (PIL's default)


@dataclass
class RegionConfig:
    """Region (visual prompt) encoder over the last ``num_levels`` vision layers."""

    enabled: bool = True
    hidden_dim: int = 256
    num_levels: int = 3


@dataclass
class BridgeConfig:
    """Vision-to-LLM projector."""

    type: str = "mlp2x_gelu"  # "mlp2x_gelu" | "linear"


@dataclass
class LoraConfig:
    """LoRA on the LLM through peft."""

    enabled: bool = False
    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj")


@dataclass
class LLMConfig:
    """Causal LM. ``pretrained`` is a local folder; otherwise a random Llama of the given size is built."""

    pretrained: str | None = None
    tokenizer: str | None = None  # local tokenizer folder; None = the built-in tiny tokenizer
    vocab_size: int = 32000  # read only by `train --dry-run` when the tokenizer folder is absent; else the tokenizer's
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    max_position_embeddings: int = 4096
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    template: str = "vicuna_v1"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SuperlinkConfig:
    """Routing table and transmission.

    ``routes`` is None for the official table, else a list of route dicts (see superlink.routes). ``transmission``
    ``"text"`` is the VisionLLM v1 baseline for detection, grounding and keypoints: their answers carry boxes and
    points as location and class tokens (``location_bins`` per side, ``class_tokens``; see superlink.text) trained
    by cross-entropy alone; every other task keeps the super link.
    """

    routes: list[dict] | None = None
    transmission: str = "superlink"  # "superlink" | "text"
    location_bins: int = 1025
    class_tokens: int = 512

    def route_table(self) -> RouteTable:
        """The routing table: ``routes`` when given, else the official one."""
        return RouteTable.from_config(self.routes) if self.routes else RouteTable.default()


@dataclass
class TrainingConfig:
    """Optimisation, freezing and loss weighting."""

    output_dir: str = "runs/default"
    init_from: str | None = None  # a previous stage's export folder: initialises every module it has
    seed: int = 0
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # module path prefix -> lr factor
    freeze: list[str] = field(default_factory=list)  # module path prefixes
    loss_weights: dict[str, float] = field(default_factory=dict)  # decoder name -> weight (default 1)
    max_length: int = 2048
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0  # > 0: also export the moving average of the weights to OUTPUT_DIR/final-ema
    logging_steps: int = 10
    save_steps: int = 500
    deepspeed: str | None = None  # a DeepSpeed JSON file, or a shipped one by name: zero2, zero3, zero3_offload
    dataloader_num_workers: int = 4  # processes reading images and building batches (0: in the training process)
    skip_bad_records: bool = False


@dataclass
class VLLM2Config:
    """The whole model + training configuration."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    superlink: SuperlinkConfig = field(default_factory=SuperlinkConfig)
    decoders: dict[str, Any] = field(default_factory=dict)  # decoder name -> its config dataclass
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: dict[str, Any] = field(default_factory=dict)  # dataset mixture (see vllm2.data)

    def tokenizer_source(self) -> tuple[str | None, str]:
        """Where the tokenizer comes from and the config key that names it (None = the built-in tiny tokenizer)."""
        if self.llm.tokenizer:
            return self.llm.tokenizer, "llm.tokenizer"
        return self.llm.pretrained, "llm.pretrained"

    def route_table(self) -> RouteTable:
        """The routing table: ``superlink.routes`` when given, else the official one."""
        return self.superlink.route_table()

    def text_link(self) -> TextLink | None:
        """The text-transmission vocabulary (``superlink.transmission: text``), or None for the super link."""
        mode = self.superlink.transmission
        if mode not in ("superlink", "text"):
            raise ValueError(f"config key superlink.transmission: unknown mode {mode!r} (use 'superlink' or 'text')")
        return TextLink(self.superlink.location_bins, self.superlink.class_tokens) if mode == "text" else None


# ----------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` (recursing into dataclasses and containers)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key {where!r}: expected a mapping, got {value!r}")
        return config_from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {where!r}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:
            return float(value)  # YAML reads "3e-4" (no dot) as a string
        except ValueError:
            raise ValueError(f"config key {where!r}: expected float, got {value!r}") from None
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"config key {where!r}: expected {tp.__name__}, got {value!r}")
    return value


def config_from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``KeyError`` naming the full key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{where}.{key}" if where else key
            raise KeyError(f"unknown config key {full!r} (known: {', '.join(sorted(names))})")
    decoders = cls is VLLM2Config and "decoders" in data  # read last: a decoder's config may need the routes
    kwargs = {}
    for key, value in data.items():
        if not (decoders and key == "decoders"):
            kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key)
    if decoders:
        superlink = kwargs.get("superlink") or SuperlinkConfig()
        kwargs["decoders"] = _decoder_configs(data["decoders"] or {}, "decoders", superlink)
    return cls(**kwargs)


def _decoder_configs(data: dict, where: str, superlink: SuperlinkConfig) -> dict[str, Any]:
    """Map ``{decoder name: dict}`` onto each registered decoder's ``config_class``."""
    from decoders import DECODERS

    out: dict[str, Any] = {}
    for name, sub in data.items():
        if sub is None:  # `decoders.NAME=null` drops a decoder
            continue
        if name not in DECODERS:
            raise KeyError(f"unknown config key {where}.{name!r}: no decoder registered as {name!r} "
                           f"(registered: {', '.join(sorted(DECODERS))})")
        cls, full = DECODERS[name].config_class, f"{where}.{name}"
        if dataclasses.is_dataclass(cls):
            out[name] = config_from_dict(cls, _without_legacy_decoder_k(name, cls, sub or {}, full, superlink), full)
        else:
            out[name] = dict(sub or {})
    return out


def _without_legacy_decoder_k(name: str, cls: type, sub: dict, where: str, superlink: SuperlinkConfig) -> dict:
    """A decoder's config dict without the ``num_queries`` key that older ``sd`` and ``ip2p`` configs (and saved
    models) carry: K is now only the ``num_embs`` of the decoder's routes. A config class with a ``num_queries`` field
    of its own (the DETR proposals of ``gdino`` and ``keypoint``) keeps the key.

    Raises:
        ValueError: the old key disagrees with the ``num_embs`` of the decoder's routes.
    """
    if LEGACY_K_KEY not in sub or LEGACY_K_KEY in {f.name for f in dataclasses.fields(cls)}:
        return sub
    sub = dict(sub)
    k = sub.pop(LEGACY_K_KEY)
    table = superlink.route_table()
    if name in table.decoders and k != table.decoder_num_embs(name):
        tokens = [r.token for r in table if r.decoder == name]
        raise ValueError(f"config key {where}.{LEGACY_K_KEY}: {k!r} differs from num_embs="
                         f"{table.decoder_num_embs(name)} of the routes {tokens} of decoder {name!r} "
                         f"(superlink.routes); the routes alone set K now: remove {where}.{LEGACY_K_KEY}")
    return sub


def config_to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (dataclasses -> dicts, tuples -> lists), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# YAML presets and overrides


def _resolve(path_or_preset: str | Path) -> Path:
    path = Path(path_or_preset)
    if path.is_file():
        return path
    preset = CONFIG_DIR / f"{path_or_preset}.yaml"
    if preset.is_file():
        return preset
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {str(path_or_preset)!r} is neither a file nor a preset (presets: {presets})")


def resolve_deepspeed(value: str) -> str:
    """``training.deepspeed``: a JSON file, or the name of a shipped one (``zero2``, ``zero3``, ``zero3_offload``)."""
    if Path(value).is_file():
        return value
    shipped = CONFIG_DIR / "deepspeed" / f"{value}.json"
    if shipped.is_file():
        return str(shipped)
    names = sorted(p.stem for p in (CONFIG_DIR / "deepspeed").glob("*.json"))
    raise FileNotFoundError(f"config key training.deepspeed: {value!r} is neither a file nor a shipped DeepSpeed "
                            f"config ({names})")


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like a.b=c")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KeyError(f"override {key!r}: {part!r} is not a mapping")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path_or_preset: str | Path = "tiny", overrides: list[str] | None = None) -> VLLM2Config:
    """Load a YAML config (a file path or a preset name from ``configs/``) and apply ``a.b=c`` overrides.

    A YAML file may name a base with ``base: <preset or path>``; its keys are merged over the base recursively, and a
    key it sets to null takes its default again (``training: {lr_multipliers: null}``).

    Args:
        path_or_preset: file path or preset name (``tiny``, ``vllmv2-7b``, ``shapes``).
        overrides: ``a.b=c`` strings; values are parsed as YAML.
    Returns:
        The typed config. Unknown keys raise ``KeyError`` naming the key.
    """
    data = _read_yaml(_resolve(path_or_preset))
    for override in overrides or []:
        _apply_override(data, override)
    return config_from_dict(VLLM2Config, data)


def _read_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base) if (path.parent / base).is_file() else _resolve(base)
    return _merge(_read_yaml(base_path), data)


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, mappings recursively; a key ``top`` sets to null is dropped (its default applies; a
    decoder set to null is not built)."""
    out = dict(base)
    for key, value in top.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
