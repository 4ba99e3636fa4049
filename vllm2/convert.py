"""Convert the released VisionLLM v2 checkpoint (the ``OpenGVLab/VisionLLMv2`` folder) into a vllm2 model folder.

The official folder holds ``config.json`` (a ``visionllmv2`` config), the Vicuna tokenizer with the 26 special tokens,
and the weights as pickled ``.bin`` shards with ``pytorch_model.bin.index.json``. Conversion:

1. ``config.json`` is mapped onto a project config (:func:`project_config`); a base preset supplies what the official
   format does not record (tiling, templates, training settings, the decoders' architecture details).
2. The tokenizer is loaded and its special-token ids checked against the official order (:func:`check_token_ids`).
3. The target model is built on the ``meta`` device (no memory, no random init) and every official tensor is mapped
   onto it through the one table :data:`KEY_MAP`, shape-checked and cast (:func:`convert_tensors`). Shards are read
   one at a time with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused.
4. The check is strict per prefix: official keys no row maps, rows whose target does not exist and our tensors that no
   official tensor fills are listed and fail the conversion unless their prefix is allowed (``allow_missing``).
   Allowed missing decoder or query-table weights take a fresh initialisation.
5. The weights are written with ``save_pretrained`` (safetensors), with the processor and ``conversion.json``
   (what was dropped, what was initialised).

:data:`KEY_MAP` rows (official -> ours; the first matching row wins): identity for ``vis_encoder.vision_model.``
(transformers 4's ``CLIPVisionModel`` wrapper is our ``VisionTower``), ``llm.``, ``vl_bridge.``, ``region_encoder.``,
``emb_embeddings_*``, ``gdino.`` and ``sd.``/``ip2p.``; renames for LoRA layers (peft >= 0.7 nests ``base_layer``),
GroundingDINO's Swin (transformers 4 -> 5 names), its ``nn.MultiheadAttention`` ``in_proj`` (split into query, key,
value), its mask head (``model.{lateral_convs,output_convs,mask_features}`` -> ``pixel_decoder.``), the CLIP text
encoders (no ``text_model.`` wrapper in transformers 5) and the keypoint projections (``unipose.projection_*`` ->
``keypoint.projection_*``); no counterpart for ``gdino.model.mask_embed.`` (the official encoder-stage mask loss head)
and the rest of ``unipose.`` (UniPose's backbone and transformer are not our keypoint decoder's).

The decoders' rows live beside each decoder (``decoders/gdino/convert.py``, ``decoders/keypoint/convert.py``,
``decoders/diffusion/convert.py``, built from :class:`decoders.keyrules.KeyRule`); this module composes them.

Official tensors that land on buffers our model recomputes (Swin ``relative_position_index``, int64) are checked for
shape and dtype and not stored.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import pickle
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedTokenizerBase

import decoders
from decoders.diffusion.convert import OFFICIAL_KEY_RULES as DIFFUSION_KEY_RULES
from decoders.gdino.convert import OFFICIAL_KEY_RULES as GDINO_KEY_RULES
from decoders.keypoint.convert import OFFICIAL_KEY_RULES as KEYPOINT_KEY_RULES
from decoders.keyrules import KeyRule, fill_template, same_key
from superlink import RouteTable

from .config import VLLM2Config, config_to_dict, load_config
from .modeling import VisionLLMv2Config, VisionLLMv2Model
from .processor import VisionLLMv2Processor
from .tokenizer import (IMAGE_TOKEN, PATCH_TOKEN, REGION_TOKEN, load_tokenizer, misplaced_tokens, official_token_ids,
                        special_tokens)

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionError",
    "KeyRule",
    "KEY_MAP",
    "TargetSpec",
    "Conversion",
    "map_official_key",
    "to_official_state_dict",
    "convert_tensors",
    "iter_official_tensors",
    "project_config",
    "official_llm_config",
    "official_token_ids",
    "load_official_tokenizer",
    "check_token_ids",
    "build_target",
    "convert_official",
]

INDEX_FILE = "pytorch_model.bin.index.json"
SINGLE_FILE = "pytorch_model.bin"
REPORT_FILE = "conversion.json"


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked; the message lists what is wrong."""


