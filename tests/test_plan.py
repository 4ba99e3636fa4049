"""``vllm2 train --dry-run``: parameter counts of the meta-device plan against a real model, DeepSpeed's memory
formulas, and absent weight folders."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from vllm2 import build_model, load_config
from vllm2.cli.train import main as train_main
from vllm2.plan import GB, plan_training
from vllm2.training import apply_freeze

FREEZE = "training.freeze=[vl_bridge, gdino.model.backbone]"


@pytest.mark.parametrize("lora", [False, True])
def test_plan_counts_equal_a_built_models(lora):
    cfg = load_config("tiny", [FREEZE, "vision.freeze=true", f"llm.lora.enabled={lora}"])
    plan = plan_training(cfg, gpus_per_node=4)
    model = build_model(cfg)
    apply_freeze(model, cfg.training.freeze)
    expected: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        expected.setdefault(name.split(".")[0], [0, 0])[0 if param.requires_grad else 1] += param.numel()
    assert plan.modules == {k: tuple(v) for k, v in expected.items()}
    assert plan.modules["vis_encoder"][0] == 0 and plan.modules["vl_bridge"][0] == 0
    assert (plan.modules["llm"][1] > 0) == lora  # LoRA freezes the LLM's base weights
    assert plan.notes == [] and plan.gpus == 4 and plan.zero_stage is None


def test_memory_follows_deepspeeds_formulas():
    cfg = load_config("tiny", [FREEZE, "training.deepspeed=zero3"])
    plan = plan_training(cfg, gpus_per_node=4, nodes=2)
    trainable, frozen = (sum(c[i] for c in plan.modules.values()) for i in (0, 1))
    model = build_model(cfg)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    # ZeRO-2: 16-bit weights of everything on every GPU + 18 bytes (grads, fp32 master, Adam) per trainable / 8 GPUs
    assert plan.gpu_gb[2] == pytest.approx((2 * trainable + int(18 * trainable / 8) + 2 * frozen) / GB)
    # ZeRO-3: the largest layer gathered in fp32 + every state partitioned over the 8 GPUs
    assert plan.gpu_gb[3] == pytest.approx((4 * largest + int(18 * trainable / 8) + 2 * frozen / 8) / GB)
    assert plan.zero_stage == 3


def test_absent_llm_folder_uses_the_yaml_sizes(capsys, tmp_path):
    absent = tmp_path / "vicuna"
    code = train_main(["--dry-run", "--json", "--nproc", "2", "tiny", f"llm.pretrained={absent}",
                       "llm.vocab_size=1000", "decoders={}"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["notes"] == [f"llm.pretrained {str(absent)!r} is absent: the YAML's sizes are used"]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=1000 + 26, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False))
    assert plan["modules"]["llm"] == [sum(p.numel() for p in llama.parameters()), 0]  # + the 26 special tokens
    assert plan["gpus"] == 2 and set(plan["gpu_gb"]) == {"2", "3"}
