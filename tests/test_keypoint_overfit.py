"""The tiny keypoint decoder overfits a fixed batch of synthetic stick figures driven by learnable query states."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

from decoders.base import build_decoder
from decoders.keypoint import to_coco_results
from tiny_sizes import tiny_decoder_config

DET, POSE, C_LLM, K = 11, 12, 48, 4
WIDTH, HEIGHT = 160, 128
STEPS, LR, WARMUP = 120, 2e-3, 10


def stick_figure(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> list:
    """Draw a five-keypoint figure (head, hands, feet joined to the body centre); returns its keypoints."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    points = [(cx, y0 + 4), (x0 + 2, cy - 4), (x1 - 2, cy - 4), (x0 + 6, y1 - 2), (x1 - 6, y1 - 2)]
    for x, y in points:
        draw.line([(cx, cy), (x, y)], fill=color, width=3)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    return [[x, y, 2.0] for x, y in points]


def synthetic_batch() -> tuple[list[Image.Image], list[dict]]:
    """Two images with two figures each; class 0 is red, class 1 blue (image 0: two red, image 1: red + blue)."""
    rng = random.Random(0)
    images, targets = [], []
    for labels in ([0, 0], [0, 1]):
        image = Image.new("RGB", (WIDTH, HEIGHT), (30, 30, 30))
        draw = ImageDraw.Draw(image)
        boxes, keypoints = [], []
        for j, label in enumerate(labels):
            w, h = rng.randint(40, 60), rng.randint(50, 90)
            x0, y0 = rng.randint(5 + 80 * j, 75 + 80 * j - w), rng.randint(5, HEIGHT - h - 5)
            box = (x0, y0, x0 + w, y0 + h)
            keypoints.append(stick_figure(draw, box, (230, 40, 40) if label == 0 else (40, 90, 230)))
            boxes.append(box)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "keypoints": torch.tensor(keypoints)})
    return images, targets


def coco_keypoint_ap(results: list[dict], targets: list[dict], sigma: float) -> float:
    """COCO keypoint AP of ``results`` on the training targets (pycocotools)."""
    annotations = []
    for image_id, target in enumerate(targets):
        for box, label, kpts in zip(target["boxes"].tolist(), target["labels"].tolist(), target["keypoints"]):
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "iscrowd": 0, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "keypoints": kpts.flatten().tolist(), "num_keypoints": len(kpts)})
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": WIDTH, "height": HEIGHT} for i in range(len(targets))],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}", "keypoints": list("abcde")} for c in (1, 2)],
    }
    coco.createIndex()
    records = [r for i, result in enumerate(results) for r in to_coco_results(result, i, [1, 2])]
    evaluator = COCOeval(coco, coco.loadRes(records), "keypoints")
    evaluator.params.kpt_oks_sigmas = np.full(5, sigma)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[0])


def test_overfits_a_fixed_batch_and_localises_every_keypoint():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decoder = build_decoder("keypoint", tiny_decoder_config("keypoint"), C_LLM)
        decoder.set_route_ids([DET], [POSE])
        images, targets = synthetic_batch()
        inputs = decoder.prepare(images, targets)
        # sample 0 prompts objects first; sample 1 puts its [DET] groups after the keypoints
        route = torch.tensor([[DET, DET, POSE, POSE, POSE, POSE, POSE], [POSE, POSE, POSE, POSE, POSE, DET, DET]])
        mask = torch.ones_like(route, dtype=torch.bool)
        queries = torch.nn.Parameter(torch.randn(2, 7, K, C_LLM))  # stands for the LLM states of [DET]/[POSE]

        params = list(decoder.parameters()) + [queries]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * s / STEPS))
        )
        losses = []
        for _ in range(STEPS):
            loss = decoder(queries, mask, inputs, route).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        assert np.mean(losses[-5:]) <= 0.2 * np.mean(losses[:3]), losses

        decoder.eval()
        results = decoder.predict(queries, mask, inputs, route, top_k=2)
    finally:
        torch.set_num_threads(threads)

    tolerance = 0.05 * min(WIDTH, HEIGHT)
    for result, target in zip(results, targets):
        # worst keypoint distance of every (prediction, target) pair, then the best one-to-one assignment
        distance = (result["keypoints"][:, None, :, :2] - target["keypoints"][None, :, :, :2]).norm(dim=-1)
        worst = distance.max(-1).values  # [2 predictions, 2 targets]
        rows, cols = linear_sum_assignment(worst.numpy())
        assert (worst[rows, cols] < tolerance).all(), worst
        assert torch.equal(result["labels"][rows], target["labels"][cols])
        assert result["keypoints"].shape == (2, 5, 3)
        assert (result["keypoints"][..., 2] > 0.5).all()  # every keypoint is labelled: visibility learnt
    assert coco_keypoint_ap(results, targets, sigma=0.05) > 0.9
