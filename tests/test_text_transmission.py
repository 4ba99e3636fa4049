"""Text transmission (the v1 baseline): location/class token round trips, malformed answers, the templates and
chat reading each other, and a tiny text-mode model that overfits a fixed batch, decodes its boxes and keypoints
back from its own tokens and scores them with the benchmark runners."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from superlink import TextLink
from vllm2 import VisionLLMv2Processor, build_model, load_config, shapes
from vllm2.bench.runner import evaluate, from_chat, routed_predictor
from vllm2.bench.tasks import build_task
from vllm2.chat import declared_classes, text_outputs
from vllm2.data import Collator
from vllm2.data.coco import CocoDataset, CocoKeypointDataset, RefCocoDataset
from vllm2.data.templates import Templates

OVERRIDES = ["superlink.transmission=text", "superlink.location_bins=33", "superlink.class_tokens=8",
             "vision.image_mode=resize", "vision.image_size=84"]
OVERFIT_STEPS = 150


def _tokens(text: str) -> list[str]:
    """Split a text made of location/class tokens and words into tokens (words whole)."""
    return re.findall(r"<[^>]+>|[^<\s]+", text)


@pytest.mark.parametrize("bins", [1025, 33])
def test_round_trip_within_one_bin(bins):
    link = TextLink(bins, 4)
    rng = np.random.default_rng(0)
    width, height = 96.0, 64.0
    xs, ys = np.sort(rng.uniform(0, width, (20, 2)), 1), np.sort(rng.uniform(0, height, (20, 2)), 1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)  # [20, 4]
    points = rng.uniform(0, 1, (20, 2)) * [width, height]
    text = "".join(link.cls(1) + link.box(b, width, height) + link.cls(2) + link.point(*p, width, height)
                   for b, p in zip(boxes, points))
    parsed = link.parse(_tokens(text), width, height)
    assert parsed.malformed == 0 and len(parsed.boxes) == 20
    half_bin = np.array([width, height]) / (bins - 1) / 2 + 1e-9  # rounding error of x and y
    for box, point, got in zip(boxes, points, parsed.boxes):
        assert got.label == 1 and set(got.points) == {2}
        assert np.all(np.abs(np.subtract(got.box, box)) <= np.tile(half_bin, 2))
        assert np.all(np.abs(np.subtract(got.points[2], point)) <= half_bin)
    assert link.loc(0, width) == f"<loc{-(bins - 1) // 2}>" and link.loc(width * 2, width) == f"<loc{(bins - 1) // 2}>"


def test_malformed_elements_are_skipped_and_counted():
    link = TextLink(9, 4)  # <loc-4> ... <loc4>
    good = "<c1><loc-4><loc-4><loc0><loc0>"
    answer = " and ".join([
        "<c0><loc-4><loc-4><loc0>",  # three locations
        good,
        "<c2><loc1><loc1>",  # a point of the box before it
        "<c2><loc2><loc2>",  # the same keypoint twice
        "<c3>",  # a class token without locations
        "<c0><loc2><loc0><loc1><loc4>",  # x2 < x1
        "<loc-4><loc-4><loc4><loc4><loc4>",  # five untagged locations
        "<c9><loc0><loc0>",  # no such class token: the two locations stand alone
        "<loc-4><loc-4><loc4><loc4>",  # an untagged box
        "words <c1> <loc0> end",  # one location after a class token
    ])
    parsed = link.parse(_tokens(answer), 80, 40)
    assert [(b.label, b.box) for b in parsed.boxes] == [(1, (0.0, 0.0, 40.0, 20.0)), (None, (0.0, 0.0, 80.0, 40.0))]
    assert parsed.boxes[0].points == {2: (50.0, 25.0)}
    assert parsed.malformed == 7
    points_first = link.parse(_tokens("<c2><loc0><loc0>" + good), 80, 40)
    assert points_first.malformed == 1 and len(points_first.boxes) == 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.write_dataset(root, n=2, seed=0)
    return root


@pytest.fixture(scope="module")
def text_cfg():
    return load_config("tiny", OVERRIDES)


@pytest.fixture(scope="module")
def text_processor(text_cfg):
    return VisionLLMv2Processor.from_config(text_cfg)


def _readers(world, templates: Templates, mode: str):
    return {"det": CocoDataset(world / "instances.json", templates=templates, mode=mode, task="det"),
            "rec": RefCocoDataset(world / "refcoco.jsonl", templates=templates, mode=mode, task="rec"),
            "pose": CocoKeypointDataset(world / "keypoints.json", templates=templates, mode=mode)}


def test_tokenizer_holds_each_token_once(text_processor, tiny_processor):
    tok, link = text_processor.tokenizer, text_processor.text_link
    assert len(tok) == len(tiny_processor.tokenizer) + 33 + 8
    ids = [tok.encode(t, add_special_tokens=False) for t in link.tokens]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids)
    assert tiny_processor.tokenizer.convert_tokens_to_ids("[DET]") == tok.convert_tokens_to_ids("[DET]")


def test_processor_round_trip_keeps_the_text_link(text_processor, tmp_path):
    text_processor.save_pretrained(tmp_path)
    loaded = VisionLLMv2Processor.from_pretrained(tmp_path)
    assert loaded.text_link == text_processor.text_link
    assert loaded.tokenizer.get_vocab() == text_processor.tokenizer.get_vocab()


def test_templates_write_what_chat_reads_back(world, text_processor):
    """The gold answers of det, rec and pose, tokenised, parse back to their targets within one bin, under the
    routes and decoders the benchmark expects."""
    link, routes = text_processor.text_link, text_processor.routes
    templates = Templates(routes, text=link)
    for task, reader in _readers(world, templates, "teacher_forced").items():
        sample = reader[0]
        assert sample.in_text
        (_, question), (_, answer) = sample.turns
        assert not set(routes.route_tokens) & set(_tokens(answer))
        width, height = sample.images[0].size
        tokens = text_processor.tokenizer.convert_ids_to_tokens(
            text_processor.tokenizer.encode(answer, add_special_tokens=False))
        parsed = link.parse(tokens, width, height)
        (out,), group_routes = text_outputs(parsed, declared_classes(question), link, routes)
        target = sample.targets[out.decoder]
        bench = build_task(task).bind(routes)
        assert out.decoder == bench.decoder() and set(group_routes) == set(bench.expected_routes())
        order = np.lexsort((target["boxes"][:, 0], target["boxes"][:, 1], target["labels"]))
        tol = max(width, height) / (link.location_bins - 1)
        np.testing.assert_allclose(out.result["boxes"].numpy(), target["boxes"][order], atol=tol)
        if task == "det":
            assert out.phrases == reader.names
            assert out.result["labels"].tolist() == target["labels"][order].tolist()
        if task == "pose":
            _, name, keypoint_names = reader.skeletons[0]
            assert out.phrases == [name, *keypoint_names]
            np.testing.assert_allclose(out.result["keypoints"][..., :2].numpy(),
                                       target["keypoints"][order][..., :2], atol=tol)


def test_collator_keeps_text_targets_from_decoders(world, text_processor):
    templates = Templates(text_processor.routes, text=text_processor.text_link)
    readers = _readers(world, templates, "train")
    batch = Collator(text_processor, templates=templates)([readers["det"][0], readers["pose"][1]])
    assert batch["decoder_inputs"] == {}
    loc_ids = torch.tensor(text_processor.tokenizer.convert_tokens_to_ids(list(text_processor.text_link.tokens)))
    assert torch.isin(batch["labels"], loc_ids).sum(1).min() >= 5  # every answer's tokens are trained


@pytest.fixture(scope="module")
def overfit(world, text_cfg, text_processor):
    """A tiny text-mode model trained by cross-entropy alone on the gold answers of two scenes (det) and two
    figure images (pose)."""
    torch.manual_seed(0)
    model = build_model(text_cfg)
    templates = Templates(text_processor.routes, text=text_processor.text_link)
    readers = _readers(world, templates, "teacher_forced")
    samples = [readers["det"][0], readers["det"][1], readers["pose"][0], readers["pose"][1]]
    batch = Collator(text_processor, templates=templates)(samples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(OVERFIT_STEPS):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_overfit_loss_falls(overfit):
    _, losses = overfit
    assert losses[-1] < 0.05 * losses[0]


@pytest.mark.parametrize("task,metric", [("det", ("bbox", "AP50")), ("pose", ("keypoints", "AP50"))])
def test_overfit_model_decodes_the_right_boxes(world, overfit, text_processor, task, metric):
    """Routed benchmark on the training images: the model writes its own tokens, chat reads them back."""
    model, _ = overfit
    templates = Templates(text_processor.routes, text=text_processor.text_link)
    bench = build_task(task).bind(text_processor.routes)
    dataset = bench.build_dataset(world / {"det": "instances.json", "pose": "keypoints.json"}[task], None,
                                  templates, "question")
    summary = evaluate(bench, dataset, routed_predictor(model, text_processor, max_new_tokens=160), batch_size=2)
    value = summary["metrics"]
    for key in metric:
        value = value[key]
    assert summary["routing_accuracy"] == 1.0
    assert value >= 0.99


def test_chat_counts_malformed_answers_without_failing(world, overfit, text_processor):
    model, _ = overfit
    image = CocoDataset(world / "instances.json", mode="question", task="det",
                        templates=Templates(text_processor.routes, text=text_processor.text_link))[0].images[0]
    forced = text_processor.tokenizer.convert_tokens_to_ids(["<c0>", "<loc0>", "<loc1>", "<loc2>"])
    eos = text_processor.tokenizer.eos_token_id

    def three_locations_then_stop(sampled, scores):  # an answer with a box that lacks its last location
        step = sampled.shape[1]
        scores[:] = -1e9
        scores[:, forced[step] if step < len(forced) else eos] = 0
        return scores

    (result,) = model.chat(text_processor, [image], ["Find all shapes."], max_new_tokens=8,
                           logits_processor=three_locations_then_stop)
    assert result.text.startswith("<c0><loc0><loc1><loc2>")
    assert result.malformed == 1 and result.outputs == [] and result.routes == []
    assert from_chat(result, text_processor.routes).routes == []