# ------------------------------------------------------------------------------------------------------------ table

KEY_MAP: tuple[KeyRule, ...] = (
    same_key("vis_encoder.vision_model.{rest}", "CLIP ViT: the 4.x CLIPVisionModel wrapper is our VisionTower"),
    KeyRule(
        "llm.base_model.model.{path}.{proj:(?:q|k|v|o|up|down)_proj}.{param:weight|bias}",
        ("llm.base_model.model.{path}.{proj}.base_layer.{param}",),
        "LoRA (use_llm_lora): peft 0.6 kept the wrapped layer's weight in place; peft >= 0.7 nests it in base_layer",
    ),
    same_key("llm.{rest}", "Llama: identical names"),
    same_key("vl_bridge.{rest}", "vision-to-LLM projector"),
    same_key("region_encoder.{rest}", "region encoder"),
    same_key(r"emb_embeddings_{table:\w+}.weight", "super-link query tables"),
    *GDINO_KEY_RULES,
    *KEYPOINT_KEY_RULES,
    *DIFFUSION_KEY_RULES,
)
"""The official -> ours key table (see the module docstring)."""

_OFFICIAL_PATTERNS = tuple(rule.official_pattern for rule in KEY_MAP)
_OUR_PATTERNS = tuple(rule.our_patterns for rule in KEY_MAP)


def map_official_key(key: str) -> tuple[KeyRule, tuple[str, ...]] | None:
    """The first row matching an official key and the key(s) it maps to (empty: not convertible); None: no row."""
    for rule, pattern in zip(KEY_MAP, _OFFICIAL_PATTERNS):
        match = pattern.fullmatch(key)
        if match:
            return rule, tuple(fill_template(t, match.groupdict()) for t in rule.ours)
    return None


def _inverse_key(key: str) -> tuple[KeyRule, int, str] | None:
    """The first row with one of our templates matching ``key``: (row, part index, official key)."""
    for rule, patterns in zip(KEY_MAP, _OUR_PATTERNS):
        for index, pattern in enumerate(patterns):
            match = pattern.fullmatch(key)
            if match:
                return rule, index, fill_template(rule.official, match.groupdict())
    return None


def to_official_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict under the official names (the inverse of :data:`KEY_MAP`; split rows are concatenated).

    Args:
        state: our tensors (buffers our model recomputes may be included: they get their official names too).
    Returns:
        ``(official state dict, our keys without an official name)``.
    """
    official: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    sizes: dict[str, int] = {}
    leftover: list[str] = []
    for key, value in state.items():
        hit = _inverse_key(key)
        if hit is None:
            leftover.append(key)
            continue
        rule, index, name = hit
        if len(rule.ours) == 1:
            official[name] = value
        else:
            parts[name][index] = value
            sizes[name] = len(rule.ours)
    for name, pieces in parts.items():
        if len(pieces) != sizes[name]:
            raise ValueError(f"{name}: only parts {sorted(pieces)} of {sizes[name]} are present")
        official[name] = torch.cat([pieces[i] for i in range(sizes[name])])
    return official, leftover


# ------------------------------------------------------------------------------------------------------------ mapping


@dataclass
class TargetSpec:
    """What the converted tensors must fill.

    Attributes:
        tensors: our persistent state (every name of a shared tensor), as meta (or real) tensors.
        canonical: name -> the first name of the same tensor (tied weights share one entry).
        recomputed: buffers the model recomputes (not saved): official tensors landing here are only checked.
    """

    tensors: dict[str, torch.Tensor]
    canonical: dict[str, str]
    recomputed: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> TargetSpec:
        """The spec of a model (built on any device)."""
        state = model.state_dict(keep_vars=True)
        first: dict[int, str] = {}
        canonical = {name: first.setdefault(id(tensor), name) for name, tensor in state.items()}
        recomputed = {name: buf for name, buf in model.named_buffers() if name not in state}
        return cls({k: v.detach() for k, v in state.items()}, canonical, recomputed)


@dataclass
class Conversion:
    """The outcome of mapping official tensors onto a :class:`TargetSpec`.

    Attributes:
        tensors: our canonical key -> converted tensor.
        sources: our canonical key -> the official key it came from.
        unmapped: official keys no row matches.
        unexpected: official key -> the key its row produced, which our model does not have.
        not_convertible: official keys whose row has no counterpart.
        recomputed: official keys landing on buffers our model recomputes.
        errors: shape/dtype mismatches and tied tensors that differ.
        missing: our canonical keys no official tensor fills.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    unexpected: dict[str, str] = field(default_factory=dict)
    not_convertible: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def problems(self, allow_missing: Sequence[str] = ()) -> dict[str, list[str]]:
        """The keys that fail the conversion, by kind (allowed prefixes removed; errors are never allowed)."""
        return {
            "our tensors that no official tensor fills": [k for k in self.missing if not _allowed(k, allow_missing)],
            "official keys that no row of the table maps": [
                k for k in self.unmapped if not _allowed(k, allow_missing)
            ],
            "official keys mapped onto names our model does not have": [
                f"{k} -> {v}" for k, v in self.unexpected.items()
                if not (_allowed(k, allow_missing) or _allowed(v, allow_missing))
            ],
            "shape, dtype or tied-weight mismatches": list(self.errors),
        }


