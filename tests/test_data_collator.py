"""The collator: one micro-batch mixing VQA, detection, pose, generation and editing through the tiny model; dropped
bad records; length limits and safe truncation; errors naming the sample's source."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from superlink import gather_queries
from test_data_annotations import EXAMPLES, IMAGES
from vllm2 import build_model, load_config
from vllm2.data import (
    CocoDataset,
    CocoKeypointDataset,
    Collator,
    ConversationDataset,
    EditDataset,
    TaskSample,
    Templates,
    TextToImageDataset,
)
from vllm2.tokenizer import IMAGE_TOKEN
from vllm2.training import apply_freeze


@pytest.fixture(scope="module")
def samples(tiny_processor):
    templates = Templates(tiny_processor.routes)

    def read(cls, file, index, **kwargs):
        return cls(EXAMPLES / file, IMAGES, templates=templates, mode="teacher_forced", **kwargs)[index]

    return {
        "vqa": read(ConversationDataset, "llava.json", 0),
        "det": read(CocoDataset, "coco_instances.json", 0, task="instance_seg"),
        "pose": read(CocoKeypointDataset, "coco_keypoints.json", 0),
        "gen": read(TextToImageDataset, "t2i.jsonl", 0),
        "edit": read(EditDataset, "edit.jsonl", 0),
    }


@pytest.fixture(scope="module")
def mixed(samples, tiny_processor):
    collator = Collator(tiny_processor, max_length=1024)
    order = ["vqa", "det", None, "pose", "gen", "edit"]
    batch = collator([samples[k] if k else None for k in order])
    return collator, batch


def _groups(batch, processor):
    ids = batch["input_ids"]
    return gather_queries(torch.zeros(*ids.shape, 1), ids, processor.bound)


def test_mixed_batch_is_well_formed(mixed, samples, tiny_processor):
    collator, batch = mixed
    assert collator.dropped == 1  # the None (a skipped bad record) is dropped, nothing takes its place
    assert batch["input_ids"].shape[0] == 5 and batch["labels"].shape == batch["input_ids"].shape
    inputs = batch["decoder_inputs"]
    assert list(inputs) == ["gdino", "keypoint", "sd", "ip2p"]
    expected = {"gdino": ("det", 1), "keypoint": ("pose", 2), "sd": ("gen", 3), "ip2p": ("edit", 4)}
    groups = _groups(batch, tiny_processor)
    for name, (key, b) in expected.items():
        assert inputs[name]["batch_index"].dtype == torch.long and inputs[name]["batch_index"].tolist() == [b]
        assert inputs[name]["targets"][0] is samples[key].targets[name]
        assert torch.equal(groups[name].batch_index, inputs[name]["batch_index"])
    assert inputs["gdino"]["images"][0] is samples["det"].images[0] and inputs["sd"]["images"] == [None]
    assert inputs["ip2p"]["images"][0] is samples["edit"].images[0]
    det = inputs["gdino"]["targets"][0]
    assert int(groups["gdino"].mask.sum()) == 4 and int(det["labels"].max()) < 4  # 4 categories prompted
    pose, pose_groups = inputs["keypoint"]["targets"][0], groups["keypoint"]
    assert int(pose_groups.absorbed.sum()) == 1  # the object-class group goes to the keypoint decoder
    assert int((pose_groups.mask & ~pose_groups.absorbed).sum()) == pose["keypoints"].shape[1] == 6
    assert int(groups["sd"].mask.sum()) == int(groups["ip2p"].mask.sum()) == 1
    tiles = batch["image_tiles"].tolist()
    assert len(tiles) == 4 and batch["pixel_values"].shape[0] == sum(tiles)  # vqa, det, pose, edit images


def test_mixed_batch_runs_through_the_tiny_model(mixed, tiny_cfg):
    _, batch = mixed
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    text_only = {k: v for k, v in batch.items() if k != "decoder_inputs"}
    out = model(**text_only)
    labelled = int((batch["labels"][:, 1:] != -100).sum())  # the LM head runs where a label follows
    assert torch.isfinite(out.loss) and out.logits.shape[0] == labelled
    assert set(out.groups) == {"gdino", "keypoint", "sd", "ip2p"}


def test_frozen_prefix_runs_without_autograd_and_changes_no_value_or_gradient(mixed, tiny_cfg):
    """With the LLM, tower and bridge frozen (stage 3), the positions before the batch's first query run in a pass
    without autograd and the rest continues from their cache: the losses, states, logits and every gradient equal
    those of one pass (taken when one LLM weight is trainable)."""
    _, batch = mixed
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    apply_freeze(model, ["llm", "vis_encoder", "vl_bridge", "region_encoder"])
    calls = []
    model.llm.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["inputs_embeds"].shape[1]),
                                    with_kwargs=True)

    def run() -> tuple:
        model.zero_grad()
        torch.manual_seed(1)  # the diffusion losses draw noise and timesteps
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    split, split_grads = run()
    length = batch["input_ids"].shape[1]
    assert len(calls) == 2 and 0 < calls[0] < length and sum(calls) == length
    model.llm.get_output_embeddings().weight.requires_grad_(True)
    calls.clear()
    whole, whole_grads = run()
    assert calls == [length]
    for key in ("loss", "lm_loss", "logits", "hidden_states"):
        torch.testing.assert_close(getattr(split, key), getattr(whole, key))
    whole_grads = {n: g for n, g in whole_grads.items() if not n.startswith("llm.")}  # the weight made trainable
    assert set(split_grads) == set(whole_grads) and any(n.startswith("emb_embeddings") for n in split_grads)
    for name, grad in split_grads.items():  # fp32: the passes sum in other orders (up to 2e-4 relative here)
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_every_decoder_loss_in_one_step(mixed, tiny_processor):
    """The collated batch trains all four decoders of the tiny model, which binds the pose routes itself."""
    _, batch = mixed
    small = [f"decoders.{name}.{key}=64" for name in ("gdino", "keypoint") for key in ("image_size", "max_image_size")]
    torch.manual_seed(0)
    model = build_model(load_config("tiny", small)).train()  # the example images are at most 64 pixels
    token_id, routes = tiny_processor.tokenizer.convert_tokens_to_ids, tiny_processor.routes
    assert model.keypoint.object_route_ids == (token_id(routes.route_for_task("det")),)
    assert model.keypoint.keypoint_route_ids == (token_id(routes.route_for_task("pose")),)
    out = model(**batch)
    assert set(out.decoder_losses) == {"gdino", "keypoint", "sd", "ip2p"}
    assert all(torch.isfinite(v) for v in out.decoder_losses.values()) and torch.isfinite(out.lm_loss)
    out.loss.backward()
    for table in ("det", "pose", "gen", "edit"):
        grad = getattr(model, f"emb_embeddings_{table}").weight.grad
        assert grad is not None and grad.abs().sum() > 0, table


# ------------------------------------------------------------------------------------------------ lengths


def _positions(processor, sample):
    """Token count and route-token positions of one sample alone."""
    ids = processor([_plain(sample)])["input_ids"][0]
    return len(ids), (processor.bound.route_index(ids) >= 0).nonzero().squeeze(1).tolist()


def _plain(sample):
    from vllm2 import Sample

    return Sample(sample.turns, sample.images, sample.regions)


def test_over_long_sample_raises_naming_its_source(samples, tiny_processor):
    length, _ = _positions(tiny_processor, samples["det"])
    with pytest.raises(ValueError, match=rf"coco_instances.json images\[0\] \(id 10\): {length} tokens"):
        Collator(tiny_processor, max_length=length - 1)([samples["vqa"], samples["det"]])


def test_truncation_keeps_whole_groups_and_their_targets(samples, tiny_processor):
    det = samples["det"]
    length, routes = _positions(tiny_processor, det)
    collator = Collator(tiny_processor, max_length=routes[1] + 2, truncate=True)  # cuts into the second group
    batch = collator([det, samples["vqa"]])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert len(ids) == routes[1] <= routes[1] + 2  # the cut falls just before the incomplete group
    target = batch["decoder_inputs"]["gdino"]["targets"][0]
    assert target["labels"].tolist() == [0] and target["boxes"].shape == (1, 4) and target["masks"].shape[0] == 1
    assert int(_groups(batch, tiny_processor)["gdino"].mask.sum()) == 1
    assert det.targets["gdino"]["labels"].tolist() == [0, 1]  # the sample itself is untouched
    assert batch["input_ids"].shape[1] == max(len(ids), int(batch["attention_mask"][1].sum()))


def test_truncating_a_pose_answer_to_its_object_group_drops_it(samples, tiny_processor):
    pose = samples["pose"]
    _, routes = _positions(tiny_processor, pose)
    batch = Collator(tiny_processor, max_length=routes[1] + 2, truncate=True)([pose])
    assert "keypoint" not in batch["decoder_inputs"] and int(batch["attention_mask"].sum()) == routes[0]
    kept = Collator(tiny_processor, max_length=routes[2], truncate=True)([pose])  # object + first keypoint group
    target = kept["decoder_inputs"]["keypoint"]["targets"][0]
    assert target["keypoints"].shape[1] == 1 and target["keypoint_ids"].tolist() == [0]
    assert np.array_equal(target["keypoints"], pose.targets["keypoint"]["keypoints"][:, :1])


def test_truncation_never_cuts_an_image(samples, tiny_processor):
    det = samples["det"]
    with pytest.raises(ValueError, match="inside an image"):
        Collator(tiny_processor, max_length=20, truncate=True)([det])


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_source(samples, tiny_processor):
    collator = Collator(tiny_processor)
    broken = dataclasses.replace(samples["vqa"], images=[], source="file.json[7]")
    with pytest.raises(ValueError, match=r"file.json\[7\]: .*1 <image> tokens but 0 images"):
        collator([samples["det"], broken])
    no_targets = dataclasses.replace(samples["det"], targets={}, source="coco.json images[3]")
    with pytest.raises(ValueError, match=r"coco.json images\[3\]: the answer routes to decoders \['gdino'\]"):
        collator([no_targets])
    question = TaskSample("chat", [("user", f"{IMAGE_TOKEN}\nwhat?")], samples["vqa"].images, source="q.json[0]")
    with pytest.raises(ValueError, match=r"q.json\[0\]: the conversation ends without an answer"):
        collator([question])
    with pytest.raises(ValueError, match="all 2 samples of the batch are skipped"):
        collator([None, None])
    assert collator.dropped == 2
