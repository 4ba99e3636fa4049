"""``VisionLLMv2Model``: vision tower + bridge + region encoder + causal LM + super link + task decoders.

Parameter names follow the official layout (``vis_encoder.``, ``llm.``, ``vl_bridge.``, ``region_encoder.``,
``emb_embeddings_<table>``, one attribute per decoder) so released weights map onto them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig,
                          PreTrainedModel)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import ModelOutput

import decoders
from superlink import BoundRoutes, QueryGroups, RouteTable, gather_queries, query_position_mask, splice_queries

from .chat import chat
from .config import VLLM2Config, config_from_dict, config_to_dict
from .device import to_device
from .processor import IGNORE_INDEX
from .region import RegionEncoder
from .tokenizer import IMAGE_TOKEN, PATCH_TOKEN, REGION_TOKEN, load_tokenizer
from .vision import VisionTower

logger = logging.getLogger(__name__)

__all__ = ["VisionLLMv2Config", "VisionLLMv2Model", "VisionLLMv2Output", "build_model", "check_model_folder",
           "llm_config", "load_decoder_weights", "model_config", "model_token_names", "onto_keys", "unwrapped_key"]


# ------------------------------------------------------------------------------------------------------------ config


class VisionLLMv2Config(PretrainedConfig):
    """HF config wrapper: the project config as plain data, the LLM's own config and the special-token ids.

    Args:
        vllm2: ``config_to_dict(VLLM2Config)``.
        llm_config: the causal LM's config dict (``model_type`` included).
        token_ids: special token -> id (image/patch/region markers, routes, placeholders).
    """

    model_type = "vllm2"

    def __init__(self, vllm2: dict | None = None, llm_config: dict | None = None,
                 token_ids: dict[str, int] | None = None, **kwargs: Any) -> None:
        self.vllm2 = vllm2 or {}
        self.llm_config = llm_config or {}
        self.token_ids = token_ids or {}
        self.hidden_size = self.llm_config.get("hidden_size")  # read by DeepSpeed's "auto" bucket sizes
        super().__init__(**kwargs)

    @property
    def project(self) -> VLLM2Config:
        """The typed project config."""
        return config_from_dict(VLLM2Config, self.vllm2)


_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------------------------------------- helpers


def _lora_adapter_base(folder: str | Path) -> str | None:
    """For a peft LoRA adapter folder (``adapter_config.json`` and no full model weights): its base model as the
    adapter names it (``"its base model"`` when unnamed); None for any other folder."""
    folder = Path(folder)
    adapter = folder / "adapter_config.json"
    if not adapter.is_file() or any((folder / name).is_file() for name in _FULL_WEIGHTS):
        return None
    return json.loads(adapter.read_text()).get("base_model_name_or_path") or "its base model"


def llm_config(cfg: VLLM2Config) -> PretrainedConfig:
    """The LLM's config: read from the local folder when ``llm.pretrained`` is set (which must hold a causal LM),
    else a Llama of the given size. The vocabulary size is set later, from the tokenizer."""
    folder = cfg.llm.pretrained
    if not folder:
        return LlamaConfig(
            hidden_size=cfg.llm.hidden_size,
            intermediate_size=cfg.llm.intermediate_size,
            num_hidden_layers=cfg.llm.num_layers,
            num_attention_heads=cfg.llm.num_heads,
            num_key_value_heads=cfg.llm.num_kv_heads or cfg.llm.num_heads,
            max_position_embeddings=cfg.llm.max_position_embeddings,
            tie_word_embeddings=False,
        )
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"LLM folder {folder!r} (config key llm.pretrained) does not exist")
    base = _lora_adapter_base(folder)
    if base:
        raise ValueError(f"config key llm.pretrained: {folder!r} is a LoRA adapter of {base!r} without the base "
                         "weights, not a causal LM: set llm.pretrained to the base model's folder, and to start from "
                         "the adapter merge it into the base first (peft: PeftModel.from_pretrained(base, "
                         "adapter).merge_and_unload().save_pretrained(DIR))")
    llm_cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    if llm_cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"config key llm.pretrained: {folder!r} holds a {llm_cfg.model_type!r} model, not a causal "
                         "LM (a Llama, Vicuna, Qwen2, ... folder)")
    return llm_cfg


def unwrapped_key(key: str) -> str:
    """A parameter name as it reads without peft's LoRA wrapping of the LLM: ``llm.base_model.model.X`` -> ``llm.X``
    and ``….q_proj.base_layer.weight`` -> ``….q_proj.weight`` (adapter tensors keep their ``lora_`` names)."""
    return key.replace("llm.base_model.model.", "llm.", 1).replace(".base_layer.", ".")


def onto_keys(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state`` renamed onto ``keys`` across the LLM's plain and LoRA-wrapped layouts (a plain export into a LoRA
    model and back); tensors with no counterpart keep their names."""
    own = {unwrapped_key(key): key for key in keys}
    return {own.get(unwrapped_key(key), key): value for key, value in state.items()}


