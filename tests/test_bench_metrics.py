"""Benchmark metrics: COCO AP equals pycocotools called directly; hand-computed VQA / CIDEr / BLEU / REC / RES / PCK /
semantic segmentation (mIoU, pixel accuracy); CLIP metrics equal a direct computation on a tiny open_clip model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import make_image
from vllm2.bench import (
    bleu,
    cider_d,
    clip_directional_similarity,
    clip_image_similarity,
    clip_score,
    clip_text_similarity,
    coco_eval,
    coco_gt_from_targets,
    detections_to_coco,
    edit_metrics,
    keypoint_sigmas,
    keypoints_to_coco,
    load_clip_scorer,
    match_instances,
    normalize_vqa_answer,
    pck,
    rec_accuracy,
    res_iou,
    vqa_accuracy,
    vqa_score,
)
from vllm2.bench.metrics_coco import COCO_KEYPOINT_NAMES, COCO_KEYPOINT_SIGMAS, UNIFORM_KEYPOINT_SIGMA
from vllm2.bench.metrics_semseg import label_map_from_masks, semseg_counts, semseg_metrics

REPO = Path(__file__).resolve().parent.parent
H, W = 48, 64
CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


def _direct(gt: dict, records: list[dict], iou_type: str, sigmas=None, image_ids=None) -> np.ndarray:
    """pycocotools' stats, called directly."""
    coco_gt = COCO()
    coco_gt.dataset = json.loads(json.dumps(gt))
    coco_gt.createIndex()
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(records), iou_type)
    if image_ids is not None:
        evaluator.params.imgIds = image_ids
    if sigmas is not None:
        evaluator.params.kpt_oks_sigmas = np.asarray(sigmas)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def _box_mask(x: float, y: float, w: float, h: float) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[int(y) : int(y + h), int(x) : int(x + w)] = True
    return mask


