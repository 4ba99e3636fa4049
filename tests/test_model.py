"""The multimodal core on the tiny config: forward/backward, overfitting, batching, save/load, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_image
from superlink import RouteTable
from vllm2 import Sample, VisionLLMv2Model, VisionLLMv2Processor, build_model, load_config
from vllm2.region import box_to_mask


def _samples():
    wide, tall, small = make_image(120, 50, 1), make_image(40, 90, 2), make_image(30, 30, 3)
    region = box_to_mask((5, 5, 40, 30), 120, 50)
    return [
        Sample([("user", "<image>\nWhat is the color of the square?"), ("assistant", "red")], [wide]),
        Sample([("user", "How many shapes are there?"), ("assistant", "two")]),  # text only
        Sample([("user", "<image>\nDescribe <reg>region1<region></reg>."), ("assistant", "a small green circle")],
               [wide], [(region, 0)]),
        Sample([("user", "<image> and <image>: which is taller?"), ("assistant", "the second one")], [small, tall]),
    ]


@pytest.fixture(scope="module")
def model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg).eval()


def test_forward_backward_reaches_every_trainable_part(tiny_cfg, tiny_processor):
    cfg = load_config("tiny", ["vision.freeze=false"])
    model = build_model(cfg)
    batch = tiny_processor(_samples())
    out = model(**batch)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert out.logits.shape == (labelled, model.llm.config.vocab_size) and torch.isfinite(out.loss)
    out.loss.backward()
    for name in ["vl_bridge.0.weight", "region_encoder.up_dim.weight", "llm.model.layers.0.self_attn.q_proj.weight",
                 "vis_encoder.vision_model.encoder.layers.0.mlp.fc1.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_frozen_vision_gets_no_gradient(tiny_cfg, tiny_processor):
    model = build_model(tiny_cfg)
    model(**tiny_processor(_samples())).loss.backward()
    assert all(p.grad is None for p in model.vis_encoder.parameters())
    assert model.get_parameter("vl_bridge.0.weight").grad is not None


def test_fixed_batch_overfits(tiny_cfg, tiny_processor):
    model = build_model(tiny_cfg).train()
    batch = tiny_processor(_samples())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for step in range(200):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item(), step)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_equals_per_sample(model, tiny_processor, padding_side):
    samples = _samples()
    batch = tiny_processor(samples, padding_side=padding_side)
    batch.pop("labels")  # without labels: logits at every position
    with torch.no_grad():
        logits = model(**batch).logits
        for i, sample in enumerate(samples):
            single = tiny_processor([sample])
            single.pop("labels")
            ref = model(**single).logits[0]  # [L_i, V]
            valid = batch["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i][valid], ref, atol=1e-4, rtol=1e-4)


def test_lm_loss_equals_the_llms_own_on_every_position(model, tiny_processor):
    """The LM head runs only where a label follows; the loss, its gradient and those logits are the LLM's own."""
    batch = tiny_processor(_samples())
    out = model(**batch)
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["region_masks"],
                                batch["region_tiles"])
    ref = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(out.lm_loss, ref.loss)
    predicts = batch["labels"][:, 1:] != -100  # [B, L-1]
    torch.testing.assert_close(out.logits, ref.logits[:, :-1][predicts])
    weight = model.llm.get_output_embeddings().weight
    grad, = torch.autograd.grad(out.lm_loss, weight)
    ref_grad, = torch.autograd.grad(ref.loss, weight)
    torch.testing.assert_close(grad, ref_grad)


def test_save_load_identical_logits(model, tiny_processor, tmp_path):
    batch = tiny_processor(_samples())
    model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = VisionLLMv2Model.from_pretrained(tmp_path).eval()
    processor = VisionLLMv2Processor.from_pretrained(tmp_path)
    again = processor(_samples())
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**again).logits)


def test_region_embedding_is_deterministic_in_training(tiny_cfg, tiny_processor):
    """In ``train()`` (where the official encoder samples random points) two passes embed a region identically, and
    the region reaches the embeddings (a different mask changes them)."""
    model = build_model(tiny_cfg).train()
    assert model.region_encoder.training
    sample = _samples()[2]
    other = Sample(sample.turns, sample.images, [(box_to_mask((60, 10, 110, 45), 120, 50), 0)])

    def embed(s: Sample) -> torch.Tensor:
        batch = tiny_processor([s])
        return model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["region_masks"],
                                  batch["region_tiles"])  # [1, L, C]

    first, second = embed(sample), embed(sample)
    assert torch.equal(first, second)
    assert not torch.allclose(first, embed(other))


def test_decoders_take_k_from_their_routes():
    """A route's ``num_embs`` is the one K: change it and its query table and decoder follow."""
    cfg = load_config("tiny")
    cfg.superlink.routes = [dict(r, num_embs=8) if r["decoder"] == "sd" else r
                            for r in RouteTable.default().to_config()]
    with torch.device("meta"):
        model = build_model(cfg)
    assert (model.sd.num_embs, model.ip2p.num_embs, model.gdino.num_embs, model.keypoint.num_embs) == (8, 64, 4, 4)
    assert model.emb_embeddings_gen.num_embeddings == 8


def test_region_changes_the_answer_logits(model, tiny_processor):
    s = _samples()[2]
    other = Sample(s.turns, s.images, [(box_to_mask((60, 10, 110, 45), 120, 50), 0)])
    with torch.no_grad():
        a, b = model(**tiny_processor([s])).logits, model(**tiny_processor([other])).logits
    assert not torch.allclose(a, b)


def test_image_count_mismatch_names_sample(tiny_processor):
    bad = Sample([("user", "<image>\n<image> two?"), ("assistant", "no")], [make_image(20, 20)])
    with pytest.raises(ValueError, match="sample 1: 2 <image> tokens but 1 images"):
        tiny_processor([_samples()[1], bad])


def test_region_count_mismatch_names_sample(tiny_processor):
    bad = Sample([("user", "<image>\nwhat is <region>?"), ("assistant", "x")], [make_image(20, 20)])
    with pytest.raises(ValueError, match="sample 0: 1 <region> tokens but 0 regions"):
        tiny_processor([bad])


def test_model_refuses_patch_count_mismatch(model, tiny_processor):
    batch = tiny_processor(_samples()[:1])
    batch["pixel_values"] = batch["pixel_values"][:1]  # drop tiles behind the processor's back
    with pytest.raises(ValueError, match="image patch tokens per sample"):
        model(**batch)


def test_too_long_prompt_is_refused(tiny_processor):
    with pytest.raises(ValueError, match="sample 0: .* exceed max_length 20"):
        tiny_processor(_samples()[:1], max_length=20)


def test_missing_image_file_is_named(tiny_processor, tmp_path):
    bad = Sample([("user", "<image>\nhi"), ("assistant", "x")], [tmp_path / "gone.png"])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        tiny_processor([bad])


def test_image_tokens_follow_anyres(tiny_processor):
    batch = tiny_processor(_samples()[:1])  # 120x50 -> 2x1 grid + thumbnail = 3 tiles of 16 tokens
    assert batch["pixel_values"].shape == (3, 3, 56, 56)
    assert int((batch["input_ids"] == tiny_processor.patch_token_id).sum()) == 3 * 16


def test_no_scalar_parameters(tiny_cfg):
    """DeepSpeed broadcasts parameters as byte views, which 0-d tensors do not allow."""
    model = build_model(tiny_cfg)
    assert [n for n, p in model.named_parameters() if p.dim() == 0] == []
