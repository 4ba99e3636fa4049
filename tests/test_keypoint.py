"""Keypoint decoder: preprocessing, OKS against pycocotools, mixed skeletons, batching, gradients and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from decoders.base import build_decoder
from decoders.keypoint import (
    COCO_SIGMAS,
    KeypointDecoder,
    KeypointDecoderConfig,
    keypoint_oks,
    normalized_keypoint_oks,
    oks_sigmas,
    to_coco_keypoints,
)
from decoders.keypoint.criterion import LOSS_NAMES
from tiny_sizes import tiny_decoder_config

DET, POSE, C_LLM, K = 11, 12, 32, 4


@pytest.fixture(autouse=True)
def _seed_and_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def make_decoder(**overrides) -> KeypointDecoder:
    cfg = tiny_decoder_config("keypoint")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    decoder = build_decoder("keypoint", cfg, C_LLM)
    decoder.set_route_ids([DET], [POSE])
    return decoder


def random_target(gen: torch.Generator, width: int, height: int, n: int, kp: int, num_classes: int) -> dict:
    """``n`` instances with boxes inside the image and keypoints inside their boxes (some unlabelled)."""
    xy0 = torch.rand(n, 2, generator=gen) * torch.tensor([width / 2, height / 2])
    wh = (0.2 + 0.3 * torch.rand(n, 2, generator=gen)) * torch.tensor([width, height])
    boxes = torch.cat([xy0, xy0 + wh], 1)  # [n, 4]
    xy = xy0[:, None] + torch.rand(n, kp, 2, generator=gen) * wh[:, None]  # [n, kp, 2]
    v = torch.randint(0, 3, (n, kp, 1), generator=gen).float()
    v[:, :1] = 2
    return {
        "boxes": boxes,
        "labels": torch.randint(0, num_classes, (n,), generator=gen),
        "keypoints": torch.cat([xy, v], -1),
    }


def pose_batch(layout: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, mask and route ids for samples with (object groups, keypoint groups), objects first."""
    g = max(o + k for o, k in layout)
    route = torch.full((len(layout), g), -1, dtype=torch.long)
    for i, (o, k) in enumerate(layout):
        route[i, :o], route[i, o : o + k] = DET, POSE
    return torch.randn(len(layout), g, K, C_LLM), route >= 0, route


# ------------------------------------------------------------------------------------------------------------------
# preprocessing


def test_prepare_resizes_keeping_aspect_pads_and_normalises_targets():
    decoder = make_decoder()
    images = [Image.new("RGB", (200, 100), (255, 0, 0)), Image.new("RGB", (90, 120), (0, 0, 255))]
    target = {
        "boxes": torch.tensor([[20.0, 10.0, 120.0, 90.0]]),
        "labels": torch.tensor([0]),
        "keypoints": torch.tensor([[[50.0, 25.0, 2.0], [100.0, 75.0, 0.0]]]),
    }
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "keypoints": torch.zeros(0, 3, 3)}
    inputs = decoder.prepare(images, [target, empty])

    assert inputs["pixel_values"].shape == (2, 3, 128, 128)
    assert inputs["orig_sizes"].tolist() == [[100, 200], [120, 90]]
    assert inputs["image_sizes"].tolist() == [[64, 128], [128, 96]]  # short side 128, long side <= 128
    mask = inputs["pixel_mask"]
    assert mask[0, :64, :128].all() and not mask[0, 64:].any()
    assert mask[1, :, :96].all() and not mask[1, :, 96:].any()
    # real red pixels normalised with ImageNet statistics; padding stays zero
    assert inputs["pixel_values"][0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)
    assert (inputs["pixel_values"][0, :, 64:] == 0).all()

    t = inputs["targets"]
    torch.testing.assert_close(t["boxes"][0, 0], torch.tensor([0.35, 0.5, 0.5, 0.8]))
    torch.testing.assert_close(t["keypoints"][0, 0, :2], torch.tensor([[0.25, 0.25, 2.0], [0.5, 0.75, 0.0]]))
    assert t["areas"][0, 0] == pytest.approx(100 * 80)
    assert t["instance_mask"].tolist() == [[True], [False]]
    assert t["num_keypoints"].tolist() == [2, 3]


