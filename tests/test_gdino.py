"""GroundingDINO decoder: overfitting a fixed batch (boxes and masks), chunked categories, inference modes,
image preparation and post-processing, weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from transformers import BertConfig, GroundingDinoForObjectDetection
from transformers.loss.loss_for_object_detection import box_iou
from transformers.models.grounding_dino.modeling_grounding_dino import (
    SPECIAL_TOKENS,
    generate_masks_with_special_tokens_and_transfer_map,
)

from decoders import DECODERS, build_decoder
from decoders.gdino import GroundingDinoDecoder, build_hf_config
from decoders.gdino.postprocess import boxes_to_original, masks_to_original
from decoders.gdino.text import layout_categories
from tiny_sizes import tiny_decoder_config
from vllm2.convert import TargetSpec, convert_tensors

LLM_WIDTH = 32
COLOURS = [(230, 40, 40), (40, 200, 40), (50, 80, 240)]
OVERFIT_STEPS = 400


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the tiny model is faster that way on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def scene(specs: list[tuple[int, str, tuple[int, int, int, int]]], size: tuple[int, int] = (128, 128)):
    """Draw filled shapes (label, "rect"|"ellipse", xyxy) on a dark background; return the image and its target."""
    image = Image.new("RGB", size, (25, 25, 25))
    draw = ImageDraw.Draw(image)
    boxes, labels, masks = [], [], []
    for label, shape, box in specs:
        mask = Image.new("L", size, 0)
        for canvas, fill in ((draw, COLOURS[label]), (ImageDraw.Draw(mask), 1)):
            (canvas.rectangle if shape == "rect" else canvas.ellipse)(box, fill=fill)
        mask_array = np.array(mask).astype(bool)
        ys, xs = mask_array.nonzero()
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(label)
        masks.append(mask_array)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels),
        "masks": torch.from_numpy(np.stack(masks)),
    }
    return image, target


def fixed_batch():
    first = scene([(0, "rect", (8, 10, 50, 60)), (1, "ellipse", (70, 20, 118, 70)), (2, "rect", (30, 80, 90, 118))])
    second = scene([(2, "ellipse", (10, 10, 60, 55)), (0, "rect", (70, 50, 120, 90))], size=(128, 96))
    return [first[0], second[0]], [first[1], second[1]]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum().clamp(min=1))


def best_of_label(result: dict, label: int) -> int:
    """Index of the highest-scoring prediction with ``label``."""
    candidates = (result["labels"] == label).nonzero().flatten()
    return int(candidates[result["scores"][candidates].argmax()])


@pytest.fixture(scope="module")
def trained():
    """A tiny decoder and learnable query states overfitted on a fixed batch of two synthetic images."""
    torch.manual_seed(0)
    decoder = GroundingDinoDecoder(tiny_decoder_config("gdino"), LLM_WIDTH)
    images, targets = fixed_batch()
    inputs = decoder.prepare(images, targets)
    queries = torch.nn.Parameter(torch.randn(2, 3, 4, LLM_WIDTH))
    query_mask = torch.ones(2, 3, dtype=torch.bool)
    params = list(decoder.parameters()) + [queries]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    history = []
    for _ in range(OVERFIT_STEPS):
        out = decoder(queries, query_mask, inputs)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        warmup.step()
        history.append({key: float(value.detach()) for key, value in out.loss_dict.items()})
        history[-1]["total"] = float(out.loss.detach())
    decoder.eval()
    return {"decoder": decoder, "queries": queries.detach(), "query_mask": query_mask, "inputs": inputs,
            "images": images, "targets": targets, "history": history}


def test_overfit_loss_falls(trained):
    history = trained["history"]
    assert history[0]["total"] > 50.0
    assert history[-1]["total"] <= 0.2 * history[0]["total"]
    mask_terms = [h["loss_mask"] + h["loss_dice"] for h in (history[0], history[-1])]
    assert mask_terms[1] < 0.5 * mask_terms[0]


def test_overfit_boxes_and_masks_match_targets(trained):
    decoder = trained["decoder"]
    results = decoder.predict(trained["queries"], trained["query_mask"], trained["inputs"])
    for result, target, image in zip(results, trained["targets"], trained["images"]):
        assert result["masks"].shape[1:] == (image.height, image.width)
        for box, label, mask in zip(target["boxes"], target["labels"], target["masks"]):
            best = best_of_label(result, int(label))
            assert box_iou(box[None], result["boxes"][best][None])[0].item() >= 0.5
            assert mask_iou(result["masks"][best], mask) >= 0.5


def test_grounding_mode_returns_top1_per_group(trained):
    decoder = trained["decoder"]
    results = decoder.predict(trained["queries"], trained["query_mask"], trained["inputs"], mode="grounding")
    for result, target in zip(results, trained["targets"]):
        assert result["labels"].tolist() == [0, 1, 2]
        for box, label in zip(target["boxes"], target["labels"]):
            assert box_iou(box[None], result["boxes"][int(label)][None])[0].item() >= 0.5


def test_route_modes_pick_the_reading_per_group(trained):
    decoder = trained["decoder"]
    route_ids = torch.tensor([[7, 8, 8], [8, 8, 7]])
    results = decoder.predict(trained["queries"], trained["query_mask"], trained["inputs"], route_ids,
                              route_modes={8: "grounding"}, topk=5)
    assert results[0]["labels"][-2:].tolist() == [1, 2]
    assert results[1]["labels"][-2:].tolist() == [0, 1]
    assert len(results[0]["labels"]) == 5 + 2
    assert set(results[0]["labels"][:5].tolist()) == {0}
    with pytest.raises(ValueError, match="route_modes"):
        decoder.predict(trained["queries"], trained["query_mask"], trained["inputs"], route_ids,
                        route_modes={8: "panoptic"})


def test_semantic_mode_labels_each_shape_and_leaves_the_background(trained):
    decoder = trained["decoder"]
    results = decoder.predict(trained["queries"], trained["query_mask"], trained["inputs"], mode="semantic")
    for result, target in zip(results, trained["targets"]):
        assert result["semantic"].shape == target["masks"].shape[1:]
        for label, mask in zip(target["labels"], target["masks"]):
            assert (result["semantic"][mask] == label).float().mean() >= 0.5
        background = ~target["masks"].any(0)  # [H, W]
        assert (result["semantic"][background] == -1).float().mean() >= 0.9


def test_rle_round_trip(trained):
    decoder = trained["decoder"]
    result = decoder.predict(trained["queries"], trained["query_mask"], trained["inputs"], topk=4)[0]
    decoded = torch.from_numpy(mask_utils.decode(result["rles"])).permute(2, 0, 1).bool()
    assert torch.equal(decoded, result["masks"])
    assert mask_utils.area(result["rles"]).tolist() == result["masks"].sum((1, 2)).tolist()


def test_chunked_inference_merges_the_passes(trained):
    """Two categories per pass (text length 4): three categories take two passes whose outputs are merged; each
    category's best detection is the one its own pass finds alone (labels offset by the pass's first group)."""
    chunked = GroundingDinoDecoder(tiny_decoder_config("gdino", max_text_len=4), LLM_WIDTH)
    chunked.load_state_dict(trained["decoder"].state_dict())
    chunked.eval()
    assert chunked._chunks(3) == [(0, 2), (2, 3)]
    queries, query_mask, inputs = trained["queries"], trained["query_mask"], trained["inputs"]
    merged = chunked.predict(queries, query_mask, inputs, topk=60)
    for start, end in chunked._chunks(3):
        alone = chunked.predict(queries[:, start:end], query_mask[:, start:end], inputs, topk=60)
        for whole, part in zip(merged, alone):
            for label in range(end - start):
                best, own = best_of_label(whole, start + label), best_of_label(part, label)
                assert torch.allclose(whole["boxes"][best], part["boxes"][own], atol=1e-5)
                assert whole["scores"][best].item() == pytest.approx(part["scores"][own].item(), abs=1e-6)


def test_chunked_training_loss_is_the_mean_over_chunks():
    config = tiny_decoder_config("gdino", max_text_len=4)
    chunked = GroundingDinoDecoder(config, LLM_WIDTH)
    images, targets = fixed_batch()
    inputs = chunked.prepare(images, targets)
    queries = torch.randn(2, 3, 4, LLM_WIDTH)
    query_mask = torch.ones(2, 3, dtype=torch.bool)
    torch.manual_seed(1)
    loss = chunked(queries, query_mask, inputs).loss
    torch.manual_seed(1)
    parts = []
    for start, end in ((0, 2), (2, 3)):
        part_inputs = dict(inputs)
        part_inputs["targets"] = [
            {key: value[(t["class_labels"] >= start) & (t["class_labels"] < end)] for key, value in t.items()}
            for t in inputs["targets"]
        ]
        for t in part_inputs["targets"]:
            t["class_labels"] = t["class_labels"] - start
        parts.append(chunked(queries[:, start:end], query_mask[:, start:end], part_inputs).loss)
    torch.testing.assert_close(loss, torch.stack(parts).mean())


def test_gradients_reach_real_query_groups_only():
    decoder = GroundingDinoDecoder(tiny_decoder_config("gdino"), LLM_WIDTH)
    images, targets = fixed_batch()
    targets[1]["boxes"], targets[1]["labels"], targets[1]["masks"] = (
        targets[1]["boxes"][:1], torch.tensor([1]), targets[1]["masks"][:1])
    inputs = decoder.prepare(images, targets)
    queries = torch.nn.Parameter(torch.randn(2, 3, 4, LLM_WIDTH))
    query_mask = torch.tensor([[True, True, True], [True, True, False]])
    decoder(queries, query_mask, inputs).loss.backward()
    per_group = queries.grad.abs().sum((2, 3))  # [B, G]
    assert (per_group[query_mask] > 0).all()
    assert per_group[1, 2] == 0


def test_every_parameter_gets_a_gradient_without_target_masks():
    """Mask-free batches still touch the mask head (zero-valued terms), as distributed training needs."""
    decoder = GroundingDinoDecoder(tiny_decoder_config("gdino"), LLM_WIDTH)
    images, targets = fixed_batch()
    inputs = decoder.prepare(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    out = decoder(torch.randn(2, 3, 4, LLM_WIDTH), torch.ones(2, 3, dtype=torch.bool), inputs)
    out.loss.backward()
    assert out.loss_dict["loss_mask"] == 0 and out.loss_dict["loss_dice"] == 0
    assert [name for name, p in decoder.named_parameters() if p.grad is None] == []


def test_batched_predictions_match_single_samples():
    """Samples with different numbers of groups give the same scores alone and in a batch."""
    decoder = GroundingDinoDecoder(tiny_decoder_config("gdino"), LLM_WIDTH).eval()
    images = [scene([(0, "rect", (8, 8, 40, 40))])[0], scene([(1, "ellipse", (50, 50, 100, 110))])[0]]
    inputs = decoder.prepare(images)
    queries = torch.randn(2, 3, 4, LLM_WIDTH)
    query_mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        batched = decoder(queries, query_mask, inputs).preds
        for b in range(2):
            single_inputs = {key: value[b:b + 1] for key, value in inputs.items() if key != "targets"}
            groups = int(query_mask[b].sum())
            single = decoder(queries[b:b + 1, :groups], query_mask[b:b + 1, :groups], single_inputs).preds
            torch.testing.assert_close(batched["logits"][b, :, :groups], single["logits"][0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batched["boxes"][b], single["boxes"][0], atol=1e-5, rtol=1e-5)


def test_category_text_layout_drives_the_stock_phrase_masks():
    """Real groups attend to each other with positions 0..n-1; padding groups and padding stay isolated."""
    features = torch.randn(2, 3, 8, requires_grad=True)
    group_mask = torch.tensor([[True, False, True], [True, True, True]])
    text = layout_categories(features, group_mask)
    attention, positions = generate_masks_with_special_tokens_and_transfer_map(
        text.input_ids, torch.tensor(SPECIAL_TOKENS))
    assert text.input_ids.shape == (2, 5)
    assert text.attention_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert attention[0, :2, :2].all() and not attention[0, :2, 3:].any()
    assert attention[1, :3, :3].all() and not attention[1, :3, 4:].any()
    assert torch.equal(attention[0, 3:, 3:], torch.eye(2, dtype=torch.bool))
    assert positions[0, :2].tolist() == [0, 1] and positions[1, :3].tolist() == [0, 1, 2]
    assert text.slots.tolist() == [[0, 0, 1], [0, 1, 2]]
    torch.testing.assert_close(text.features[0, 1], features[0, 2])
    assert text.features[0, 2:].abs().sum() == 0
    scores = torch.arange(10.0).expand(2, 4, 10)
    assert text.gather(scores)[0, 0].tolist() == [0.0, float("-inf"), 1.0]


def test_prepare_resizes_pads_and_normalises_targets():
    decoder = GroundingDinoDecoder(tiny_decoder_config("gdino", image_size=64, max_image_size=100), LLM_WIDTH)
    black = Image.new("RGB", (200, 100))  # all zeros: the pixel mask must not come from pixel values
    masks = torch.zeros(1, 100, 200, dtype=torch.bool)
    masks[0, 20:60, 40:120] = True
    target = {"boxes": torch.tensor([[40.0, 20.0, 120.0, 60.0]]), "labels": torch.tensor([0]), "masks": masks}
    inputs = decoder.prepare([black, Image.new("RGB", (30, 90), (9, 9, 9))], [target, {"boxes": [], "labels": []}])
    assert inputs["image_sizes"].tolist() == [[50, 100], [100, 33]]
    assert inputs["orig_sizes"].tolist() == [[100, 200], [90, 30]]
    assert inputs["pixel_values"].shape == (2, 3, 128, 128)
    assert inputs["pixel_mask"][0].sum() == 50 * 100 and inputs["pixel_mask"][0, :50, :100].all()
    assert inputs["pixel_mask"][1].sum() == 100 * 33 and inputs["pixel_mask"][1, :100, :33].all()
    prepared = inputs["targets"][0]
    torch.testing.assert_close(prepared["boxes"], torch.tensor([[0.4, 0.4, 0.4, 0.4]]))
    assert prepared["masks"].shape == (1, 128, 128)
    assert prepared["masks"][0, 10:30, 20:60].all() and prepared["masks"][0].sum() == 20 * 40
    assert inputs["targets"][1]["boxes"].shape == (0, 4)


def test_prepare_rejects_bad_targets():
    decoder = GroundingDinoDecoder(tiny_decoder_config("gdino"), LLM_WIDTH)
    image = Image.new("RGB", (64, 48))
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]"):
        decoder.prepare([image], [{"boxes": [[0, 0, 4, 4]], "labels": [0], "masks": torch.zeros(1, 64, 48)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        decoder.prepare([image], [{"boxes": [[5, 5, 4, 4]], "labels": [0]}])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        decoder.prepare([np.zeros((4, 4, 3))])
    inputs = decoder.prepare([image], [{"boxes": [[0, 0, 4, 4]], "labels": [3]}])
    with pytest.raises(ValueError, match="outside the sample's groups"):
        decoder(torch.randn(1, 2, 4, LLM_WIDTH), torch.ones(1, 2, dtype=torch.bool), inputs)


def test_boxes_map_back_to_original_pixels():
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.1, 0.2]])
    expected = torch.tensor([[0.0, 0.0, 200.0, 100.0], [40.0, 40.0, 60.0, 60.0]])
    torch.testing.assert_close(boxes_to_original(boxes, (100, 200)), expected)


def test_masks_map_back_through_resize_and_padding():
    """A 64x128 resized image (original 50x100) in a 128x128 canvas; logits at stride 4."""
    logits = torch.full((1, 32, 32), -10.0)
    logits[0, 4:8, 8:16] = 10.0  # canvas pixels x 32..64, y 16..32 -> original x 25..50, y 12.5..25
    logits[0, 20:30, :] = 10.0  # padding rows (y >= 64 on the canvas): must not show up
    mask = masks_to_original(logits, (128, 128), (64, 128), (50, 100))[0]
    expected = torch.zeros(50, 100, dtype=torch.bool)
    expected[13:25, 25:50] = True
    assert mask.shape == (50, 100)
    assert mask_iou(mask, expected) > 0.85
    assert not mask[30:].any()


def test_load_pretrained_reads_transformers_weights(tmp_path):
    config = tiny_decoder_config("gdino")
    hf_config = build_hf_config(config)
    hf_config.text_config = BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64)
    torch.manual_seed(3)
    GroundingDinoForObjectDetection(hf_config).save_pretrained(tmp_path)
    reference = GroundingDinoForObjectDetection.from_pretrained(tmp_path, local_files_only=True)
    decoder = GroundingDinoDecoder(config, LLM_WIDTH)
    report = decoder.load_pretrained(str(tmp_path))
    assert any(key.startswith("model.text_backbone.") for key in report["ignored"])
    assert all(key.startswith(("model.text_", "model.backbone.conv_encoder.model.swin.layernorm."))
               for key in report["ignored"])
    assert all(key.startswith(("patch2query.", "mask_embed.", "pixel_decoder.", "model.backbone"))
               for key in report["missing"])
    ours = decoder.state_dict()
    for key, value in reference.state_dict().items():
        if key not in report["ignored"]:
            torch.testing.assert_close(ours[key], value, msg=key)
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        decoder.load_pretrained(str(missing))


RECONSTRUCTED_SWIN_NAMES = [  # transformers 4.x Swin names (as the release used) <- this decoder's names
    ("attention.self.query", "attention.q_proj"),
    ("attention.self.key", "attention.k_proj"),
    ("attention.self.value", "attention.v_proj"),
    ("attention.self.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
    ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
]
# The ``gdino.model.`` submodules of the release, as listed in reference/visionllmv2-official.md section 7 (a source
# independent of our rename table).
REFERENCE_GDINO_MODEL_PARTS = {
    "backbone", "input_proj_vision", "mask_features", "lateral_convs", "output_convs", "query_position_embeddings",
    "mask_embed", "encoder", "decoder", "level_embed", "enc_output", "enc_output_norm", "encoder_output_bbox_embed"}


def reconstructed_official_keys(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tiny decoder's tensors (+1) under official names rebuilt by inverting our own renames, plus the official
    encoder-stage ``model.mask_embed`` and a Swin ``relative_position_index`` buffer (keys without ``gdino.``)."""
    official = {}
    for key, value in ours.items():
        key = key.replace("pixel_decoder.", "model.", 1).replace("conv_encoder.model.swin.", "conv_encoder.model.")
        for old, new in RECONSTRUCTED_SWIN_NAMES:
            key = key.replace(new, old) if "conv_encoder" in key else key
        official[key] = value + 1
    official["model.mask_embed.layers.0.weight"] = torch.zeros(1)
    return official


