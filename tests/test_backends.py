"""Alternative vision backend (open_clip), LoRA, gradient checkpointing, linear bridge, missing weight paths."""

from __future__ import annotations

import pytest
import torch

from conftest import make_image
from vllm2 import Sample, build_model, load_config


def _batch(processor):
    return processor([Sample([("user", "<image>\nWhat is it?"), ("assistant", "a red square")], [make_image(90, 40)])])


def test_open_clip_backend_trains(tiny_processor):
    cfg = load_config("tiny", ["vision.backend=open_clip", "vision.open_clip_model=vllm2-tiny-vit", "vision.freeze=false"])
    model = build_model(cfg)
    assert any(n.startswith("vis_encoder.visual.") for n, _ in model.named_parameters())
    out = model(**_batch(tiny_processor))
    out.loss.backward()
    assert model.vis_encoder.visual.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tower", [
    ["vision.open_clip_model=vllm2-tiny-vit"],
    ["vision.open_clip_model=vllm2-tiny-rn", "vision.image_size=64", "vision.patch_size=16", "vision.hidden_size=256",
     "vision.output_layer=-1", "region.enabled=false", "vision.image_mode=resize"],
])
def test_open_clip_towers_save_and_load_exactly(tmp_path, tower, caplog):
    from vllm2 import VisionLLMv2Model, VisionLLMv2Processor

    cfg = load_config("tiny", ["vision.backend=open_clip", *tower])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    processor = VisionLLMv2Processor.from_config(cfg)
    model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        loaded = VisionLLMv2Model.from_pretrained(tmp_path).eval()
    assert "initialized randomly" not in caplog.text  # open_clip's warning: the folder's weights are loaded
    batch = _batch(processor)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_open_clip_layer_choice_matters(tiny_processor):
    cfg = load_config("tiny", ["vision.backend=open_clip", "vision.open_clip_model=vllm2-tiny-vit"])
    torch.manual_seed(0)
    a = build_model(cfg).eval()
    feats_pen, levels = a.vis_encoder(_batch(tiny_processor)["pixel_values"])
    a.vis_encoder.cfg.output_layer = -1
    feats_last, _ = a.vis_encoder(_batch(tiny_processor)["pixel_values"])
    assert feats_pen.shape == (3, 16, 32) and levels.shape == (3, 3, 16, 32)
    assert torch.equal(levels[:, -1], feats_last) and torch.equal(levels[:, -2], feats_pen)


def test_lora_trains_only_adapters(tiny_processor):
    model = build_model(load_config("tiny", ["llm.lora.enabled=true", "llm.lora.r=4"]))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert not model.get_parameter("llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight").requires_grad
    model(**_batch(tiny_processor)).loss.backward()
    grad = model.get_parameter("llm.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight").grad
    assert grad is not None and grad.abs().sum() > 0


def test_gradient_checkpointing_matches_plain(tiny_processor):
    batch = _batch(tiny_processor)
    torch.manual_seed(1)
    plain = build_model(load_config("tiny")).train()
    torch.manual_seed(1)
    ckpt = build_model(load_config("tiny", ["llm.gradient_checkpointing=true"])).train()
    ckpt.load_state_dict(plain.state_dict())
    la, lb = plain(**batch).loss, ckpt(**batch).loss
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    name = "llm.model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(plain.get_parameter(name).grad, ckpt.get_parameter(name).grad)


def test_linear_bridge(tiny_processor):
    model = build_model(load_config("tiny", ["bridge.type=linear"]))
    assert tuple(model.vl_bridge.weight.shape) == (64, 32)
    assert torch.isfinite(model(**_batch(tiny_processor)).loss)


def test_bad_bridge_and_missing_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="bridge.type"):
        build_model(load_config("tiny", ["bridge.type=mlp9"]))
    with pytest.raises(FileNotFoundError, match="llm.pretrained"):
        build_model(load_config("tiny", [f"llm.pretrained={tmp_path / 'vicuna'}"]))
    model = build_model(load_config("tiny", [f"vision.pretrained={tmp_path / 'clip'}"]))
    with pytest.raises(FileNotFoundError, match="vision.pretrained"):
        model.load_pretrained_components()


def _resnet_cfg(*extra: str):
    return load_config("tiny", ["vision.backend=open_clip", "vision.open_clip_model=vllm2-tiny-rn",
                                "vision.image_size=64", "vision.patch_size=16", "vision.hidden_size=256",
                                "vision.output_layer=-1", "vision.freeze=false", "region.enabled=false", *extra])


