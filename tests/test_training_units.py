"""Training helpers: path-matched freezing and learning rates, task-aligned batches."""

from __future__ import annotations

from collections import Counter

import pytest
from torch import nn

from vllm2.training import TaskAlignedBatchSampler, apply_freeze, param_groups, path_matches


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.llm = nn.Linear(2, 2)
        self.sd = nn.Module()
        self.sd.llm2sd_mapper = nn.Linear(2, 2)
        self.sd.norm = nn.LayerNorm(2)


def test_path_matching_is_by_component():
    assert path_matches("llm.model.layers.0.weight", "llm")
    assert not path_matches("sd.llm2sd_mapper.weight", "llm")
    assert path_matches("sd.llm2sd_mapper.weight", "sd.llm2sd_mapper")


def test_lr_multipliers_do_not_leak_into_the_mapper():
    groups = param_groups(_Toy(), lr=1.0, weight_decay=0.1, multipliers={"llm": 0.1})
    by_lr = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    # llm.weight (0.1, wd), llm.bias (0.1, no wd), mapper weight (1.0, wd), mapper bias + norm (1.0, no wd)
    assert by_lr == {(0.1, 0.1): 1, (0.1, 0.0): 1, (1.0, 0.1): 1, (1.0, 0.0): 3}


def test_longest_prefix_wins():
    groups = param_groups(_Toy(), lr=1.0, weight_decay=0.0, multipliers={"sd": 0.5, "sd.llm2sd_mapper": 2.0})
    lrs = sorted(g["lr"] for g in groups for _ in g["params"])
    assert lrs == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]


def test_unknown_prefixes_are_named():
    with pytest.raises(KeyError, match="training.lr_multipliers: 'lm'"):
        param_groups(_Toy(), 1.0, 0.0, {"lm": 0.1})
    with pytest.raises(KeyError, match="training.freeze: 'vision'"):
        apply_freeze(_Toy(), ["vision"])


def test_freeze_by_prefix():
    toy = _Toy()
    assert apply_freeze(toy, ["sd"]) == 4
    assert toy.llm.weight.requires_grad and not toy.sd.llm2sd_mapper.weight.requires_grad