def model_token_names(routes: RouteTable) -> list[str]:
    """The special tokens whose ids the model keeps: image, patch and region markers, route tokens, placeholders."""
    return [IMAGE_TOKEN, PATCH_TOKEN, REGION_TOKEN, *routes.route_tokens, *routes.placeholder_tokens]


def check_model_folder(folder: Path) -> None:
    """Raise one clear error when ``folder`` is not a vllm2 model folder (missing, a LoRA adapter, another model)."""
    config = folder / "config.json"
    base = _lora_adapter_base(folder)
    if base:
        raise ValueError(f"{str(folder)!r} is a LoRA adapter of {base!r} without its base weights, not a vllm2 model "
                         "folder: give the folder `vllm2 train` exported (OUTPUT_DIR/final holds the base weights "
                         "and the adapters), or a plain one from `vllm2 export --model THAT --out DIR --merge-lora`")
    if not config.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a vllm2 model folder (no config.json)")
    kind = json.loads(config.read_text()).get("model_type")
    if kind != VisionLLMv2Config.model_type:
        raise ValueError(f"{str(folder)!r} holds a {kind!r} model, not a vllm2 model: a causal-LM folder goes in "
                         "llm.pretrained of a config (--config CONFIG llm.pretrained=DIR)")


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, what: str) -> torch.Tensor:
    """Write ``values [n, C]`` into the ``n`` positions of ``mask [B, L]`` (row-major), checking the count."""
    counts = mask.sum(1)  # [B]
    if int(counts.sum()) != values.shape[0]:
        raise ValueError(f"{what} tokens per sample {counts.tolist()} (total {int(counts.sum())}) do not match the "
                         f"{values.shape[0]} {what} embeddings provided")
    return embeds.masked_scatter(mask[..., None], values)


