"""One micro-batch mixing VQA, detection, grounding, segmentation, pose, generation and editing samples through the
whole model."""

from __future__ import annotations

import pytest
import torch

from conftest import make_image
from vllm2 import Sample, build_model


def _mixed(processor):
    routes = processor.routes
    det, pose = routes.answer_suffix(routes.route_for_task("det")), routes.answer_suffix(routes.route_for_task("pose"))
    gen, edit = routes.answer_suffix(routes.route_for_task("t2i")), routes.answer_suffix(routes.route_for_task("edit"))
    img = make_image(96, 64, 4)
    box = torch.tensor([[10.0, 8.0, 50.0, 40.0]])
    kps = torch.tensor([[[20.0, 15.0, 2.0], [30.0, 30.0, 2.0], [40.0, 20.0, 1.0]]])
    samples, targets = [], []
    samples.append(Sample([("user", "<image>\nWhat colour is the square?"), ("assistant", "red")], [img]))
    targets.append({})
    samples.append(Sample([("user", "<image>\nFind the square."), ("assistant", f"square{det}, circle{det}.")], [img]))
    targets.append({"gdino": {"boxes": box, "labels": torch.tensor([0])}})
    grd = routes.answer_suffix(routes.route_for_task("rec"))
    seg = routes.answer_suffix(routes.route_for_task("semantic_seg"))
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[0, 8:40, 10:50] = True
    samples.append(Sample([("user", "<image>\nWhere is the red square?"), ("assistant", f"It is {grd}.")], [img]))
    targets.append({"gdino": {"boxes": box, "labels": torch.tensor([0])}})
    samples.append(Sample([("user", "<image>\nSegment the square."), ("assistant", f"square{seg}.")], [img]))
    targets.append({"gdino": {"boxes": box, "labels": torch.tensor([0]), "masks": mask}})
    samples.append(Sample([("user", "<image>\nPose?"),
                           ("assistant", f"person{det}. head{pose}, hand{pose}, foot{pose}.")], [img]))
    targets.append({"keypoint": {"boxes": box, "labels": torch.tensor([0]), "keypoints": kps}})
    samples.append(Sample([("user", "Draw a red square."), ("assistant", f"Here it is {gen}.")]))
    targets.append({"sd": {"image": make_image(32, 32, 5), "caption": "a red square"}})
    samples.append(Sample([("user", "<image>\nMake it blue."), ("assistant", f"Here it is {edit}.")], [img]))
    targets.append({"ip2p": {"image": make_image(96, 64, 6)}})
    batch = processor(samples)
    decoder_inputs = {}
    for b, (sample, target) in enumerate(zip(samples, targets)):
        for name, t in target.items():
            entry = decoder_inputs.setdefault(name, {"batch_index": [], "images": [], "targets": []})
            entry["batch_index"].append(b)
            entry["images"].append(sample.images[0] if sample.images else None)
            entry["targets"].append(t)
    for entry in decoder_inputs.values():
        entry["batch_index"] = torch.tensor(entry["batch_index"])
    return batch, decoder_inputs


def test_all_decoders_train_in_one_step(tiny_cfg, tiny_processor):
    model = build_model(tiny_cfg).train()
    batch, decoder_inputs = _mixed(tiny_processor)
    assert set(decoder_inputs) == set(model.decoder_names) == {"gdino", "keypoint", "sd", "ip2p"}
    out = model(**batch, decoder_inputs=decoder_inputs)
    assert set(out.decoder_losses) == set(decoder_inputs) and torch.isfinite(out.loss)
    assert all(any(k.startswith(f"{name}/") for k in out.loss_dict) for name in decoder_inputs)
    out.loss.backward()
    for table in ["det", "pose", "gen", "edit"]:
        grad = model.get_parameter(f"emb_embeddings_{table}.weight").grad
        assert grad is not None and grad.abs().sum() > 0, table


def test_loss_weights_scale_loss_and_loss_dict(tiny_processor):
    """``training.loss_weights`` multiplies a decoder's loss and each of its logged terms; the others and the LM loss
    stay, and ``loss`` is their sum."""
    from vllm2 import load_config

    model = build_model(load_config("tiny")).train()
    batch, decoder_inputs = _mixed(tiny_processor)
    inputs = {k: decoder_inputs[k] for k in ("keypoint", "sd")}

    def run(weights: dict[str, float]):
        model.cfg.training.loss_weights = weights
        torch.manual_seed(0)
        with torch.no_grad():
            return model(**batch, decoder_inputs=inputs)

    plain, weighted = run({}), run({"keypoint": 3.0})
    torch.testing.assert_close(weighted.decoder_losses["keypoint"], 3 * plain.decoder_losses["keypoint"])
    torch.testing.assert_close(weighted.decoder_losses["sd"], plain.decoder_losses["sd"])
    assert set(weighted.loss_dict) == set(plain.loss_dict) and any(k.startswith("keypoint/") for k in plain.loss_dict)
    for key, value in plain.loss_dict.items():
        torch.testing.assert_close(weighted.loss_dict[key], 3 * value if key.startswith("keypoint/") else value)
    torch.testing.assert_close(weighted.lm_loss, plain.lm_loss)
    torch.testing.assert_close(weighted.loss, plain.lm_loss + 3 * plain.decoder_losses["keypoint"]
                               + plain.decoder_losses["sd"])


def test_targets_without_groups_are_refused(tiny_cfg, tiny_processor):
    model = build_model(tiny_cfg)
    batch, decoder_inputs = _mixed(tiny_processor)
    bad = {"sd": dict(decoder_inputs["sd"], batch_index=torch.tensor([0]))}
    with pytest.raises(ValueError, match="decoder 'sd': targets for samples \\[0\\] but route groups in samples \\[5\\]"):
        model(**batch, decoder_inputs=bad)


def test_llm_tokenizer_feeds_the_alignment_loss(tiny_processor):
    """``text_tokenizer: llm``: loading the components gives the diffusion decoder the LLM's tokenizer, so the
    alignment loss (mapper output vs. the frozen text encoder's embedding of the caption) trains; a text encoder
    vocabulary smaller than the tokenizer is refused, naming the field."""
    from vllm2 import load_config

    sd = ["decoders.sd.use_text_encoder=true", "decoders.sd.text_tokenizer=llm", "decoders.sd.align_loss_weight=1.0"]
    model = build_model(load_config("tiny", [*sd, "decoders.sd.text_encoder_vocab_size=640"])).train()
    assert model.sd.sd_tokenizer is None
    model.load_pretrained_components()
    assert len(model.sd.sd_tokenizer) == len(tiny_processor.tokenizer)
    batch, decoder_inputs = _mixed(tiny_processor)
    out = model(**batch, decoder_inputs={"sd": decoder_inputs["sd"]})
    assert out.loss_dict["sd/loss_align"] > 0
    grad = torch.autograd.grad(out.loss, model.sd.llm2sd_mapper_queries)[0]
    assert grad.abs().sum() > 0
    small = build_model(load_config("tiny", [*sd, "decoders.sd.text_encoder_vocab_size=64"]))
    with pytest.raises(ValueError, match="text_encoder_vocab_size"):
        small.load_pretrained_components()