def test_official_state_dict_converts_and_loads_strictly():
    """The one converter (``vllm2.convert``'s table, gdino rows from ``decoders.gdino.convert``) maps reconstructed
    official keys onto the decoder, which then loads them strictly."""
    decoder = GroundingDinoDecoder(tiny_decoder_config("gdino"), LLM_WIDTH)
    ours = {key: value.clone() for key, value in decoder.state_dict().items()}
    official = reconstructed_official_keys(ours)
    buffers = dict(decoder.named_buffers())
    index = "model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self.relative_position_index"
    official[index] = buffers[index.replace("conv_encoder.model.", "conv_encoder.model.swin.").replace(
        "attention.self.", "attention.relative_position_bias.")].clone()
    assert "model.lateral_convs.0.norm.weight" in official
    assert "model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self.query.weight" in official
    assert {key.split(".")[1] for key in official if key.startswith("model.")} == REFERENCE_GDINO_MODEL_PARTS
    spec = TargetSpec.of(torch.nn.ModuleDict({"gdino": decoder}))
    result = convert_tensors((("gdino." + key, value) for key, value in official.items()), spec, torch.float32)
    assert not (result.unmapped or result.unexpected or result.errors or result.missing), result.errors[:3]
    assert result.not_convertible == ["gdino.model.mask_embed.layers.0.weight"]
    assert result.recomputed == ["gdino." + index]
    converted = {name[len("gdino."):]: result.tensors[canonical] for name, canonical in spec.canonical.items()}
    assert set(converted) == set(ours)
    decoder.load_state_dict(converted, strict=True)
    torch.testing.assert_close(decoder.pixel_decoder.mask_features.bias, ours["pixel_decoder.mask_features.bias"] + 1)


def test_registered_and_built_by_name():
    assert DECODERS["gdino"] is GroundingDinoDecoder
    decoder = build_decoder("gdino", tiny_decoder_config("gdino"), LLM_WIDTH)
    assert {name for name, _ in decoder.named_children()} >= {"model", "bbox_embed", "mask_embed", "patch2query"}
    assert decoder.patch2query.layers[0].in_features == LLM_WIDTH and len(decoder.patch2query.layers) == 3
