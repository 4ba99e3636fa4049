"""Stage 0: patch labels from COCO masks, patch-phrase contrastive pretraining of an open_clip tower (overfit, exact
checkpoint round trip through ``vision.pretrained``), the linear probe, and the ``vllm2 tower`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vllm2 import VisionLLMv2Processor, build_model, load_config
from vllm2.cli.tower import main as tower_main
from vllm2.tower import _unique_draw, fit_probe, patch_labels, pretrain_tower, tower_features
from vllm2.vision import create_open_clip

OVERRIDES = ["vision.backend=open_clip", "vision.open_clip_model=vllm2-tiny-vit", "vision.image_mode=resize",
             "vision.freeze=true"]  # frozen for the stages after stage 0, which trains it all the same
# (image, category, colour, xyxy rectangle in pixels of a 56-pixel image; the patch grid is 4 x 4 of 14 pixels)
OBJECTS = [
    (0, 1, "red", (0, 0, 28, 28)),  # patches (0,0) (0,1) (1,0) (1,1): left
    (0, 2, "blue", (30, 30, 56, 56)),  # centres 35 and 49 on both axes: patches (2,2) (2,3) (3,2) (3,3): right
    (1, 1, "blue", (0, 0, 56, 56)),  # the whole image ...
    (1, 2, "red", (28, 0, 56, 14)),  # ... with a smaller object in front: patches (0,2) (0,3)
]


def _write(tmp_path):
    images = []
    for i in range(2):
        canvas = np.full((56, 56, 3), 235, np.uint8)
        for image, _, colour, (x0, y0, x1, y1) in OBJECTS:
            if image == i:
                canvas[y0:y1, x0:x1] = (220, 40, 40) if colour == "red" else (40, 80, 220)
        Image.fromarray(canvas).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 56, "height": 56})
    anns = [{"id": k + 1, "image_id": i + 1, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0],
             "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "attributes": {"colour": colour},
             "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}
            for k, (i, c, colour, (x0, y0, x1, y1)) in enumerate(OBJECTS)]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}]}))
    return path


@pytest.fixture()
def labelled(tmp_path):
    cfg = load_config("tiny", OVERRIDES)
    processor = VisionLLMv2Processor.from_config(cfg)
    return cfg, processor, patch_labels(_write(tmp_path), processor.pixel_values, 4)


def test_each_patch_takes_the_object_under_its_centre_the_smaller_in_front(labelled, tmp_path):
    _, processor, data = labelled
    phrases = [[data.phrase_names[k] for k in row] for row in data.phrases.tolist()]
    grid0 = np.array(phrases[0]).reshape(4, 4)
    assert set(grid0[:2, :2].ravel()) == {"red square on the left"}
    assert set(grid0[2:, 2:].ravel()) == {"blue circle on the right"}
    assert set(grid0[:2, 2:].ravel()) == set(grid0[2:, :2].ravel()) == {"background"}
    grid1 = np.array(phrases[1]).reshape(4, 4)
    assert list(grid1[0, 2:]) == ["red circle on the right"] * 2
    assert (grid1 == "blue square on the right").sum() == 14  # its centre, 28, is not left of the middle
    colour = np.array([[data.names["colour"][k] for k in row] for row in data.fields["colour"].tolist()])
    assert list(colour[0].reshape(4, 4)[:, 0]) == ["red", "red", "background", "background"]
    assert torch.equal(data.pixels, processor.pixel_values([tmp_path / "0.png", tmp_path / "1.png"]))


def test_a_held_out_split_keeps_the_training_indices_and_appends_what_it_lacks(labelled, tmp_path):
    _, processor, data = labelled
    colours, phrases = list(data.names["colour"]), list(data.phrase_names)
    other = tmp_path / "other"
    other.mkdir()
    path = _write(other)
    record = json.loads(path.read_text())
    record["annotations"][0]["attributes"]["colour"] = "green"
    path.write_text(json.dumps(record))
    held_out = patch_labels(path, processor.pixel_values, 4, vocab=data)
    assert held_out.names["colour"] == [*colours, "green"] and held_out.names is data.names
    assert held_out.phrase_names == [*phrases, "green square on the left"]
    assert held_out.fields["colour"][0, 0] == len(colours) and held_out.phrases[0, 0] == len(phrases)
    assert torch.equal(held_out.phrases[1], data.phrases[1])  # the unchanged image: the same indices
    record["annotations"][0]["attributes"] = {"colour": "red", "texture": "striped"}
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="texture"):
        patch_labels(path, processor.pixel_values, 4, vocab=data)


def test_unique_draw_takes_each_present_label_once():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 3, 3, 0, 5, 3, 0, 0])
    for _ in range(20):
        pick = _unique_draw(labels, generator)
        assert sorted(labels[pick].tolist()) == [0, 3, 5]


def test_stage0_overfits_and_its_checkpoint_loads_exactly_through_vision_pretrained(labelled, tmp_path):
    cfg, _, data = labelled
    summary = pretrain_tower(cfg.vision, data, tmp_path / "s0", steps=150, batch_size=2, lr=3e-3, rounds=4,
                             held_out=data)
    assert summary["last_loss"] < 0.25 * summary["first_loss"]
    assert summary["held_out_phrase_accuracy"] == 1.0  # every object patch of the (training) images named right
    model = build_model(load_config("tiny", [*OVERRIDES, f"vision.pretrained={tmp_path / 's0' / 'tower.pt'}"]))
    model.load_pretrained_components()
    state = torch.load(tmp_path / "s0" / "tower.pt", weights_only=True)["state_dict"]
    for name, value in model.vis_encoder.visual.state_dict().items():
        assert torch.equal(value, state[f"visual.{name}"]), name
    torch.manual_seed(0)  # pretrain_tower's seed: the tower as it started
    initial = create_open_clip(cfg.vision).visual.conv1.weight
    assert not torch.equal(initial, state["visual.conv1.weight"])  # the (frozen-configured) tower itself trained


def test_linear_probe_reads_separable_features_and_not_xor():
    torch.manual_seed(0)
    x = torch.randn(400, 2)
    x = x[(x[:, 0] + 0.5 * x[:, 1]).abs() > 0.1]  # a margin
    separable = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    xor = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    assert (fit_probe(x, separable, 2)(x).argmax(-1) == separable).float().mean() == 1.0
    assert (fit_probe(x, xor, 2)(x).argmax(-1) == xor).float().mean() < 0.7


def test_tower_features_are_the_towers_output_in_eval_mode(labelled):
    cfg, _, data = labelled
    tower = build_model(load_config("tiny", [*OVERRIDES, "vision.freeze=false"])).vis_encoder.train()
    features = tower_features(tower, data.pixels, batch_size=1)
    assert not tower.training
    torch.testing.assert_close(features, tower(data.pixels)[0])


def test_cli_pretrain_then_probe(tmp_path, capsys):
    path = _write(tmp_path)
    out = tmp_path / "s0"
    assert tower_main(["pretrain", "--config", "tiny", *OVERRIDES, "--data", str(path), "--held-out", str(path),
                       "--out", str(out), "--steps", "3", "--batch-size", "2", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3 and (out / "tower.pt").is_file()
    assert tower_main(["probe", "--config", "tiny", *OVERRIDES, f"vision.pretrained={out / 'tower.pt'}",
                       "--train", str(path), "--held-out", str(path), "--out", str(tmp_path / "p.json"), "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"category", "category_all", "colour", "side", "chance"}
    assert json.loads((tmp_path / "p.json").read_text()) == result
    assert tower_main(["pretrain", "--config", "tiny", *OVERRIDES, "--data", str(tmp_path / "nope.json"),
                       "--out", str(out), "-q"]) == 2
    assert "nope.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    assert tower_main(["pretrain", "--config", "tiny", *OVERRIDES, "--data", str(tmp_path / "bad.json"),
                       "--out", str(out), "-q"]) == 2
    assert "bad.json: not a COCO instances file" in capsys.readouterr().err