def test_task_aligned_batches_share_composition_across_ranks():
    tasks = ["vqa"] * 40 + ["det"] * 20 + ["pose"] * 10 + ["gen"] * 6 + ["edit"] * 4
    ranks = [list(TaskAlignedBatchSampler(tasks, 4, world_size=2, rank=r, seed=3)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 10
    for a, b in zip(*ranks):
        assert Counter(tasks[i] for i in a) == Counter(tasks[i] for i in b)
    seen = [set(i for batch in r for i in batch) for r in ranks]
    assert not (seen[0] & seen[1])  # each rank draws from its own shard
    assert any(len({tasks[i] for i in batch}) > 1 for batch in ranks[0])  # micro-batches mix tasks


def test_task_aligned_batches_are_deterministic_per_epoch():
    tasks = ["a"] * 10 + ["b"] * 10
    s = TaskAlignedBatchSampler(tasks, 3, seed=1)
    first = list(s)
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first


def test_stage_recipes_load_and_freeze_what_they_say():
    from pathlib import Path

    from vllm2 import load_config

    stages = Path(__file__).resolve().parents[1] / "configs" / "stages"
    stage1 = load_config(stages / "stage1.yaml")
    assert stage1.decoders == {} and stage1.llm.hidden_size == 4096
    stage2 = load_config(stages / "stage2.yaml")
    assert set(stage2.decoders) == {"gdino", "keypoint", "sd", "ip2p"} and stage2.training.lr_multipliers["llm"] == 0.1
    stage3 = load_config(stages / "stage3.yaml")
    assert "llm" in stage3.training.freeze and stage3.data == stage2.data


def test_shapes_stages_chain_and_stage3_phases_train_disjoint_decoders_and_query_tables():
    """1 -> 1b -> 2 -> 3a -> 3c -> 3d, 3a -> 3a2 -> 3a3 and 2 -> 3b; the stage-3 phases train disjoint parts (3d
    continues 3c; 3a2 and 3a3 continue 3a's GroundingDINO with 3a's [DET] table, which 3c and 3d read), so `vllm2
    export --merge` can join 3a3 into 3d's export (base 3a) and 3b into that (base 2)."""
    from pathlib import Path

    from vllm2 import build_model, load_config

    folder = Path(__file__).resolve().parents[1] / "configs" / "shapes"
    names = ("1", "1b", "2", "3a", "3a2", "3a3", "3b", "3c", "3d")
    stages = {n: load_config(folder / f"stage{n}.yaml", ["vision.pretrained=null"]) for n in names}
    assert stages["1"].decoders == {} and stages["1"].training.lr_multipliers == {}
    assert stages["1"].training.init_from is None
    for previous, stage in (("1", "1b"), ("1b", "2"), ("2", "3a"), ("2", "3b"), ("3a", "3a2"), ("3a2", "3a3"),
                            ("3a", "3c"), ("3c", "3d")):
        assert stages[stage].training.init_from == f"{stages[previous].training.output_dir}/final"
    assert all(s.vision.backend == "open_clip" and s.vision.freeze for s in stages.values())
    trained = {}
    for name in ("3a", "3a2", "3a3", "3b", "3c", "3d"):
        model = build_model(stages[name])
        apply_freeze(model, stages[name].training.freeze)
        trained[name] = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"3a": {"gdino", "emb_embeddings_det"}, "3a2": {"gdino"}, "3a3": {"gdino"},
                       "3b": {"ip2p", "emb_embeddings_edit"},
                       "3c": {"keypoint", "emb_embeddings_pose"}, "3d": {"keypoint", "emb_embeddings_pose"}}


def test_init_from_a_stage_without_decoders_keeps_the_new_decoders_and_takes_the_rest(tmp_path):
    import torch

    from vllm2 import build_model, load_config
    from vllm2.training import init_from_export

    no_decoders = ["decoders.gdino=null", "decoders.keypoint=null", "decoders.sd=null", "decoders.ip2p=null"]
    torch.manual_seed(0)
    build_model(load_config("tiny", no_decoders)).save_pretrained(tmp_path / "stage1")
    torch.manual_seed(1)
    model = build_model(load_config("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    added = init_from_export(model, tmp_path / "stage1")
    assert added == ["gdino", "ip2p", "keypoint", "sd"]
    torch.manual_seed(0)
    stage1 = build_model(load_config("tiny", no_decoders))  # the same weights as the export
    state = model.state_dict()
    for name, value in stage1.state_dict().items():
        assert torch.equal(state[name], value), name
    assert all(torch.equal(state[k], before[k]) for k in before if k.split(".")[0] in added)
    assert not torch.equal(state["vl_bridge.0.weight"], before["vl_bridge.0.weight"])


def test_init_from_an_export_with_fewer_tokens_grows_the_vocabulary(tmp_path):
    """A text-transmission stage after a super-link stage: its tokenizer adds location and class tokens after the
    export's; the export's rows of the embedding and head are taken, the added rows keep their initial values."""
    import torch

    from vllm2 import build_model, load_config
    from vllm2.training import init_from_export

    torch.manual_seed(0)
    build_model(load_config("tiny")).save_pretrained(tmp_path / "stage1")
    torch.manual_seed(1)
    model = build_model(load_config("tiny", ["superlink.transmission=text", "superlink.location_bins=9",
                                             "superlink.class_tokens=4"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_from_export(model, tmp_path / "stage1")
    torch.manual_seed(0)
    stage1 = build_model(load_config("tiny")).state_dict()
    state = model.state_dict()
    for table in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        rows = stage1[table].shape[0]
        assert state[table].shape[0] == rows + 9 + 4
        assert torch.equal(state[table][:rows], stage1[table]) and torch.equal(state[table][rows:], before[table][rows:])
    assert torch.equal(state["vl_bridge.0.weight"], stage1["vl_bridge.0.weight"])

    model.config.token_ids = {**model.config.token_ids, "[NEW]": 5}  # an added token with an id the export uses
    with pytest.raises(ValueError, match=r"training.init_from: this config's tokens \['\[NEW\]'\] have ids inside"):
        init_from_export(model, tmp_path / "stage1")


def test_init_from_refuses_another_architecture_and_a_missing_folder(tmp_path):
    from vllm2 import build_model, load_config
    from vllm2.training import init_from_export

    build_model(load_config("tiny", ["llm.hidden_size=32"])).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="training.init_from.*other"):
        init_from_export(build_model(load_config("tiny")), tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="training.init_from.*nowhere"):
        init_from_export(build_model(load_config("tiny")), tmp_path / "nowhere")