def _build_bridge(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    """The vision-to-LLM projector: ``mlp2x_gelu`` (official) or ``linear``."""
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    if kind == "linear":
        return nn.Linear(vision_dim, llm_dim)
    raise ValueError(f"config key bridge.type: unknown bridge {kind!r} (use 'mlp2x_gelu' or 'linear')")


# ------------------------------------------------------------------------------------------------------------ outputs


@dataclass
class VisionLLMv2Output(ModelOutput):
    """Model outputs.

    Attributes:
        loss: LM loss + weighted decoder losses (scalar), when labels are given.
        lm_loss: the LM cross-entropy alone.
        logits: ``[B, L, V]``; with labels, ``[N, V]`` at the N positions that predict a label, in batch order (the
            LM head skips the rest: prompts, images and padding are most positions).
        decoder_losses: decoder name -> weighted loss.
        loss_dict: every individual loss term, keyed ``"<decoder>/<term>"``.
        hidden_states: ``[B, L, C]`` last-layer states (after the final norm).
        groups: decoder name -> gathered query groups.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    decoder_losses: dict[str, torch.Tensor] | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    hidden_states: torch.Tensor | None = None
    groups: dict[str, QueryGroups] | None = None


# ------------------------------------------------------------------------------------------------------------ model


class VisionLLMv2Model(PreTrainedModel):
    """The multimodal LLM with the super link and its task decoders."""

    config_class = VisionLLMv2Config
    base_model_prefix = "vllm2"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: VisionLLMv2Config) -> None:
        super().__init__(config)
        cfg = config.project
        self.cfg = cfg
        self.routes = cfg.route_table()
        self._bound: BoundRoutes | None = None
        self.patch_token_id = config.token_ids[PATCH_TOKEN]
        self.region_token_id = config.token_ids[REGION_TOKEN]

        self.vis_encoder = VisionTower(cfg.vision, cfg.region.num_levels if cfg.region.enabled else 0)
        llm_cfg = AutoConfig.for_model(**config.llm_config)
        llm_cfg._attn_implementation = cfg.llm.attn_implementation
        # The default dtype (fp32, or what from_pretrained sets), not the folder's storage dtype (Vicuna's fp16)
        self.llm = AutoModelForCausalLM.from_config(llm_cfg, attn_implementation=cfg.llm.attn_implementation,
                                                    dtype=torch.get_default_dtype())
        width = llm_cfg.hidden_size
        self.vl_bridge = _build_bridge(cfg.bridge.type, cfg.vision.hidden_size, width)
        self.region_encoder = (
            RegionEncoder(cfg.vision.hidden_size, width, cfg.vision.patch_size, cfg.region.hidden_dim)
            if cfg.region.enabled else None
        )
        for table, k in self.routes.tables.items():
            setattr(self, f"emb_embeddings_{table}", nn.Embedding(k, width))
        self.decoder_names = list(cfg.decoders)
        self._tied_weights_keys: dict[str, str] = {}
        token_id = config.token_ids
        for name, dcfg in cfg.decoders.items():
            decoder = decoders.build_decoder(name, dcfg, width)
            own = [r for r in self.routes if r.decoder == name]
            absorbed = [self.routes.route(t) for r in own for t in r.absorbs]
            decoder.bind_routes({token_id[r.token]: r for r in own}, {token_id[r.token]: r for r in absorbed})
            setattr(self, name, decoder)
            self._tied_weights_keys.update({f"{name}.{k}": f"{name}.{v}" for k, v in decoder.tied_weights_keys.items()})
        self._keys_to_ignore_on_load_missing = list(self._tied_weights_keys)  # aliases of shared modules
        self.post_init()
        if cfg.llm.lora.enabled:
            self._apply_lora()
        if cfg.llm.gradient_checkpointing:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @classmethod
    def from_pretrained(cls, folder: str | Path, *args: Any, **kwargs: Any) -> VisionLLMv2Model:
        """HF ``from_pretrained`` of a vllm2 model folder, then every tensor copied to freshly allocated (aligned)
        memory: tensors read from a memory-mapped safetensors file can be unaligned, which makes some CPU conv kernels
        round differently, and a loaded model must reproduce the saved one bit for bit. A LoRA adapter folder or
        another model's folder is one clear error."""
        check_model_folder(Path(folder))
        model = super().from_pretrained(folder, *args, **kwargs)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
        return model

    def _init_weights(self, module: nn.Module) -> None:
        """Sub-modules initialise themselves at construction; only the query tables are set here."""
        if isinstance(module, nn.Embedding) and module in self._query_tables():
            nn.init.normal_(module.weight, std=0.02)

    def _query_tables(self) -> list[nn.Embedding]:
        return [getattr(self, f"emb_embeddings_{t}") for t in self.routes.tables if hasattr(self, f"emb_embeddings_{t}")]

    def _apply_lora(self) -> None:
        """Wrap the LLM in peft LoRA; the token embeddings and the LM head stay trainable (as in the official recipe):
        the added special tokens start as one mean row and must learn to differ."""
        from peft import LoraConfig, get_peft_model

        lora = self.cfg.llm.lora
        self.llm = get_peft_model(self.llm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                       target_modules=list(lora.target_modules)))
        for module in (self.llm.get_input_embeddings(), self.llm.get_output_embeddings()):
            module.requires_grad_(True)
        self._refresh_tied_keys()

    def _refresh_tied_keys(self) -> None:
        """Recompute the names of tied parameters after peft moved the LLM under ``llm.base_model.model.`` or back
        (``post_init`` recorded them before): transformers ties and saves by these names (tied embeddings, Qwen2)."""
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LLM's weights (peft ``merge_and_unload``): the LLM becomes a plain causal
        LM and the config says LoRA is off, so :meth:`save_pretrained` writes a folder without adapters."""
        if not hasattr(self.llm, "peft_config"):
            raise ValueError("the model has no LoRA adapters to merge (llm.lora.enabled is false in its config)")
        self.llm = self.llm.merge_and_unload()
        self.config.vllm2["llm"]["lora"]["enabled"] = False
        self.cfg = self.config.project
        self._refresh_tied_keys()

    @property
    def bound(self) -> BoundRoutes:
        """The route table bound to token ids (built on first use, outside any meta-device init context)."""
        if self._bound is None:
            self._bound = self.routes.bind(self.config.token_ids.__getitem__)
        return self._bound

    # -------------------------------------------------------------------------------------------- weights

    def load_pretrained_components(self) -> None:
        """Load the component weights named in the config from local folders (vision, LLM, decoders), and give the
        diffusion decoders with ``text_tokenizer: llm`` the LLM's tokenizer."""
        cfg = self.cfg
        if cfg.vision.pretrained:
            self.vis_encoder.load_pretrained(cfg.vision.pretrained)
        if cfg.llm.pretrained:
            self._load_pretrained_llm(cfg.llm.pretrained)
        tokenizer = None

        def llm_tokenizer() -> Any:
            nonlocal tokenizer
            tokenizer = tokenizer or load_tokenizer(*cfg.tokenizer_source(), routes=self.routes)
            return tokenizer

        for name in self.decoder_names:
            load_decoder_weights(getattr(self, name), cfg.decoders[name], llm_tokenizer)

    def _load_pretrained_llm(self, folder: str) -> None:
        """Copy a causal-LM folder's weights into the LLM. The rows of the tokens added to the tokenizer start at the
        mean of the rows of its own vocabulary (an embedding padded past the vocabulary, as Qwen2's, is cut there
        first). With LoRA applied, the weights go under its wrapped layers (``….q_proj.base_layer.weight``) and the
        adapters keep their init."""
        target = self.llm.get_base_model() if hasattr(self.llm, "peft_config") else self.llm
        source = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=target.dtype)
        vocabulary = len(AutoTokenizer.from_pretrained(self.cfg.tokenizer_source()[0], local_files_only=True))
        source.resize_token_embeddings(vocabulary, mean_resizing=False)
        source.resize_token_embeddings(self.llm.get_input_embeddings().num_embeddings, mean_resizing=True)
        state = source.state_dict()
        plain = {key: unwrapped_key(key) for key in target.state_dict() if "lora_" not in key}
        missing = [key for key in plain.values() if key not in state]
        if missing:
            raise ValueError(f"config key llm.pretrained: {folder!r} lacks {len(missing)} tensors of the configured "
                             f"LLM, e.g. {missing[:3]} (is it a causal-LM folder?)")
        target.load_state_dict({key: state[name] for key, name in plain.items()}, strict=False)

    # -------------------------------------------------------------------------------------------- embedding

    @property
    def query_weight(self) -> torch.Tensor:
        """All query tables concatenated in route-table order ``[sum_K, C]`` (through the modules' forward, so ZeRO-3
        gathers their parameters)."""
        tables = self._query_tables()
        device = tables[0].weight.device
        return torch.cat([t(torch.arange(t.num_embeddings, device=device)) for t in tables], 0)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        region_masks: torch.Tensor | None = None,
        region_tiles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features, region embeddings and super-link queries written in.

        Args:
            input_ids: ``[B, L]`` with ``<im_patch>`` spans, ``<region>`` tokens and route placeholders.
            pixel_values: ``[N, 3, S, S]`` every tile of the batch, in text order (may be empty).
            region_masks: ``[R, S, S]`` bool, one per ``<region>`` token in batch/text order.
            region_tiles: ``[R]`` index of each region's tile in ``pixel_values``.
        Returns:
            ``[B, L, C]`` input embeddings.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, L, C]
        size = self.cfg.vision.image_size
        if pixel_values is None:
            pixel_values = embeds.new_zeros(0, 3, size, size)
        # Every module runs on every step, on zero-size inputs when its input is absent: this costs nothing and keeps
        # every rank's ZeRO-3 parameter gathers and gradient reductions in step whatever its batch holds. The vision
        # tower cannot take an empty batch, so under ZeRO-3 it encodes one blank tile that is then dropped.
        features, levels = self._encode_tiles(pixel_values.to(embeds.dtype))  # [N, T, Cv], [N, V, T, Cv]
        image_embeds = self.vl_bridge(features.to(embeds.dtype)).flatten(0, 1)  # [N*T, C]
        embeds = _scatter(embeds, input_ids == self.patch_token_id, image_embeds, "image patch")
        if self.region_encoder is not None:
            if region_masks is None:
                region_masks = pixel_values.new_zeros(0, size, size)
                region_tiles = torch.zeros(0, dtype=torch.long, device=input_ids.device)
            regions = self.region_encoder(pixel_values[region_tiles], region_masks, levels[region_tiles])  # [R, C]
            embeds = _scatter(embeds, input_ids == self.region_token_id, regions.to(embeds.dtype), "region")
        return splice_queries(embeds, input_ids, self.bound, self.query_weight.to(embeds.dtype), inplace=True)

    def _encode_tiles(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision features of ``[N, 3, S, S]`` tiles: ``[N, T, Cv]`` and ``[N, V, T, Cv]`` (V may be 0)."""
        n = pixel_values.shape[0]
        if n == 0 and not is_deepspeed_zero3_enabled():
            t, c, v = self.vis_encoder.tokens_per_tile, self.cfg.vision.hidden_size, self.vis_encoder.num_levels
            return pixel_values.new_zeros(0, t, c), pixel_values.new_zeros(0, v, t, c)
        features, levels = self.vis_encoder(pixel_values if n else pixel_values.new_zeros(1, *pixel_values.shape[1:]))
        return features[:n], (levels[:n] if levels is not None else features.new_zeros(n, 0, *features.shape[1:]))

    # -------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        region_masks: torch.Tensor | None = None,
        region_tiles: torch.Tensor | None = None,
        decoder_inputs: dict[str, dict[str, Any]] | None = None,
        **unused: Any,
    ) -> VisionLLMv2Output:
        """Teacher-forced forward: LM loss on ``labels`` and, for each decoder with inputs, its loss on the gathered
        query groups.

        Args:
            input_ids / attention_mask / labels: ``[B, L]``.
            pixel_values, region_masks, region_tiles: see :meth:`embed_inputs`.
            decoder_inputs: decoder name -> ``{"batch_index": [B_d], "images": [PIL], "targets": [dict]}`` for the
                samples that route to it, in batch order (raw targets in original pixels; the decoder prepares them).
        Returns:
            :class:`VisionLLMv2Output`.
        """
        embeds = self.embed_inputs(input_ids, pixel_values, region_masks, region_tiles)
        # [B, L]: positions whose next token is a label (0: every position, no labels)
        keep = 0 if labels is None else nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
        hidden, logits = self._run_llm(embeds, input_ids, attention_mask, keep)  # [B, L, C], [N, V] or [B, L, V]
        lm_loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])
        groups = gather_queries(hidden, input_ids, self.bound)
        total, decoder_losses, loss_dict = lm_loss, {}, {}
        for name, inputs in (decoder_inputs or {}).items():
            loss, terms = self._decoder_loss(name, groups.get(name), inputs)
            decoder_losses[name] = loss
            loss_dict.update({f"{name}/{k}": v for k, v in terms.items()})
            total = loss if total is None else total + loss
        return VisionLLMv2Output(loss=total, lm_loss=lm_loss, logits=logits, decoder_losses=decoder_losses,
                                 loss_dict=loss_dict, hidden_states=hidden, groups=groups)

    def _run_llm(self, embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 keep: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM over ``[B, L, C]`` embeddings: last-layer states ``[B, L, C]`` and the logits ``logits_to_keep=keep``
        asks for, in batch order.

        When only the spliced query rows can carry a gradient (the LLM, tower, bridge and region encoder frozen, as in
        stage 3), no position before the batch's first query reaches a trainable weight (attention is causal): that
        prefix runs without autograd and the rest continues from its cache, so the backward pass covers the suffix
        alone. Values and gradients are those of one pass.
        """
        start = 0
        # (gradient checkpointing would write the suffix into the cache again when it recomputes a layer)
        if (torch.is_grad_enabled() and not self.llm.is_gradient_checkpointing
                and not any(p.requires_grad for p in self._prefix_parameters())):
            columns = query_position_mask(input_ids, self.bound).any(0).nonzero()  # [Q', 1]
            start = int(columns[0]) if len(columns) else 0
        if start == 0:
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True,
                           logits_to_keep=keep)
            return out.hidden_states[-1], out.logits
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        split = isinstance(keep, torch.Tensor)
        with torch.no_grad():
            head = self.llm(inputs_embeds=embeds[:, :start], attention_mask=mask[:, :start], use_cache=True,
                            output_hidden_states=True, logits_to_keep=keep[:, :start] if split else 0)
        tail = self.llm(inputs_embeds=embeds[:, start:], attention_mask=mask, cache=head.cache,
                        output_hidden_states=True, logits_to_keep=keep[:, start:] if split else 0)
        hidden = torch.cat([head.hidden_states[-1], tail.hidden_states[-1]], 1)  # [B, L, C]
        if not split:
            return hidden, torch.cat([head.logits, tail.logits], 1)  # [B, L, V]
        # each pass lists its kept positions row by row: a stable sort by row puts the prefix's before the suffix's
        rows = torch.cat([keep[:, :start].nonzero()[:, 0], keep[:, start:].nonzero()[:, 0]])
        return hidden, torch.cat([head.logits, tail.logits])[torch.argsort(rows, stable=True)]

    def _prefix_parameters(self) -> Iterable[nn.Parameter]:
        """The weights that every position's embedding or state depends on (not the query tables)."""
        for module in (self.llm, self.vis_encoder, self.vl_bridge, self.region_encoder):
            yield from (module.parameters() if module is not None else ())

    def chat(self, processor: Any, images: Any, prompts: Any, regions: Any = None, **gen_kwargs: Any) -> list:
        """Batched chat with routing; see :func:`vllm2.chat.chat`. Returns one ``ChatResult`` per prompt."""
        return chat(self, processor, images, prompts, regions, **gen_kwargs)

    def _decoder_loss(self, name: str, groups: QueryGroups | None, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        """One decoder's weighted loss on its groups, from raw images/targets (prepared here by the decoder)."""
        if name not in self.decoder_names:
            raise ValueError(f"batch has targets for decoder {name!r}, which is not configured "
                             f"(configured: {self.decoder_names})")
        batch_index = torch.as_tensor(inputs["batch_index"]).cpu()
        if groups is None or not torch.equal(groups.batch_index.cpu(), batch_index):
            found = None if groups is None else groups.batch_index.tolist()
            raise ValueError(f"decoder {name!r}: targets for samples {batch_index.tolist()} but route groups in "
                             f"samples {found}")
        decoder = self.get_submodule(name)
        prepared = to_device(decoder.prepare(inputs["images"], inputs["targets"]), groups.states.device)
        decoder_out = decoder(groups.states, groups.mask, prepared, groups.route_ids)
        weight = self.cfg.training.loss_weights.get(name, 1.0)
        return weight * decoder_out.loss, {k: weight * v.detach() for k, v in (decoder_out.loss_dict or {}).items()}


# ------------------------------------------------------------------------------------------------------------ factory


def model_config(cfg: VLLM2Config) -> VisionLLMv2Config:
    """The model config of a project config: the LLM's (:func:`llm_config`) with the vocabulary size and special-token
    ids of the tokenizer the config names (or the built-in tiny one)."""
    routes, text_link = cfg.route_table(), cfg.text_link()
    llm_cfg = llm_config(cfg)
    tokenizer = load_tokenizer(*cfg.tokenizer_source(), routes=routes, text_link=text_link)
    token_ids = {name: tokenizer.convert_tokens_to_ids(name) for name in model_token_names(routes)}
    llm_cfg.vocab_size = len(tokenizer)
    return VisionLLMv2Config(vllm2=config_to_dict(cfg), llm_config=llm_cfg.to_dict(), token_ids=token_ids)


def load_decoder_weights(decoder: nn.Module, config: Any, llm_tokenizer: Callable[[], Any]) -> None:
    """A decoder's local components: the LLM's tokenizer (``llm_tokenizer()``) for a text encoder that reads it
    (``text_tokenizer: llm``), set first, then the folder of ``pretrained_path``, if any."""
    if getattr(config, "text_tokenizer", None) == "llm":
        decoder.set_tokenizer(llm_tokenizer())
    if getattr(config, "pretrained_path", None):
        decoder.load_pretrained(config.pretrained_path)


def build_model(cfg: VLLM2Config) -> VisionLLMv2Model:
    """Build a randomly initialised model from a project config (never loads weights, never downloads).

    The tokenizer named by the config (or the built-in tiny one) fixes the vocabulary size and special-token ids.
    Use :meth:`VisionLLMv2Model.load_pretrained_components` to load component weights from local folders.
    """
    return VisionLLMv2Model(model_config(cfg))


AutoConfig.register("vllm2", VisionLLMv2Config)
AutoModel.register(VisionLLMv2Config, VisionLLMv2Model)
