"""Plan a training run before downloading anything: parameters per module and the per-GPU memory of model states.

The model is built on the meta device from the config alone (no weights are read or allocated). Where ``llm.pretrained``
or the tokenizer folder exists, its config and vocabulary are used; where it is absent the YAML's sizes are, with
``llm.vocab_size`` plus the special tokens as the vocabulary. Memory comes from DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, the functions behind its
``…_all_cold`` tables, without offload) for the trainable parameters, plus the 16-bit copy of the frozen ones: whole on
every GPU under ZeRO-2, partitioned under ZeRO-3. Activations are not included.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import VLLM2Config, config_to_dict, resolve_deepspeed
from .modeling import VisionLLMv2Config, VisionLLMv2Model, llm_config, model_config, model_token_names
from .tokenizer import official_token_ids
from .training import apply_freeze

__all__ = ["Plan", "plan_training"]

GB = 1024**3


@dataclass
class Plan:
    """What a config trains and what its model states need per GPU.

    Attributes:
        modules: top-level module -> (trainable, frozen) parameter counts.
        gpu_gb: ZeRO stage (2, 3) -> GB of model states per GPU.
        zero_stage: the stage ``training.deepspeed`` selects (None without DeepSpeed).
        gpus: GPUs in all (processes per node x nodes).
        notes: folders the config names that are absent (their YAML sizes were used).
    """

    modules: dict[str, tuple[int, int]]
    gpu_gb: dict[int, float]
    zero_stage: int | None
    gpus: int
    notes: list[str]

    def table(self) -> str:
        """The plan as a readable table."""
        rows = [f"{'module':<24}{'trainable':>16}{'frozen':>16}"]
        rows += [f"{name:<24}{t:>16,}{f:>16,}" for name, (t, f) in self.modules.items()]
        trainable, frozen = (sum(c[i] for c in self.modules.values()) for i in (0, 1))
        rows.append(f"{'total':<24}{trainable:>16,}{frozen:>16,}")
        rows.append(f"\nmodel states per GPU ({self.gpus} GPUs; DeepSpeed's estimators, no offload, no activations):")
        rows += [f"  ZeRO-{stage}: {gb:7.2f} GB" + ("  (training.deepspeed)" if stage == self.zero_stage else "")
                 for stage, gb in self.gpu_gb.items()]
        return "\n".join([*(f"note: {n}" for n in self.notes), *rows])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def plan_training(cfg: VLLM2Config, gpus_per_node: int = 1, nodes: int = 1) -> Plan:
    """Build ``cfg``'s model on the meta device, apply its freezing and LoRA, and estimate model-state memory."""
    tokenizer_named = cfg.tokenizer_source()[0] is not None
    cfg, notes = _without_absent_folders(cfg)
    model = _meta_model(cfg, yaml_vocab=tokenizer_named and cfg.tokenizer_source()[0] is None)
    if cfg.training.freeze:
        apply_freeze(model, cfg.training.freeze)
    modules: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        counts = modules.setdefault(name.split(".")[0], [0, 0])
        counts[0 if param.requires_grad else 1] += param.numel()
    trainable, frozen = (sum(c[i] for c in modules.values()) for i in (0, 1))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return Plan({k: (v[0], v[1]) for k, v in modules.items()},
                _model_state_gb(trainable, frozen, largest, gpus_per_node, nodes),
                _zero_stage(cfg), gpus_per_node * nodes, notes)


def _without_absent_folders(cfg: VLLM2Config) -> tuple[VLLM2Config, list[str]]:
    """``cfg`` with absent LLM and tokenizer folders cleared (with a note each); the decoders are built from the
    YAML's sizes whatever their folders hold."""
    llm, notes = cfg.llm, []
    for key in ("pretrained", "tokenizer"):
        folder = getattr(llm, key)
        if folder and not Path(folder).is_dir():
            notes.append(f"llm.{key} {folder!r} is absent: the YAML's sizes are used")
            llm = dataclasses.replace(llm, **{key: None})
    return dataclasses.replace(cfg, llm=llm), notes


def _meta_model(cfg: VLLM2Config, yaml_vocab: bool) -> VisionLLMv2Model:
    """The model on the meta device; ``yaml_vocab``: the tokenizer folder is absent, so the vocabulary is
    ``llm.vocab_size`` + the special tokens in the official order (else the tokenizer's, as in ``build_model``)."""
    if yaml_vocab:
        routes, text_link = cfg.route_table(), cfg.text_link()
        llm = llm_config(cfg)
        ids = official_token_ids(routes, cfg.llm.vocab_size)
        llm.vocab_size = cfg.llm.vocab_size + len(ids) + len(text_link.tokens if text_link else ())
        config = VisionLLMv2Config(vllm2=config_to_dict(cfg), llm_config=llm.to_dict(),
                                   token_ids={name: ids[name] for name in model_token_names(routes)})
    else:
        config = model_config(cfg)
    with torch.device("meta"):
        return VisionLLMv2Model(config)


def _model_state_gb(trainable: int, frozen: int, largest_layer: int, gpus_per_node: int,
                    nodes: int) -> dict[int, float]:
    """Per-GPU GB of model states under ZeRO-2 and ZeRO-3 (DeepSpeed's estimators + 2 bytes per frozen parameter)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = gpus_per_node * nodes
    _, zero2 = estimate_zero2_model_states_mem_needs(trainable, gpus_per_node, nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(trainable, largest_layer, gpus_per_node, nodes,
                                                         cpu_offload=False, cpu_offload_params=False)
    return {2: (zero2 + 2 * frozen) / GB, 3: (zero3 + 2 * frozen / gpus) / GB}


def _zero_stage(cfg: VLLM2Config) -> int | None:
    if not cfg.training.deepspeed:
        return None
    return json.loads(Path(resolve_deepspeed(cfg.training.deepspeed)).read_text())["zero_optimization"]["stage"]