def test_open_clip_resnet_tower_reads_the_stride_16_stage_and_loads_a_checkpoint(tmp_path):
    import open_clip

    from vllm2.vision import OPEN_CLIP_CONFIG_DIR

    open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
    torch.manual_seed(0)
    clip = open_clip.create_model("vllm2-tiny-rn", force_image_size=64)
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "rn.pt")
    model = build_model(_resnet_cfg(f"vision.pretrained={tmp_path / 'rn.pt'}"))
    model.load_pretrained_components()
    tower = model.vis_encoder
    assert torch.equal(tower.visual.layer3[0].conv1.weight, clip.visual.layer3[0].conv1.weight)
    assert not any(".layer4." in n or ".attnpool." in n for n, _ in model.named_parameters())
    pixels = torch.randn(2, 3, 64, 64)
    features, levels = tower(pixels)
    assert features.shape == (2, 16, 256) and levels is None  # 4x4 cells of layer3 (stride 16, 4 x 4 x 16 channels)
    with torch.no_grad():
        fmap = clip.visual.layer3(clip.visual.layer2(clip.visual.layer1(clip.visual.stem(pixels))))  # [2, 256, 4, 4]
    torch.testing.assert_close(features, fmap.flatten(2).transpose(1, 2))
    (features * torch.randn_like(features)).sum().backward()  # a plain sum is constant under batch norm
    assert tower.visual.layer3[0].bn3.weight.grad.abs().sum() > 0  # open_clip zero-inits bn3: conv1 gets none yet


def test_open_clip_resnet_tower_rejects_a_stride_or_width_it_lacks():
    with pytest.raises(ValueError, match="vision.patch_size"):
        build_model(_resnet_cfg("vision.patch_size=12", "vision.image_size=96"))
    with pytest.raises(ValueError, match="vision.hidden_size"):
        build_model(_resnet_cfg("vision.hidden_size=128"))
    with pytest.raises(ValueError, match="region.num_levels"):
        build_model(_resnet_cfg("region.enabled=true"))


def test_a_frozen_resnet_tower_keeps_its_batch_norm_statistics():
    model = build_model(_resnet_cfg("vision.freeze=true")).train()
    bn = model.vis_encoder.visual.layer1[0].bn1
    before = bn.running_mean.clone()
    model.vis_encoder(torch.randn(2, 3, 64, 64))
    assert not bn.training and torch.equal(bn.running_mean, before)
    model.vis_encoder.set_frozen(False)
    model.train()
    model.vis_encoder(torch.randn(2, 3, 64, 64))
    assert bn.training and not torch.equal(bn.running_mean, before)


def _saved_llama(folder) -> "LlamaForCausalLM":
    """A tiny Llama folder as transformers saves one (weights + tokenizer), vocabulary without the special tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm2.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(3)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False))
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return llm


@pytest.mark.parametrize("lora", [False, True])
def test_pretrained_llm_folder_loads_with_and_without_lora(tmp_path, lora):
    source = _saved_llama(tmp_path / "llama")
    model = build_model(load_config("tiny", [f"llm.pretrained={tmp_path / 'llama'}", f"llm.lora.enabled={lora}"]))
    model.load_pretrained_components()
    llm = model.llm.get_base_model() if lora else model.llm
    n = source.config.vocab_size
    embeddings = llm.get_input_embeddings().weight
    assert embeddings.shape[0] > n  # the special tokens were added
    assert torch.equal(embeddings[:n], source.get_input_embeddings().weight)
    torch.testing.assert_close(embeddings[n:], source.get_input_embeddings().weight.mean(0).expand(
        embeddings.shape[0] - n, -1), atol=0.05, rtol=0)  # mean resizing samples around the mean
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"):
        layer = llm.get_submodule(name)
        wrapped = lora and name != "lm_head"
        expected = source.get_submodule(name).weight
        assert torch.equal((layer.base_layer if wrapped else layer).weight[:len(expected)], expected), name
    if lora:  # adapters and, as in the official recipe, the token embeddings and LM head (the new rows must learn)
        trained = ("lora_", "embed_tokens.", "lm_head.")
        assert all(p.requires_grad == any(t in n for t in trained) for n, p in model.llm.named_parameters())


def test_a_folder_of_the_wrong_kind_as_llm_is_named(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=56, patch_size=14)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="llm.pretrained: .*'clip_vision_model' model, not a causal LM"):
        build_model(load_config("tiny", [f"llm.pretrained={tmp_path / 'clip'}"]))