def _detection_case(rng: np.random.Generator):
    """GT boxes on 3 images and partially correct predictions, as COCO records and as decoder outputs.

    The prompt of each image lists the categories in its own order, so labels (group indices) differ from ids.
    """
    prompts = {1: [3, 7], 2: [7, 3], 3: [7]}
    images = [{"id": i, "width": W, "height": H} for i in prompts]
    anns, records, preds = [], [], {}
    for image_id, prompt in prompts.items():
        boxes, scores, labels, masks = [], [], [], []
        for _ in range(3):
            cat = int(rng.choice(prompt))
            x, y = float(rng.integers(0, W - 24)), float(rng.integers(0, H - 20))
            w, h = float(rng.integers(8, 24)), float(rng.integers(8, 20))
            gt_mask = _box_mask(x, y, w, h)
            rle = mask_utils.encode(np.asfortranarray(gt_mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": float(gt_mask.sum()), "iscrowd": 0, "segmentation": rle})
            # a prediction shifted by 0..3 pixels: some are AP75 hits, some only AP50, some misses
            dx, dy = rng.integers(0, 4, size=2).astype(float)
            px, py = x + dx, y + dy
            boxes.append([px, py, px + w, py + h])
            scores.append(float(rng.uniform(0.3, 1.0)))
            labels.append(prompt.index(cat))
            masks.append(_box_mask(px, py, w, h))
            records.append({"image_id": image_id, "category_id": cat, "bbox": [px, py, w, h], "score": scores[-1],
                            "mask": masks[-1]})
        # one false positive with a high score
        boxes.append([0.0, 0.0, 10.0, 10.0])
        scores.append(0.95)
        labels.append(0)
        masks.append(_box_mask(0, 0, 10, 10))
        records.append({"image_id": image_id, "category_id": prompt[0], "bbox": [0.0, 0.0, 10.0, 10.0],
                        "score": 0.95, "mask": masks[-1]})
        preds[image_id] = {"boxes": torch.tensor(boxes), "scores": torch.tensor(scores),
                           "labels": torch.tensor(labels), "masks": torch.from_numpy(np.stack(masks))}
    gt = {"images": images, "annotations": anns, "categories": CATS}
    return gt, prompts, records, preds


def test_bbox_and_segm_ap_equal_pycocotools():
    gt, prompts, records, preds = _detection_case(np.random.default_rng(0))
    ours_box, ours_seg = [], []
    for image_id, pred in preds.items():
        ours_box += detections_to_coco(image_id, pred, prompts[image_id])
        ours_seg += detections_to_coco(image_id, pred, prompts[image_id], with_masks=True)
    box_records = [{k: v for k, v in r.items() if k != "mask"} for r in records]
    seg_records = []
    for r in records:
        rle = mask_utils.encode(np.asfortranarray(r["mask"].astype(np.uint8)))
        seg_records.append({"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
                            "segmentation": rle})
    for iou_type, ours, direct_records in (("bbox", ours_box, box_records), ("segm", ours_seg, seg_records)):
        expected = _direct(gt, direct_records, iou_type)
        got = coco_eval(gt, ours, iou_type)
        assert [got["AP"], got["AP50"], got["AP75"]] == pytest.approx(list(expected[:3]), abs=1e-12)
        assert 0.05 < got["AP"] < 0.95 and got["AP50"] > got["AP75"] - 1e-9
    json.dumps(ours_seg)  # RLE counts are JSON-friendly strings


def test_unmapped_labels_are_dropped_and_image_subset():
    gt, _, direct_records, preds = _detection_case(np.random.default_rng(0))
    # the model wrote a phrase that names no dataset category for the second group of image 1
    records = detections_to_coco(1, preds[1], [3, None])
    assert all(r["category_id"] == 3 for r in records)
    assert len(records) == int((preds[1]["labels"] == 0).sum())
    kept = [{k: v for k, v in r.items() if k != "mask"} for r in direct_records
            if r["image_id"] == 1 and r["category_id"] == 3]
    expected = _direct(gt, kept, "bbox", image_ids=[1])
    only_one = coco_eval(gt, records, "bbox", image_ids=[1])
    assert only_one["AP"] == pytest.approx(expected[0], abs=1e-12)
    assert only_one["AP"] > coco_eval(gt, records, "bbox")["AP"] > 0  # images 2, 3 have GT but no predictions
    empty = coco_eval(gt, [], "bbox")
    assert empty["AP"] == 0.0 and empty["APl"] == -1.0  # no large ground-truth objects: nothing to measure


def test_gt_from_targets_matches_hand_written_gt():
    mask = _box_mask(2, 3, 10, 5)
    target = {"boxes": torch.tensor([[2.0, 3.0, 12.0, 8.0], [20.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1, 0]),
              "masks": torch.from_numpy(np.stack([mask, _box_mask(20, 10, 10, 20)]))}
    gt = coco_gt_from_targets([(5, W, H)], [target], CATS, [[3, 7]])
    first = gt["annotations"][0]
    assert first["category_id"] == 7 and first["bbox"] == [2.0, 3.0, 10.0, 5.0] and first["area"] == 50.0
    assert gt["annotations"][1]["category_id"] == 3 and gt["images"] == [{"id": 5, "width": W, "height": H}]
    assert np.array_equal(mask_utils.decode(first["segmentation"]).astype(bool), mask)


def _pose_case(rng: np.random.Generator, num_kpts: int, names=None):
    cat = {"id": 1, "name": "person", "keypoints": list(names) if names else [f"k{i}" for i in range(num_kpts)]}
    images, anns, records, preds = [], [], [], {}
    for image_id in (1, 2):
        images.append({"id": image_id, "width": 200, "height": 200})
        kps_list, scores = [], []
        for _ in range(2):
            x0, y0 = rng.uniform(10, 100, size=2)
            kpts = np.concatenate([rng.uniform(0, 60, size=(num_kpts, 2)) + [x0, y0], np.full((num_kpts, 1), 2.0)], 1)
            kpts[0, 2] = 0  # one unlabelled keypoint
            bbox = [x0, y0, 60.0, 60.0]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": bbox, "area": 3600.0,
                         "iscrowd": 0, "keypoints": kpts.reshape(-1).tolist(),
                         "num_keypoints": int((kpts[:, 2] > 0).sum())})
            noisy = kpts.copy()
            noisy[:, :2] += rng.normal(0, rng.uniform(1, 6), size=(num_kpts, 2))
            noisy[:, 2] = 1.0
            kps_list.append(noisy)
            scores.append(float(rng.uniform(0.2, 1)))
            records.append({"image_id": image_id, "category_id": 1, "keypoints": noisy.reshape(-1).tolist(),
                            "score": scores[-1]})
        preds[image_id] = {"keypoints": torch.tensor(np.stack(kps_list)), "scores": torch.tensor(scores),
                           "labels": torch.zeros(2, dtype=torch.long), "boxes": torch.zeros(2, 4)}
    return {"images": images, "annotations": anns, "categories": [cat]}, records, preds


@pytest.mark.parametrize("names", [COCO_KEYPOINT_NAMES, None])
def test_keypoint_ap_equals_pycocotools(names):
    num = 17 if names else 5
    gt, records, preds = _pose_case(np.random.default_rng(2), num, names)
    ours = [r for image_id, p in preds.items() for r in keypoints_to_coco(image_id, p, [1])]
    sigmas = COCO_KEYPOINT_SIGMAS if names else [UNIFORM_KEYPOINT_SIGMA] * num
    expected = _direct(gt, records, "keypoints", sigmas)
    got = coco_eval(gt, ours, "keypoints")
    assert [got["AP"], got["AP50"], got["AP75"]] == pytest.approx(list(expected[:3]), abs=1e-12)
    assert 0.05 < got["AP"] < 0.95
    # the sigmas are applied: much tighter ones lower the AP
    assert coco_eval(gt, ours, "keypoints", sigmas=[0.005] * num)["AP"] < got["AP"]


def test_keypoint_sigmas_choice():
    assert np.allclose(keypoint_sigmas(17, [n.replace("_", " ") for n in COCO_KEYPOINT_NAMES]), COCO_KEYPOINT_SIGMAS)
    assert np.allclose(keypoint_sigmas(5), UNIFORM_KEYPOINT_SIGMA)
    assert np.allclose(keypoint_sigmas(2, sigmas=[0.1, 0.2]), [0.1, 0.2])
    with pytest.raises(ValueError, match="2 values for 3 keypoints"):
        keypoint_sigmas(3, sigmas=[0.1, 0.2])


def test_rec_accuracy_by_hand():
    gt = [[0, 0, 10, 10]] * 4
    pred = [
        torch.tensor([0.0, 0.0, 10.0, 10.0]),  # IoU 1
        np.array([0, 0, 10, 5]),  # IoU 50 / 100 = 0.5: a hit (>= 0.5)
        [5, 0, 15, 10],  # IoU 50 / 150 = 1/3: a miss
        None,  # no route / no box: a miss
    ]
    assert rec_accuracy(pred, gt) == 0.5
    assert rec_accuracy(pred, gt, threshold=0.3) == 0.75


def test_res_iou_by_hand():
    gt1 = np.zeros((4, 4), bool)
    gt1[:2] = True  # 8 pixels
    pred1 = np.zeros((4, 4), bool)
    pred1[1:3] = True  # 8 pixels; 4 shared -> IoU 4 / 12
    gt2 = np.zeros((4, 4), bool)
    gt2[0, 0] = True  # 1 pixel, predicted exactly -> IoU 1
    gt3 = np.zeros((4, 4), bool)
    gt3[3] = True  # 4 pixels, no prediction -> IoU 0
    got = res_iou([pred1, gt2.copy(), None], [gt1, gt2, gt3])
    assert got["cIoU"] == pytest.approx((4 + 1 + 0) / (12 + 1 + 4))
    assert got["mIoU"] == pytest.approx((4 / 12 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="expression 0"):
        res_iou([np.zeros((2, 2))], [gt1])


# ------------------------------------------------------------------------------------------------ semantic seg

SEMSEG_NAMES = ["background", "a", "b", "c"]  # "c" is in neither the ground truth nor the prediction
SEMSEG_GT = [np.array([[0, 0, 1], [1, 255, 2]]), np.array([[2, 2], [0, 0]])]
SEMSEG_PRED = [np.array([[0, 1, 1], [1, 2, 2]]), np.array([[2, 0], [0, 1]])]


def test_semseg_counts_by_hand():
    inter, pred, label = semseg_counts(SEMSEG_PRED[0], SEMSEG_GT[0], 4)
    # the pixel labelled 255 (predicted 2) counts nowhere
    assert inter.tolist() == [1, 2, 1, 0] and pred.tolist() == [1, 3, 1, 0] and label.tolist() == [2, 2, 1, 0]
    inter, pred, label = semseg_counts(SEMSEG_PRED[1], SEMSEG_GT[1], 4)
    assert inter.tolist() == [1, 0, 1, 0] and pred.tolist() == [2, 1, 1, 0] and label.tolist() == [2, 0, 2, 0]
    with pytest.raises(ValueError, match="predicted class 7"):
        semseg_counts(np.full((2, 2), 7), np.zeros((2, 2)), 4)
    with pytest.raises(ValueError, match="label value 5"):
        semseg_counts(np.zeros((2, 2)), np.full((2, 2), 5), 4)
    with pytest.raises(ValueError, match=r"\(2, 3\) but the ground truth is \(2, 2\)"):
        semseg_counts(np.zeros((2, 3)), np.zeros((2, 2)), 4)


def test_semseg_miou_and_pixel_accuracy_by_hand():
    counts = [semseg_counts(p, g, 4) for p, g in zip(SEMSEG_PRED, SEMSEG_GT)]
    got = semseg_metrics(*zip(*counts), SEMSEG_NAMES)
    # dataset totals: inter [2, 2, 2, 0], predicted [3, 4, 2, 0], labelled [4, 2, 3, 0] -> union [5, 4, 3, 0]
    assert got["IoU"] == pytest.approx({"background": 2 / 5, "a": 2 / 4, "b": 2 / 3, "c": None})
    assert got["mIoU"] == pytest.approx((2 / 5 + 2 / 4 + 2 / 3) / 3)  # "c" (empty union) is left out
    assert got["aAcc"] == pytest.approx(6 / 9)
    assert got["Acc"] == pytest.approx({"background": 2 / 4, "a": 2 / 2, "b": 2 / 3, "c": None})
    assert got["mAcc"] == pytest.approx((2 / 4 + 1 + 2 / 3) / 3)
    assert got["scored_classes"] == 3
    empty = semseg_metrics([], [], [], SEMSEG_NAMES)
    assert (empty["mIoU"], empty["aAcc"], empty["IoU"]["a"]) == (0.0, 0.0, None)


def test_semseg_reduce_zero_label_by_hand():
    """ADE20K's protocol: pixels labelled 0 are ignored and class 0 is out of the metrics."""
    counts = [semseg_counts(p, g, 4, reduce_zero_label=True) for p, g in zip(SEMSEG_PRED, SEMSEG_GT)]
    assert all(c[0] == 0 for row in counts for c in row)
    got = semseg_metrics(*([c[1:] for c in column] for column in zip(*counts)), SEMSEG_NAMES[1:])
    # scored pixels: a->a twice, b->b twice, b->0 once
    assert got["IoU"] == pytest.approx({"a": 1.0, "b": 2 / 3, "c": None})
    assert got["mIoU"] == pytest.approx((1 + 2 / 3) / 2)
    assert got["aAcc"] == pytest.approx(4 / 5)


def test_label_map_from_masks_by_hand():
    masks = np.zeros((3, 2, 3), dtype=bool)
    masks[0, :, :2] = True  # class 2, score 0.3
    masks[1, 0, 1:] = True  # class 1, score 0.8: wins where it overlaps mask 0
    masks[2] = True  # unknown class: left out
    got = label_map_from_masks(torch.from_numpy(masks), torch.tensor([0.3, 0.8, 0.9]), [2, 1, None], (2, 3))
    assert got.tolist() == [[2, 1, 1], [2, 2, 0]]
    assert label_map_from_masks(np.zeros((0, 2, 3), bool), [], [], (2, 3)).tolist() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match=r"are \(2, 3\) but the image is \(4, 4\)"):
        label_map_from_masks(masks, [0.1, 0.2, 0.3], [1, 1, 1], (4, 4))


def test_pck_by_hand():
    box = [10, 10, 30, 50]  # w 20, h 40: threshold 0.2 * 40 = 8 px
    gt = np.array([[10, 10, 2], [20, 20, 2], [30, 30, 1], [40, 40, 0]], dtype=float)
    pred = np.array([[10, 17, 0.9], [29, 20, 0.9], [30, 30, 0.1], [0, 0, 0.1]])  # 7 px ok, 9 px wrong, exact ok, (v=0)
    gt_b = np.array([[0, 0, 2], [5, 5, 2]], dtype=float)
    box_b = [0, 0, 10, 10]  # threshold 2 px; no prediction -> both wrong
    assert pck([pred, None], [gt, gt_b], [box, box_b]) == pytest.approx(2 / 5)
    assert pck([pred], [gt], [box], alpha=0.25) == pytest.approx(1.0)  # threshold 10 px


def test_match_instances_by_score_then_overlap():
    gt = [[0, 0, 10, 10], [20, 0, 30, 10], [50, 50, 60, 60]]
    pred = [[1, 1, 10, 10], [0, 0, 9, 9], [21, 0, 30, 10], [80, 80, 90, 90]]
    # the best-scoring prediction takes the first instance; the second one, also on it, falls back to nothing else
    # it overlaps; the third finds its own; the far one and the third instance stay unmatched
    assert match_instances(pred, [0.5, 0.9, 0.7, 0.8], gt) == [1, 2, None]
    assert match_instances(np.zeros((0, 4)), [], gt) == [None, None, None]


def test_vqa_normalisation():
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"
    assert normalize_vqa_answer("The dog") == "dog"
    assert normalize_vqa_answer("dont know") == "don't know"
    assert normalize_vqa_answer("1,000") == "1000"  # digit,digit: punctuation deleted
    assert normalize_vqa_answer("red-ish") == "red ish"  # no space beside '-': replaced by a space
    assert normalize_vqa_answer("3.5") == "3.5"  # a period before a digit stays
    assert normalize_vqa_answer("hell") == "hell"  # an ordinary word is not a contraction


def test_vqa_accuracy_by_hand():
    # 3 of 10 humans said "two": 3 subsets (leaving one of them out) have 2 matches -> 2/3; 7 subsets have 3 -> 1.
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_score("2", ["two"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # 1 of 10: leaving it out gives 0, the other 9 subsets give 1/3 -> 9 * (1/3) / 10 = 0.3
    assert vqa_score("the dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    # 2 of 10: 2 subsets with 1 match (1/3) and 8 with 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6
    assert vqa_score("dont know", ["don't know"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    # 4 of 10: every subset has >= 3 matches -> 1
    assert vqa_score("Yes!", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    # a single reference answer: exact match after normalisation
    assert vqa_score("Two", ["2"]) == 1.0 and vqa_score("3", ["2"]) == 0.0
    assert vqa_accuracy(["2", "the dog", "cat"], [["two"] * 3 + ["3"] * 7, ["dog"] + ["cat"] * 9, ["dog"] * 10]) \
        == pytest.approx((0.9 + 0.3 + 0.0) / 3)


def test_cider_by_hand():
    # Two images, so idf = log(2) - log(df=1) = log 2 for every n-gram (call it L).
    # Image 1: "Red car." vs ref "red car": unigram vectors equal (L, L) -> similarity 1; bigram 1; 3/4-grams 0.
    #   mean over n = (1 + 1 + 0 + 0) / 4 = 0.5, times 10 -> 5.
    # Image 2: "red sky" vs "blue sky": unigram: only "sky" shared -> L^2 / (sqrt2 L * sqrt2 L) = 1/2; bigram 0.
    #   (0.5 + 0 + 0 + 0) / 4 * 10 = 1.25.
    got = cider_d(["Red car.", "red sky"], [["red car"], ["blue sky"]])
    assert got["per_image"] == pytest.approx([5.0, 1.25])
    assert got["CIDEr"] == pytest.approx(3.125)


def test_cider_length_penalty_by_hand():
    # Image 1: "red car" vs "red car big". unigram: 2 shared of norms sqrt2 L, sqrt3 L -> 2 / sqrt6;
    #   bigram: "red car" shared, norms L and sqrt2 L -> 1 / sqrt2; longer n-grams 0.
    #   lengths (bigram counts) 1 and 2 -> penalty exp(-1 / (2 * 36)).
    # Image 2: "x" vs "y" -> 0.
    image1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    got = cider_d(["red car", "x"], [["red car big"], ["y"]])
    assert got["per_image"] == pytest.approx([image1, 0.0])
    assert got["CIDEr"] == pytest.approx(image1 / 2)


def test_bleu_by_hand():
    refs1 = ["the cat is on the mat", "there is a cat on the mat"]
    # "the cat sat on the mat": clipped 1-grams 5/6, 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the
    # mat); closest reference length 6 = candidate length -> no brevity penalty.
    got = bleu(["the cat sat on the mat"], [refs1])
    assert got["BLEU-1"] == pytest.approx(5 / 6)
    assert got["BLEU-2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert got["BLEU-3"] == pytest.approx(0.5)
    # Add "a dog is running fast" vs "a dog is running": 4/5, 3/4, 2/3, 1/2. Corpus sums: 9/11, 6/9, 3/7, 1/5;
    # lengths 11 vs 6 + 4 = 10 -> no penalty.
    got = bleu(["the cat sat on the mat", "a dog is running fast"], [refs1, ["a dog is running"]])
    assert got["BLEU-4"] == pytest.approx((9 / 11 * 6 / 9 * 3 / 7 * 1 / 5) ** 0.25)
    # Short candidate "a dog" vs 4 words: all n-grams match, brevity penalty exp(1 - 4/2) = e^-1.
    got = bleu(["a dog"], [["a dog is running"]])
    assert got["BLEU-1"] == pytest.approx(math.exp(-1)) and got["BLEU-2"] == pytest.approx(math.exp(-1))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny open_clip model from the repo config, saved."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    open_clip.add_model_config(REPO / "configs" / "open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("vllm2-tiny-vit").eval()
    torch.save(model.state_dict(), folder / "weights.pt")
    return model, folder / "weights.pt"


def _direct_embeds(model, images=None, texts=None) -> torch.Tensor:
    import open_clip

    with torch.no_grad():
        if images is not None:
            transform = open_clip.image_transform(model.visual.image_size, is_train=False)
            x = model.encode_image(torch.stack([transform(im) for im in images]))
        else:
            x = model.encode_text(open_clip.get_tokenizer("vllm2-tiny-vit")(texts))
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_metrics_equal_direct_computation(tiny_clip):
    model, path = tiny_clip
    scorer = load_clip_scorer("vllm2-tiny-vit", path)
    for (name, a), b in zip(scorer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    images = [make_image(64, 48, seed=s) for s in range(3)]
    outs = [make_image(64, 48, seed=s) for s in range(3, 6)]
    texts = ["a red square", "two green boxes", "a photo of noise"]
    img, out, txt = _direct_embeds(model, images), _direct_embeds(model, outs), _direct_embeds(model, texts=texts)
    cos = (img * txt).sum(-1)
    assert clip_score(scorer, images, texts) == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-4)
    assert clip_text_similarity(scorer, images, texts) == pytest.approx(float(cos.mean()), abs=1e-6)
    assert clip_image_similarity(scorer, outs, images) == pytest.approx(float((img * out).sum(-1).mean()), abs=1e-6)
    empty = _direct_embeds(model, texts=[""] * 3)
    direction = torch.nn.functional.cosine_similarity(out - img, txt - empty, dim=-1).mean()
    assert clip_directional_similarity(scorer, images, outs, [""] * 3, texts) == pytest.approx(float(direction),
                                                                                               abs=1e-5)
    edit = edit_metrics(scorer, images, outs, images, texts)
    assert edit["CLIP-dir"] == pytest.approx(float(direction), abs=1e-5) and set(edit) == {"CLIP-T", "CLIP-dir",
                                                                                          "CLIP-I"}


def test_clip_loader_errors(tmp_path):
    import open_clip

    from vllm2.vision import OPEN_CLIP_CONFIG_DIR

    open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_clip_scorer("vllm2-tiny-vit", tmp_path / "missing.pt")
    cfg = json.loads((REPO / "configs/open_clip/vllm2-tiny-vit.json").read_text())
    cfg["text_cfg"]["vocab_size"] = 256  # too small for open_clip's tokenizer
    (tmp_path / "vllm2-small-vocab.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    torch.save(open_clip.create_model("vllm2-small-vocab").state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="text_cfg.vocab_size"):
        load_clip_scorer("vllm2-small-vocab", tmp_path / "small.pt")
