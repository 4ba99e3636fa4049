"""Task templates: first phrasing in evaluation, seeded sampling in training, category order = label order, keypoint
subsets remapped, route text only from the route table."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from superlink import Route, RouteTable, placeholder_sequence
from vllm2.data import DEFAULT_PHRASINGS, Rendered, Templates, to_turns
from vllm2.tokenizer import IMAGE_TOKEN

NAMES = [f"thing{i}" for i in range(8)]


@pytest.fixture
def templates():
    return Templates(RouteTable.default())


def _detection_case(n_instances=6, seed=0):
    rng = np.random.default_rng(seed)
    categories = rng.choice([1, 3, 4, 6], n_instances)  # 4 positives of 8
    boxes = np.stack([np.array([i, i, i + 5, i + 5], dtype=np.float32) for i in range(n_instances)])
    return categories, boxes


def _answer_names(answer: str, suffix: str) -> list[str]:
    """Names written before each route suffix of an answer, in order."""
    return [m.split(", ")[-1].split(" ")[-1] for m in answer.split(suffix)[:-1]]


def test_evaluation_uses_the_first_phrasing_and_dataset_order(templates):
    categories, boxes = _detection_case()
    r = templates.detection("det", NAMES, categories, boxes, None, None)
    suffix = templates.suffix("det")
    assert r.question == f"{IMAGE_TOKEN}\n" + DEFAULT_PHRASINGS["det_question"][0].format(categories=", ".join(NAMES))
    assert r.answer == DEFAULT_PHRASINGS["det_answer"][0].format(results=", ".join(n + suffix for n in NAMES))
    assert r.targets["gdino"]["labels"].tolist() == categories.tolist()  # all categories, dataset order
    g = templates.grounding("rec", "the dog", boxes[0], None, None)
    assert g.question.endswith(DEFAULT_PHRASINGS["grounding_question"][0].format(expression="the dog"))
    assert g.answer == DEFAULT_PHRASINGS["grounding_answer"][0].format(results=templates.suffix("rec"))


def test_training_samples_phrasings_deterministically(templates):
    categories, boxes = _detection_case()
    runs = [templates.detection("det", NAMES, categories, boxes, None, np.random.default_rng([7, 0, i]))
            for i in range(40)]
    again = templates.detection("det", NAMES, categories, boxes, None, np.random.default_rng([7, 0, 3]))
    assert (again.question, again.answer) == (runs[3].question, runs[3].answer)
    assert np.array_equal(again.targets["gdino"]["labels"], runs[3].targets["gdino"]["labels"])
    used = {next(i for i, p in enumerate(DEFAULT_PHRASINGS["det_question"])
                 if r.question.startswith(f"{IMAGE_TOKEN}\n" + p.split("{")[0])) for r in runs}
    assert used == set(range(len(DEFAULT_PHRASINGS["det_question"])))


@pytest.mark.parametrize("task", ["det", "semantic_seg"])
def test_category_order_is_label_order(templates, task):
    categories, boxes = _detection_case(8)
    suffix = templates.suffix(task)
    for seed in range(60):
        r = templates.detection(task, NAMES, categories, boxes, None, np.random.default_rng(seed))
        prompted = _answer_names(r.answer, suffix)
        assert set(prompted) >= {NAMES[c] for c in categories}  # every positive is prompted
        in_question = r.question.split(", ")
        assert len(in_question) == len(prompted)
        target = r.targets["gdino"]
        for box, label in zip(target["boxes"], target["labels"]):
            instance = int(box[0])  # boxes were built with x1 = instance index
            assert prompted[label] == NAMES[categories[instance]]
        assert len(target["labels"]) == len(categories)


def test_category_sampling_rule():
    templates = Templates(RouteTable.default(), max_categories=100)
    names = [f"c{i}" for i in range(300)]
    categories = np.array([5, 17, 17, 250])
    boxes = np.zeros((4, 4), dtype=np.float32)
    sizes, all_small = [], 0
    for seed in range(200):
        chosen = templates.select_categories(300, categories, np.random.default_rng(seed))
        assert {5, 17, 250} <= set(chosen) and len(chosen) == len(set(chosen)) <= 100
        sizes.append(len(chosen))
        small = templates.select_categories(8, [1, 2], np.random.default_rng(seed))
        all_small += len(small) == 8
        assert {1, 2} <= set(small)
    assert sizes.count(100) > 60 and min(sizes) < 50  # "all" capped at 100 about half the time, else fewer
    assert 70 < all_small < 140  # every category about half the time
    r = templates.detection("det", names, categories, boxes, None, np.random.default_rng(0))
    assert len(r.targets["gdino"]["labels"]) == 4
    orders = {tuple(templates.select_categories(8, [1, 2], np.random.default_rng(s))) for s in range(30)}
    assert len(orders) > 10  # shuffled
    many = templates.select_categories(300, list(range(150)), np.random.default_rng(0))
    assert len(many) == 100 and all(c < 150 for c in many)  # more positives than the cap: a subset of positives


def test_keypoint_subsets_are_remapped(templates):
    names = ["nose", "left eye", "right eye", "left ear", "right ear", "neck"]
    keypoints = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    boxes, areas = np.zeros((2, 4), np.float32), np.ones(2, np.float32)
    pose_suffix, det_suffix = templates.suffix("pose"), templates.suffix("det")
    full = 0
    for seed in range(100):
        r = templates.pose("person", names, boxes, keypoints, areas, np.random.default_rng(seed), dataset="coco")
        target = r.targets["keypoint"]
        ids = target["keypoint_ids"].tolist()
        assert ids == sorted(ids) and len(ids) >= 1
        assert np.array_equal(target["keypoints"], keypoints[:, ids])
        prompted = re.findall("(" + "|".join(map(re.escape, names)) + ")" + re.escape(pose_suffix), r.answer)
        assert prompted == [names[k] for k in ids] and r.answer.count(pose_suffix) == len(ids)
        assert r.answer.count(det_suffix) == 1 and r.answer.index(det_suffix) < r.answer.index(pose_suffix)
        assert ("dataset" in target) == (ids == list(range(6)))
        full += ids == list(range(6))
    assert 30 < full < 70
    evaluation = templates.pose("person", names, boxes, keypoints, areas, None)
    assert evaluation.targets["keypoint"]["keypoint_ids"].tolist() == list(range(6))


def test_route_text_comes_from_the_table_only():
    templates = Templates(RouteTable([
        Route("<box>", "gdino", 2, "det", tasks=("det",)),
        Route("<kp>", "keypoint", 2, "pose", ("<box>",), tasks=("pose",)),
        Route("<img_out>", "sd", 5, "gen", tasks=("t2i",)),
    ]))
    categories, boxes = _detection_case()
    r = templates.detection("det", NAMES, categories, boxes, None, None)
    assert r.answer.count("<box>" + "".join(placeholder_sequence(2))) == len(NAMES)
    assert placeholder_sequence(3)[2] not in r.answer
    gen = templates.text_to_image("a cat", None, None)
    assert gen.answer.count("<img_out>" + "".join(placeholder_sequence(5))) == 1 and set(gen.targets) == {"sd"}
    pose = templates.pose("person", ["a", "b"], boxes[:1], np.zeros((1, 2, 3)), np.ones(1), None)
    assert pose.answer.count("<kp>") == 2 and pose.answer.count("<box>") == 1 and set(pose.targets) == {"keypoint"}
    for token in RouteTable.default().route_tokens:
        assert token not in r.answer + gen.answer + pose.answer


def test_no_route_token_literal_in_the_data_code():
    tokens = [*RouteTable.default().route_tokens, *RouteTable.default().placeholder_tokens]
    here = Path(__file__).resolve().parent
    for path in sorted([*(here.parent / "vllm2" / "data").glob("*.py"), *here.glob("test_data_*.py")]):
        text = path.read_text()
        assert not [t for t in tokens if t in text], path


def test_special_tokens_in_data_or_phrasings_are_refused(templates):
    route = RouteTable.default().route_tokens[0]
    with pytest.raises(ValueError, match="special token"):
        templates.check_text(f"a {route} b", "caption")
    with pytest.raises(ValueError, match="special token"):
        templates.conversation([("user", "see <region>"), ("assistant", "ok")], 0)
    with pytest.raises(ValueError, match="special token"):
        Templates(RouteTable.default(), {"det_answer": [f"{{results}} {route}"]})
    with pytest.raises(ValueError, match="exactly the fields"):
        Templates(RouteTable.default(), {"det_question": ["find things"]})
    with pytest.raises(KeyError, match="unknown phrasing slot"):
        Templates(RouteTable.default(), {"nope": ["x"]})
    custom = Templates(RouteTable.default(), {"det_question": ["List {categories}."]})
    assert custom.detection("det", NAMES, np.zeros(0, np.int64), np.zeros((0, 4)), None, None).question.endswith(
        "List " + ", ".join(NAMES) + ".")


def test_modes_and_conversations(templates):
    r = Rendered("q", "a")
    assert to_turns(r, "train") == to_turns(r, "teacher_forced") == [("user", "q"), ("assistant", "a")]
    assert to_turns(r, "question") == [("user", "q")]
    with pytest.raises(ValueError, match="unknown rendering mode"):
        to_turns(r, "eval")
    turns = templates.conversation([("user", "hi"), ("assistant", "ho")], 2)
    assert turns[0][1] == f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nhi"
    with pytest.raises(ValueError, match="1 <image> tokens but the record names 2"):
        templates.conversation([("user", f"{IMAGE_TOKEN} hi"), ("assistant", "ho")], 2)
    expanded, order = templates.region_conversation([("user", "<region2> vs <region1>"), ("assistant", "<region2>")], 2)
    assert order == [1, 0] and expanded[1][1] == "region2"
    assert re.findall(r"region(\d)<region>", expanded[0][1]) == ["2", "1"]
    with pytest.raises(ValueError, match="<region3>"):
        templates.region_conversation([("user", "<region3>")], 2)


def test_trim_drops_the_targets_of_dropped_groups(templates):
    categories, boxes = _detection_case()
    r = templates.detection("det", NAMES, categories, boxes, np.ones((6, 4, 4), bool), None)
    trimmed, kept = templates.trim("det", r.targets, 4)
    assert kept == 4 and trimmed["gdino"]["labels"].tolist() == [c for c in categories.tolist() if c < 4]
    assert len(trimmed["gdino"]["masks"]) == len(trimmed["gdino"]["boxes"]) == kept_count(categories, 4)
    pose = templates.pose("person", ["a", "b", "c"], boxes[:2], np.zeros((2, 3, 3)), np.ones(2), None, dataset="x")
    two, kept = templates.trim("pose", pose.targets, 3)
    assert kept == 3 and two["keypoint"]["keypoints"].shape == (2, 2, 3) and "dataset" not in two["keypoint"]
    assert templates.trim("pose", pose.targets, 1) == ({}, 0)  # an object group alone is not kept
    gen = templates.text_to_image("a cat", None, None)
    assert templates.trim("t2i", gen.targets, 0) == ({}, 0)


def kept_count(categories: np.ndarray, groups: int) -> int:
    return int((categories < groups).sum())