def test_prepare_rejects_malformed_targets():
    decoder = make_decoder()
    image = [Image.new("RGB", (64, 64))]
    good = {"boxes": torch.zeros(1, 4), "labels": torch.zeros(1, dtype=torch.long), "keypoints": torch.zeros(1, 5, 3)}
    with pytest.raises(KeyError, match="keypoints"):
        decoder.prepare(image, [{k: v for k, v in good.items() if k != "keypoints"}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['keypoints'\]"):
        decoder.prepare(image, [{**good, "keypoints": torch.zeros(1, 5, 2)}])
    with pytest.raises(ValueError, match="visibility"):
        decoder.prepare(image, [{**good, "keypoints": torch.full((1, 5, 3), 3.0)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        decoder.prepare(image, [{**good, "boxes": torch.zeros(2, 4)}])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        decoder.prepare([np.zeros((8, 8, 3))])


def test_oks_sigmas_per_dataset_coco_and_uniform():
    assert torch.equal(oks_sigmas(17), torch.tensor(COCO_SIGMAS))
    assert torch.equal(oks_sigmas(5, uniform_sigma=0.07), torch.full((5,), 0.07))
    assert torch.equal(oks_sigmas(3, "fly", {"fly": [0.1, 0.2, 0.3]}), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(oks_sigmas(17, "other", {"fly": [0.1]}), torch.tensor(COCO_SIGMAS))
    with pytest.raises(ValueError, match="oks_sigmas"):
        oks_sigmas(4, "fly", {"fly": [0.1, 0.2, 0.3]})


# ------------------------------------------------------------------------------------------------------------------
# OKS against pycocotools


@pytest.mark.parametrize("num_keypoints", [17, 5])
def test_oks_equals_pycocotools_compute_oks(num_keypoints: int):
    rng = np.random.default_rng(num_keypoints)
    sigmas = np.array(COCO_SIGMAS) if num_keypoints == 17 else rng.uniform(0.02, 0.1, num_keypoints)
    width, height = 320, 240
    gts = []
    for i in range(3):
        x0, y0 = rng.uniform(0, 150), rng.uniform(0, 100)
        w, h = rng.uniform(30, 150), rng.uniform(30, 130)
        kpts = np.stack([x0 + rng.uniform(0, w, num_keypoints), y0 + rng.uniform(0, h, num_keypoints),
                         rng.integers(0, 3, num_keypoints)], -1)
        if i == 0:
            kpts[:, 2] = 2  # every keypoint labelled
        if i == 2:
            kpts[:, 2] = 0  # nothing labelled: pycocotools measures distances to the enlarged box
        gts.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [x0, y0, w, h],
                    "area": float(w * h * 0.7), "keypoints": kpts.flatten().tolist(),
                    "num_keypoints": int((kpts[:, 2] > 0).sum())})
    dets = []
    for j in range(5):
        ref = np.array(gts[j % 3]["keypoints"]).reshape(-1, 3)
        xy = ref[:, :2] + rng.normal(0, 3 + 25 * (j // 3), (num_keypoints, 2))
        dets.append({"image_id": 1, "category_id": 1, "score": float(1 - 0.1 * j),
                     "keypoints": np.concatenate([xy, np.ones((num_keypoints, 1))], -1).flatten().tolist()})

    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": width, "height": height}], "annotations": gts,
                    "categories": [{"id": 1, "name": "thing", "keypoints": [str(k) for k in range(num_keypoints)]}]}
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(dets), "keypoints")
    evaluator.params.kpt_oks_sigmas = sigmas
    evaluator._prepare()
    expected = torch.from_numpy(np.asarray(evaluator.computeOks(1, 1)))  # [D, G], detections by score

    pred = torch.tensor([d["keypoints"] for d in dets], dtype=torch.float64).view(5, num_keypoints, 3)[..., :2]
    gt = torch.tensor([g["keypoints"] for g in gts], dtype=torch.float64).view(3, num_keypoints, 3)
    areas = torch.tensor([g["area"] for g in gts], dtype=torch.float64)
    boxes = torch.tensor([g["bbox"] for g in gts], dtype=torch.float64)
    sig = torch.from_numpy(sigmas)
    ours = keypoint_oks(pred[:, None], gt[None], areas[None], sig, boxes[None])  # [D, G]
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert 0 < expected.min() < 0.5 < expected.max()  # the data covers near and far predictions

    # the loss computes OKS from normalised coordinates scaled back to pixels: same numbers
    size = torch.tensor([width, height], dtype=torch.float64)
    gt_norm = torch.cat([gt[..., :2] / size, gt[..., 2:]], -1)
    cxcywh = torch.cat([boxes[:, :2] + boxes[:, 2:] / 2, boxes[:, 2:]], -1) / size.repeat(2)
    mask = torch.ones(num_keypoints, dtype=torch.bool)
    normalised = normalized_keypoint_oks(pred[:, None] / size, gt_norm[None], areas[None], sig, cxcywh[None], mask,
                                         size)
    torch.testing.assert_close(normalised, expected, rtol=1e-9, atol=1e-12)


def test_coco_keypoint_format_is_interleaved():
    kpts = torch.tensor([[[1.0, 2.0, 0.9], [3.0, 4.0, 0.1]]])
    assert to_coco_keypoints(kpts) == [[1.0, 2.0, pytest.approx(0.9), 3.0, 4.0, pytest.approx(0.1)]]


# ------------------------------------------------------------------------------------------------------------------
# model


def test_skeletons_of_5_17_and_68_keypoints_in_one_batch():
    decoder = make_decoder(oks_sigmas={"face68": [0.02] * 68})
    gen = torch.Generator().manual_seed(1)
    layout = [(1, 5), (2, 17), (1, 68)]
    images = [Image.new("RGB", (120, 96), (i * 60, 80, 40)) for i in range(3)]
    targets = [random_target(gen, 120, 96, n, kp, o) for n, (o, kp) in zip((2, 1, 3), layout)]
    targets[2]["dataset"] = "face68"
    inputs = decoder.prepare(images, targets)
    sigmas = inputs["targets"]["sigmas"]
    assert torch.equal(sigmas[0, :5], torch.full((5,), 0.05))
    assert torch.equal(sigmas[1, :17], torch.tensor(COCO_SIGMAS))
    assert torch.equal(sigmas[2], torch.full((68,), 0.02))

    queries, mask, route = pose_batch(layout)
    out = decoder(queries, mask, inputs, route)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert set(out.loss_dict) == set(LOSS_NAMES) and all(v > 0 for v in out.loss_dict.values())
    cfg = decoder.config
    assert len(out.preds.layers) == 1 + cfg.num_decoder_layers
    final = out.preds.layers[-1]
    assert final.keypoints.shape == (3, cfg.num_pose_queries, 68, 2)
    assert final.visibility_logits.shape == (3, cfg.num_pose_queries, 68)
    assert final.logits.shape == (3, cfg.num_pose_queries, 2)
    assert out.preds.groups.keypoint_mask.sum(1).tolist() == [5, 17, 68]
    out.loss.backward()
    unused = [name for name, p in decoder.named_parameters() if p.grad is None]
    assert not unused  # every parameter takes part (DDP / ZeRO without find_unused_parameters)

    decoder.eval()
    results = decoder.predict(queries, mask, inputs, route, top_k=4)
    for result, (groups, kp) in zip(results, layout):
        assert result["keypoints"].shape == (4, kp, 3)
        assert result["boxes"].shape == (4, 4) and result["scores"].shape == (4,)
        assert (result["labels"] < groups).all()
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        xy, vis = result["keypoints"][..., :2], result["keypoints"][..., 2]
        assert (xy >= 0).all() and (xy[..., 0] <= 120).all() and (xy[..., 1] <= 96).all()
        assert ((vis >= 0) & (vis <= 1)).all()


def test_batched_predictions_equal_per_sample_predictions():
    decoder = make_decoder().eval()
    layout = [(1, 5), (2, 17), (1, 68)]
    images = [Image.new("RGB", (128, 128), (i * 70, 120 - i * 40, 30)) for i in range(3)]
    queries, mask, route = pose_batch(layout)
    batched = decoder.predict(queries, mask, decoder.prepare(images), route, top_k=5)
    for i, (o, kp) in enumerate(layout):
        g = o + kp
        alone = decoder.predict(queries[i : i + 1, :g], mask[i : i + 1, :g], decoder.prepare(images[i : i + 1]),
                                route[i : i + 1, :g], top_k=5)[0]
        for key in ("boxes", "scores", "keypoints"):
            torch.testing.assert_close(batched[i][key], alone[key], atol=1e-4, rtol=1e-4)
        assert torch.equal(batched[i]["labels"], alone["labels"])


def test_group_order_is_free_and_keypoints_keep_prompt_order():
    """Object and keypoint groups may interleave; keypoint embeddings follow their [POSE] order."""
    decoder = make_decoder()
    queries = torch.randn(1, 5, K, C_LLM)
    route = torch.tensor([[POSE, DET, POSE, DET, POSE]])
    groups = decoder.split_groups(queries, route >= 0, route)
    ordered = decoder.split_groups(queries[:, [1, 3, 0, 2, 4]], route >= 0, route[:, [1, 3, 0, 2, 4]])
    torch.testing.assert_close(groups.keypoint_features, ordered.keypoint_features)
    torch.testing.assert_close(groups.class_features, ordered.class_features)
    expected = decoder.projection_kpt_llava(queries[0, [0, 2, 4]]).mean(1)
    torch.testing.assert_close(groups.keypoint_features[0], expected)


def test_gradients_reach_queries_through_object_and_keypoint_groups():
    decoder = make_decoder()
    gen = torch.Generator().manual_seed(2)
    images = [Image.new("RGB", (100, 80), (200, 30, 30)), Image.new("RGB", (80, 100), (30, 30, 200))]
    layout = [(2, 5), (1, 3)]
    targets = [random_target(gen, *img.size, 2, kp, o) for img, (o, kp) in zip(images, layout)]
    queries, mask, route = pose_batch(layout)
    queries = torch.nn.Parameter(queries)
    inputs = decoder.prepare(images, targets)
    out = decoder(queries, mask, inputs, route)

    out.loss_dict["loss_class"].backward(retain_graph=True)
    class_grad = queries.grad.abs().sum((2, 3))  # [B, G]
    assert (class_grad[route == DET] > 0).all()  # object groups: pose-prompt [DET] table

    queries.grad = None
    out.loss.backward()
    grad = queries.grad.abs().sum((2, 3))
    assert (grad[mask] > 0).all() and (grad[~mask] == 0).all()

    # the keypoint heads start at zero (DETR-style); after one update the keypoint loss alone reaches [POSE] groups
    torch.optim.AdamW(decoder.parameters(), lr=1e-3).step()
    queries.grad = None
    decoder(queries, mask, inputs, route).loss_dict["loss_keypoint"].backward()
    keypoint_grad = queries.grad.abs().sum((2, 3))
    assert (keypoint_grad[route == POSE] > 0).all()  # keypoint groups: [POSE] table


def test_batches_with_only_object_or_only_keypoint_groups_run():
    decoder = make_decoder()
    images = [Image.new("RGB", (64, 64))] * 2
    queries = torch.randn(2, 2, K, C_LLM)
    none = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}

    route = torch.tensor([[DET, DET], [DET, -1]])  # boxes and classes only
    targets = [random_target(torch.Generator().manual_seed(4), 64, 64, 1, 0, 2),
               {**none, "keypoints": torch.zeros(0, 0, 3)}]
    out = decoder(queries, route >= 0, decoder.prepare(images, targets), route)
    assert out.loss > 0 and out.loss_dict["loss_keypoint"] == 0
    results = decoder.predict(queries, route >= 0, decoder.prepare(images), route, top_k=3)
    assert [tuple(r["keypoints"].shape) for r in results] == [(3, 0, 3), (3, 0, 3)]

    route = torch.tensor([[POSE, POSE], [POSE, -1]])  # no object class: nothing to report
    targets = [{**none, "keypoints": torch.zeros(0, 2, 3)}, {**none, "keypoints": torch.zeros(0, 1, 3)}]
    out = decoder(queries, route >= 0, decoder.prepare(images, targets), route)
    assert torch.isfinite(out.loss)
    results = decoder.predict(queries, route >= 0, decoder.prepare(images), route)
    assert [tuple(r["keypoints"].shape) for r in results] == [(0, 2, 3), (0, 1, 3)]


def test_bad_inputs_raise_clear_errors():
    decoder = make_decoder()
    image = [Image.new("RGB", (64, 64))]
    queries, mask, route = pose_batch([(1, 3)])
    target = [random_target(torch.Generator().manual_seed(3), 64, 64, 1, 3, 1)]
    with pytest.raises(ValueError, match="route_ids"):
        decoder(queries, mask, decoder.prepare(image, target), torch.full_like(route, 99))
    with pytest.raises(ValueError, match="route_ids"):
        decoder(queries, mask, decoder.prepare(image, target), None)
    with pytest.raises(ValueError, match=r"targets\[0\]\['keypoints'\] has 4 keypoints"):
        wrong = [random_target(torch.Generator().manual_seed(3), 64, 64, 1, 4, 1)]
        decoder(queries, mask, decoder.prepare(image, wrong), route)
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]"):
        decoder(queries, mask, decoder.prepare(image, [{**target[0], "labels": torch.tensor([1])}]), route)
    with pytest.raises(ValueError, match="max_keypoints"):
        make_decoder(max_keypoints=2)(queries, mask, decoder.prepare(image), route)
    fresh = build_decoder("keypoint", tiny_decoder_config("keypoint"), C_LLM)
    with pytest.raises(RuntimeError, match="set_route_ids"):
        fresh(queries, mask, fresh.prepare(image), route)
    missing = tiny_decoder_config("keypoint", backbone_pretrained="/no-such-backbone")
    with pytest.raises(FileNotFoundError, match="no-such-backbone"):
        KeypointDecoder(missing, C_LLM).load_pretrained()
    with pytest.raises(ValueError, match="num_box_decoder_layers"):
        KeypointDecoderConfig(num_box_decoder_layers=6)


def test_oks_and_keypoint_terms_scale_with_their_own_weights():
    """The official UniPose weights its OKS term with the keypoint-L1 coefficient; here changing one weight scales
    its own term alone (matching uses the cost_* weights, so the same pairs are compared)."""
    decoder = make_decoder()
    image = [Image.new("RGB", (64, 64))]
    queries, mask, route = pose_batch([(1, 3)])
    inputs = decoder.prepare(image, [random_target(torch.Generator().manual_seed(3), 64, 64, 2, 3, 1)])

    def terms() -> tuple[float, float]:
        torch.manual_seed(0)
        with torch.no_grad():
            losses = decoder(queries, mask, inputs, route).loss_dict
        return float(losses["loss_keypoint"]), float(losses["loss_oks"])

    cfg = decoder.criterion.cfg
    cfg.loss_keypoint, cfg.loss_oks = 1.0, 1.0
    keypoint, oks = terms()
    assert keypoint > 0 and oks > 0
    cfg.loss_oks = 3.0
    assert terms() == pytest.approx((keypoint, 3 * oks))
    cfg.loss_keypoint, cfg.loss_oks = 5.0, 1.0
    assert terms() == pytest.approx((5 * keypoint, oks))


def test_default_config_is_the_official_7b_shape():
    cfg = KeypointDecoderConfig()
    assert (cfg.backbone_type, cfg.d_model, cfg.num_queries, cfg.num_decoder_layers) == ("swin", 256, 900, 6)
    assert (cfg.num_pose_queries, cfg.max_keypoints, cfg.num_feature_levels) == (50, 68, 4)
    assert (cfg.loss_keypoint, cfg.loss_oks) == (10.0, 4.0)  # the official kpt L1 10 and OKS 4 (not its bug's 10)
    decoder = KeypointDecoder(cfg, 4096)
    assert list(decoder.backbone.channels) == [192, 384, 768]  # Swin-T stages 2-4
    assert [tuple(l.weight.shape) for l in decoder.projection_llava.layers] == [(256, 4096), (256, 256), (256, 256)]
    assert decoder.tgt_embed.weight.shape == (900, 256)
    assert len(decoder.encoder_layers) == 6 and len(decoder.decoder_layers) == 6