def _allowed(key: str, prefixes: Sequence[str]) -> bool:
    """Whether ``key`` lies under one of ``prefixes`` (whole dotted components: ``keypoint`` is ``keypoint.``)."""
    return any(key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    return a.is_floating_point == b.is_floating_point and (a.is_floating_point or a == b)


def convert_tensors(items: Iterable[tuple[str, torch.Tensor]], spec: TargetSpec, dtype: torch.dtype) -> Conversion:
    """Map official tensors onto ``spec``: rename or split, check shapes and dtypes, cast floats to ``dtype``.

    Args:
        items: ``(official key, tensor)`` pairs (consumed once; meta tensors give a shape-only check).
        spec: the target.
        dtype: the floating dtype of the result.
    Returns:
        The :class:`Conversion` (call :meth:`Conversion.problems` to see what fails).
    """
    out = Conversion()
    for key, tensor in items:
        hit = map_official_key(key)
        if hit is None:
            out.unmapped.append(key)
            continue
        rule, targets = hit
        if not targets:
            out.not_convertible.append(key)
            continue
        if len(targets) > 1 and (tensor.dim() == 0 or tensor.shape[0] % len(targets)):
            out.errors.append(f"{key}: {tuple(tensor.shape)} does not split into {len(targets)} equal parts")
            continue
        for target, part in zip(targets, tensor.chunk(len(targets)) if len(targets) > 1 else (tensor,)):
            _place(out, spec, key, target, part, dtype)
    filled = set(out.tensors)
    out.missing = [name for name in dict.fromkeys(spec.canonical.values()) if name not in filled]
    return out


def _place(out: Conversion, spec: TargetSpec, key: str, target: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    """Check one converted tensor against the spec and store it."""
    reference = spec.recomputed.get(target)
    if reference is None:
        reference = spec.tensors.get(target)
        if reference is None:
            out.unexpected[key] = target
            return
    if tuple(value.shape) != tuple(reference.shape) or not _same_kind(value.dtype, reference.dtype):
        out.errors.append(f"{key} -> {target}: official {tuple(value.shape)} {value.dtype}, "
                          f"ours {tuple(reference.shape)} {reference.dtype}")
        return
    if target in spec.recomputed:
        out.recomputed.append(key)
        return
    value = value.to(dtype=dtype if value.is_floating_point() else value.dtype, copy=True)
    name = spec.canonical[target]
    if name in out.tensors:
        earlier = out.tensors[name]
        if not value.is_meta and not torch.equal(earlier, value):
            out.errors.append(f"{key} and {out.sources[name]} fill the same tied tensor {name} with different values")
        return
    out.tensors[name], out.sources[name] = value, key


# ------------------------------------------------------------------------------------------------------------ reading


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` shard as a dict of tensors, read with ``weights_only=True`` (no arbitrary unpickling)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) serialisation cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = f"it pickles {found[1]}" if found else str(error).strip().splitlines()[-1]
        raise ConversionError(
            f"{path}: refused: loading it needs arbitrary unpickling ({reason}). Only plain tensor state dicts are "
            "read (torch.load(weights_only=True)); re-save the checkpoint as a dict of tensors") from None
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path}: refused: holds a {type(state).__name__}, expected a dict of tensors")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: refused: entries that are not tensors: {bad[:10]}")
    return dict(state)


def _shard_plan(src: Path) -> list[tuple[Path, set[str] | None]]:
    """The shard files of an official folder with the keys the index puts in each (None: no index)."""
    index = src / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{index}: not a weight index ({error})") from None
        files: dict[str, set[str]] = defaultdict(set)
        for key, filename in weight_map.items():
            files[filename].add(key)
        absent = [name for name in files if not (src / name).is_file()]
        if absent:
            raise ConversionError(f"{index} names shard files that do not exist: {absent}")
        return [(src / name, keys) for name, keys in files.items()]
    if (src / SINGLE_FILE).is_file():
        return [(src / SINGLE_FILE, None)]
    raise FileNotFoundError(f"{src}: no {INDEX_FILE} or {SINGLE_FILE} (is it the official VisionLLMv2 folder?)")


def iter_official_tensors(src: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``(key, tensor)`` of the official weights, one shard in memory at a time.

    Raises:
        ConversionError: a shard needs arbitrary unpickling, holds non-tensors, or disagrees with the index.
    """
    for path, keys in _shard_plan(Path(src)):
        state = _load_shard(path)
        if keys is not None and set(state) != keys:
            extra, absent = sorted(set(state) - keys), sorted(keys - set(state))
            raise ConversionError(f"{path} disagrees with {INDEX_FILE}: keys not in the index {extra[:10]}, "
                                  f"index keys not in the file {absent[:10]}")
        logger.info("read %s (%d tensors)", path, len(state))
        for key in list(state):
            yield key, state.pop(key)


# ------------------------------------------------------------------------------------------------------------ config


def _require(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ConversionError(f"{where}: missing field {key!r}")
    return data[key]


def official_llm_config(official: Mapping[str, Any]) -> dict[str, Any]:
    """The LLM config (a transformers ``LlamaConfig`` dict) of an official ``config.json``."""
    llm = dict(_require(official, "llm_config", "config.json"))
    architectures = llm.get("architectures") or ["LlamaForCausalLM"]
    if architectures != ["LlamaForCausalLM"]:
        raise ConversionError(f"config.json: llm_config.architectures {architectures} is not supported "
                              "(only the Llama/Vicuna 7B layout converts)")
    for key in ("model_type", "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        llm.pop(key, None)
    return LlamaConfig(**llm).to_dict()


def _vision(official: Mapping[str, Any], base: VLLM2Config) -> Any:
    vis = official.get("vis_encoder_config") or {}
    if "InternVisionModel" in (vis.get("architectures") or []):
        raise ConversionError("config.json: vis_encoder_config is InternViT (the 26B model); only CLIP converts")
    if official.get("use_pixelshuffle"):
        raise ConversionError("config.json: use_pixelshuffle=true (the 26B model) is not supported")
    names = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
             "num_attention_heads": "num_heads", "image_size": "image_size", "patch_size": "patch_size"}
    fields = {ours: vis[theirs] for theirs, ours in names.items() if theirs in vis}
    return dataclasses.replace(base.vision, backend="hf", pretrained=None,
                               output_layer=official.get("vis_output_layer", base.vision.output_layer), **fields)


def _llm(llm: Mapping[str, Any], official: Mapping[str, Any], base: VLLM2Config) -> Any:
    lora = dataclasses.replace(base.llm.lora, enabled=bool(official.get("use_llm_lora", False)))
    if lora.enabled:  # the official wrap_llm_lora defaults
        lora = dataclasses.replace(lora, r=32, alpha=64, dropout=0.05,
                                   target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj"))
    return dataclasses.replace(
        base.llm, pretrained=None, tokenizer=None, vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"], num_layers=llm["num_hidden_layers"],
        num_heads=llm["num_attention_heads"], num_kv_heads=llm.get("num_key_value_heads"),
        max_position_embeddings=llm["max_position_embeddings"], lora=lora,
    )


def _routes(official: Mapping[str, Any], base: VLLM2Config) -> list[dict] | None:
    """The route table with the official K: ``num_embs`` for the det/pose tables, ``num_embs_gen`` for gen/edit
    (the diffusion configs' ``num_embed_tokens`` repeat it and must agree)."""
    k = {"det": official.get("num_embs", 4), "pose": official.get("num_embs", 4),
         "gen": official.get("num_embs_gen", 64), "edit": official.get("num_embs_gen", 64)}
    for key in ("sd_config", "ip2p_config"):
        tokens = (official.get(key) or {}).get("num_embed_tokens", k["gen"])
        if tokens != k["gen"]:
            raise ConversionError(f"config.json: {key}.num_embed_tokens={tokens} differs from "
                                  f"num_embs_gen={k['gen']}; our decoders take K from the routes")
    table = base.route_table()
    unknown = sorted(set(table.tables) - set(k))
    if unknown:
        raise ConversionError(f"base config: query tables {unknown} have no official counterpart "
                              "(det, pose, gen, edit)")
    routes = [dict(route, num_embs=k[route["table"]]) for route in table.to_config()]
    return None if base.superlink.routes is None and routes == RouteTable.default().to_config() else routes


def _gdino_fields(g: Mapping[str, Any]) -> dict[str, Any]:
    pairs = (("d_model", "d_model"), ("encoder_layers", "num_encoder_layers"), ("decoder_layers", "num_decoder_layers"),
             ("encoder_ffn_dim", "ffn_dim"), ("encoder_attention_heads", "num_heads"),
             ("encoder_n_points", "num_points"), ("num_feature_levels", "num_feature_levels"),
             ("num_queries", "num_queries"), ("max_text_len", "max_text_len"))
    fields = {ours: g[theirs] for theirs, ours in pairs if theirs in g}
    shared = (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads"),
              ("encoder_n_points", "decoder_n_points"), ("d_model", "mask_dim"))
    for encoder, decoder in shared:
        if encoder in g and decoder in g and g[encoder] != g[decoder]:
            raise ConversionError(f"config.json: gdino_config.{decoder}={g[decoder]} differs from "
                                  f"{encoder}={g[encoder]}; our decoder uses one value for both")
    backbone = g.get("backbone_config") or {}
    if backbone:
        if backbone.get("model_type") != "swin":
            raise ConversionError(f"config.json: gdino_config.backbone_config.model_type "
                                  f"{backbone.get('model_type')!r} is not supported (swin)")
        fields["backbone_type"] = "swin"
        for theirs, ours in (("embed_dim", "backbone_embed_dim"), ("depths", "backbone_depths"),
                             ("num_heads", "backbone_num_heads"), ("window_size", "backbone_window_size")):
            if theirs in backbone:
                value = backbone[theirs]
                fields[ours] = tuple(value) if isinstance(value, list) else value
    return fields


def _diffusion_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """The official mapper: ``nn.Transformer`` with its default 8 heads and FFN = 4 x width."""
    fields = {ours: d[theirs] for theirs, ours in (
        ("sd_hidden_size", "cross_attention_dim"), ("num_queries", "num_prompt_tokens"),
        ("num_encoder_layers", "mapper_encoder_layers"), ("num_decoder_layers", "mapper_decoder_layers"))
        if theirs in d}
    if "sd_hidden_size" in d:
        fields.update(mapper_heads=8, mapper_ffn_dim=4 * d["sd_hidden_size"])
    return fields


def _keypoint_fields(u: Mapping[str, Any]) -> dict[str, Any]:
    """Only the projections convert, so only their width is read (UniPose ``hidden_dim``)."""
    return {"d_model": u["hidden_dim"], "projection_hidden_dim": u["hidden_dim"]} if "hidden_dim" in u else {}


_DECODERS = (  # official flag, config key, our decoder, field mapper
    ("use_gdino", "gdino_config", "gdino", _gdino_fields),
    ("use_unipose", "unipose_config", "keypoint", _keypoint_fields),
    ("use_sd", "sd_config", "sd", _diffusion_fields),
    ("use_ip2p", "ip2p_config", "ip2p", _diffusion_fields),
)


def _clear_local_paths(dcfg: Any) -> Any:
    """A decoder config without local weight paths (the converted folder holds the weights)."""
    paths = {f.name: None for f in dataclasses.fields(dcfg)
             if f.name == "pretrained_path" or f.name.endswith("_pretrained")}
    return dataclasses.replace(dcfg, **paths)


def _decoders(official: Mapping[str, Any], base: VLLM2Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, key, name, mapper in _DECODERS:
        if not official.get(flag):
            continue
        dcfg = base.decoders.get(name)
        if dcfg is None:
            cls = decoders.DECODERS[name].config_class if name in decoders.DECODERS else None
            if cls is None or not dataclasses.is_dataclass(cls):
                raise ConversionError(f"config.json: {flag}=true but decoder {name!r} is not available")
            dcfg = cls()
        try:
            out[name] = _clear_local_paths(dataclasses.replace(dcfg, **mapper(official.get(key) or {})))
        except (TypeError, ValueError) as error:
            raise ConversionError(f"config.json: {key} does not fit decoder {name!r}: {error}") from None
    return out


def project_config(official: Mapping[str, Any], base: VLLM2Config) -> VLLM2Config:
    """Map an official ``config.json`` onto a project config.

    Read: ``vis_encoder_config`` (CLIP dims), ``vis_output_layer``, ``vl_bridge_type``, ``use_region_encoder``,
    ``llm_config`` (LLM dims), ``use_llm_lora`` (official r 32, alpha 64, dropout 0.05), ``num_embs`` /
    ``num_embs_gen`` (the routes' K), ``use_gdino`` / ``gdino_config`` (transformer and Swin dims), ``use_unipose``
    (``hidden_dim``), ``use_sd`` / ``sd_config`` and ``use_ip2p`` / ``ip2p_config`` (mapper dims). Everything
    else comes from ``base``; local weight paths are cleared. Decoders the official model does not use are dropped.

    Args:
        official: the parsed ``config.json``.
        base: the base project config (e.g. the ``vllmv2-7b`` preset).
    Returns:
        The project config of the converted model.
    """
    bridge = official.get("vl_bridge_type", "mlp2x_gelu")
    if bridge not in ("mlp2x_gelu", "linear"):
        raise ConversionError(f"config.json: vl_bridge_type {bridge!r} is not supported (mlp2x_gelu or linear)")
    llm = official_llm_config(official)
    return dataclasses.replace(
        base,
        vision=_vision(official, base),
        region=dataclasses.replace(base.region, enabled=bool(official.get("use_region_encoder", False))),
        bridge=dataclasses.replace(base.bridge, type=bridge),
        llm=_llm(llm, official, base),
        superlink=dataclasses.replace(base.superlink, routes=_routes(official, base)),
        decoders=_decoders(official, base),
    )


# ------------------------------------------------------------------------------------------------------------ tokens


def load_official_tokenizer(src: str | Path, routes: RouteTable) -> PreTrainedTokenizerBase:
    """The release's tokenizer (a SentencePiece ``tokenizer.model`` or a ``tokenizer.json``) with our special tokens
    (the release already holds them; missing ones are appended, which :func:`check_token_ids` then reports)."""
    src = Path(src)
    if (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file():
        if importlib.util.find_spec("sentencepiece") is None:
            raise ConversionError(f"{src / 'tokenizer.model'} is a SentencePiece model: reading it needs the "
                                  "sentencepiece package (pip install sentencepiece)")
    return load_tokenizer(str(src), "the official folder", routes=routes)


def check_token_ids(tokenizer: PreTrainedTokenizerBase, routes: RouteTable, vocab_size: int) -> dict[str, int]:
    """Check that the special tokens hold the last ids in the official order and that the vocabulary fits the LLM.

    Args:
        tokenizer: the checkpoint's tokenizer (special tokens already present).
        routes: the route table.
        vocab_size: rows of the LLM's embedding.
    Returns:
        Our model's token ids (image/patch/region markers, route tokens, placeholders).
    """
    if len(tokenizer) != vocab_size:
        raise ConversionError(f"tokenizer has {len(tokenizer)} tokens but llm_config.vocab_size is {vocab_size}")
    expected = official_token_ids(routes, len(tokenizer) - len(special_tokens(routes)))
    wrong = misplaced_tokens(tokenizer, expected)
    if wrong:
        raise ConversionError(f"tokenizer special-token ids differ from the official order: {wrong}")
    names = [IMAGE_TOKEN, PATCH_TOKEN, REGION_TOKEN, *routes.route_tokens, *routes.placeholder_tokens]
    return {name: expected[name] for name in names}


# ------------------------------------------------------------------------------------------------------------ model


def build_target(cfg: VLLM2Config, llm_config: Mapping[str, Any], token_ids: Mapping[str, int],
                 dtype: torch.dtype = torch.float32) -> VisionLLMv2Model:
    """Our model for ``cfg`` on the ``meta`` device (names, shapes and dtypes only; nothing allocated)."""
    config = VisionLLMv2Config(vllm2=config_to_dict(cfg), llm_config=dict(llm_config), token_ids=dict(token_ids))
    with torch.device("meta"):
        model = VisionLLMv2Model(config)
    return model.to(dtype)


def _fresh_values(model: VisionLLMv2Model, keys: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Initial values for allowed-missing keys, from freshly built decoders and query tables."""
    width = model.config.llm_config["hidden_size"]
    owners: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        owners[key.split(".", 1)[0]].append(key)
    values: dict[str, torch.Tensor] = {}
    for owner, names in owners.items():
        table = owner.removeprefix("emb_embeddings_")
        if owner in model.decoder_names:
            state = decoders.build_decoder(owner, model.cfg.decoders[owner], width).state_dict()
        elif owner != table and table in model.routes.tables:
            state = {"weight": nn.init.normal_(torch.empty(model.routes.tables[table], width), std=0.02)}
        else:
            raise ConversionError(f"--allow-missing: {len(names)} tensors of {owner!r} are missing (e.g. {names[0]}); "
                                  "only decoder and query-table weights can take a fresh initialisation")
        values.update({n: state[n[len(owner) + 1:]].to(dtype) for n in names})
    return values


def _listing(problems: Mapping[str, list[str]], per_prefix: int = 8) -> str:
    """A readable listing of failing keys, grouped by top-level prefix."""
    lines = []
    for kind, keys in problems.items():
        if not keys:
            continue
        lines.append(f"  {kind} ({len(keys)}):")
        groups: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            groups[key.split(".", 1)[0]].append(key)
        for prefix, members in groups.items():
            shown = ", ".join(members[:per_prefix]) + (f", ... ({len(members) - per_prefix} more)"
                                                        if len(members) > per_prefix else "")
            lines.append(f"    {prefix}. [{len(members)}]: {shown}")
    return "\n".join(lines)


def _write(model: VisionLLMv2Model, spec: TargetSpec, tensors: Mapping[str, torch.Tensor], dst: Path,
           max_shard_size: str) -> None:
    """``save_pretrained`` of the meta model with the converted tensors under every (tied) name."""
    state = {name: tensors[canonical] if name == canonical else tensors[canonical].clone()
             for name, canonical in spec.canonical.items()}
    model.save_pretrained(dst, state_dict=state, max_shard_size=max_shard_size)


def convert_official(
    src: str | Path,
    dst: str | Path,
    base_config: str | Path = "vllmv2-7b",
    overrides: Sequence[str] = (),
    allow_missing: Sequence[str] = (),
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert an official VisionLLM v2 folder into a vllm2 model folder.

    Args:
        src: the official folder (``config.json``, tokenizer files, ``.bin`` shards and their index).
        dst: the output folder (``save_pretrained`` layout + processor + ``conversion.json``).
        base_config: preset or YAML supplying what ``config.json`` does not record.
        overrides: ``a.b=c`` overrides of the base config.
        allow_missing: key prefixes whose unmapped official keys are dropped and whose missing tensors are
            initialised afresh (decoders and query tables only).
        dtype: floating dtype of the written weights.
        max_shard_size: safetensors shard size.
        overwrite: write into a non-empty ``dst``.
    Returns:
        The conversion report (also written to ``dst/conversion.json``).
    Raises:
        ConversionError: listing every key or field that prevents the conversion.
    """
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist (is {src} the official VisionLLMv2 folder?)")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"output folder {dst} is not empty (pass overwrite / --overwrite)")
    official = json.loads(config_path.read_text())
    cfg = project_config(official, load_config(base_config, list(overrides)))
    llm_config = official_llm_config(official)
    routes = cfg.route_table()
    tokenizer = load_official_tokenizer(src, routes)
    token_ids = check_token_ids(tokenizer, routes, llm_config["vocab_size"])
    _check_triggers(official, token_ids, routes)

    model = build_target(cfg, llm_config, token_ids, dtype)
    spec = TargetSpec.of(model)
    conversion = convert_tensors(iter_official_tensors(src), spec, dtype)
    problems = conversion.problems(allow_missing)
    if any(problems.values()):
        raise ConversionError(f"cannot convert {src}:\n{_listing(problems)}\n"
                              "Allow a prefix with --allow-missing PREFIX (e.g. --allow-missing keypoint).")
    initialised = sorted(conversion.missing)
    conversion.tensors.update(_fresh_values(model, initialised, dtype))
    dst.mkdir(parents=True, exist_ok=True)
    _write(model, spec, conversion.tensors, dst, max_shard_size)
    VisionLLMv2Processor(tokenizer, cfg.vision, routes, cfg.llm.template).save_pretrained(dst)
    report = {
        "source": str(src),
        "dtype": str(dtype).removeprefix("torch."),
        "converted_tensors": len(conversion.sources),
        "not_convertible": conversion.not_convertible,
        "unmapped_dropped": conversion.unmapped + sorted(conversion.unexpected),
        "initialised": initialised,
        "recomputed_buffers": len(conversion.recomputed),
    }
    (dst / REPORT_FILE).write_text(json.dumps(report, indent=1))
    _log_summary(report)
    return report


def _check_triggers(official: Mapping[str, Any], token_ids: Mapping[str, int], routes: RouteTable) -> None:
    """The SD/IP2P configs' ``trigger_token_id`` (when set) must be the id of our t2i/edit route token."""
    for key, token in (("sd_config", routes.route_for_task("t2i")), ("ip2p_config", routes.route_for_task("edit"))):
        sub = official.get(key) or {}
        trigger = sub.get("trigger_token_id")
        if trigger is not None and token in token_ids and trigger != token_ids[token]:
            raise ConversionError(f"config.json: {key}.trigger_token_id is {trigger} but {token} is "
                                  f"{token_ids[token]} in the tokenizer")


def _log_summary(report: Mapping[str, Any]) -> None:
    logger.info("converted %d tensors from %s", report["converted_tensors"], report["source"])
    for kind in ("not_convertible", "unmapped_dropped", "initialised"):
        keys = report[kind]
        if keys:
            prefixes = sorted({k.split(".", 1)[0] for k in keys})
            logger.warning("%d tensors %s (under %s); see %s", len(keys), kind.replace("_", " "), prefixes,
                           REPORT_FILE)
