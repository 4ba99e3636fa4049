"""``vllm2 convert official``: the key table, config and token-id mapping, and round trips through fake checkpoints.

The fake "official" checkpoint is our tiny model's state dict under the official names (the inverse of the table),
in bf16, as two pickled ``.bin`` shards with an index, an official-style ``config.json`` and the tokenizer files.
``tests/data/visionllmv2_7b_keys.json`` lists *reconstructed* official 7B key names and shapes (not read from the
release); it is written by running this file (``python tests/test_convert.py``), which builds the official modules on
the meta device from the facts of the reference (CLIP-L/14-336, Vicuna-7B with 32026 tokens, transformers'
GroundingDINO with grounding-dino-tiny values renamed by inverting our own renames to the transformers 4 names the
release used, SD 1.5 / InstructPix2Pix from diffusers). Its layer counts are pinned to the key listing of
reference/visionllmv2-official.md section 7, which does not come from our table.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_image
from superlink import RouteTable
from tiny_sizes import tiny_decoder_config
from vllm2 import Sample, VisionLLMv2Model, VisionLLMv2Processor, build_model, load_config
from vllm2.cli.convert import main
from vllm2.convert import (
    KEY_MAP,
    ConversionError,
    TargetSpec,
    build_target,
    check_token_ids,
    convert_tensors,
    map_official_key,
    official_token_ids,
    project_config,
    to_official_state_dict,
)
from vllm2.modeling import llm_config
from vllm2.region import box_to_mask
from vllm2.tokenizer import build_tiny_tokenizer

RECONSTRUCTED_MANIFEST = Path(__file__).parent / "data" / "visionllmv2_7b_keys.json"
# The official mapper is nn.Transformer with its default 8 heads and FFN = 4 x width; the tiny source model matches it.
OFFICIAL_MAPPER = [f"decoders.{d}.{k}={v}" for d in ("sd", "ip2p") for k, v in (("mapper_ffn_dim", 128),
                                                                                 ("mapper_heads", 8))]
PROJECTIONS = ("keypoint.projection_llava.", "keypoint.projection_kpt_llava.")
LOCAL_PATHS_OFF = ["vision.pretrained=null", "llm.pretrained=null", "decoders.gdino.pretrained_path=null",
                   "decoders.keypoint.backbone_pretrained=null", "decoders.sd.pretrained_path=null",
                   "decoders.ip2p.pretrained_path=null"]


# ------------------------------------------------------------------------------------------------------------ fixtures


def _official_config(model: VisionLLMv2Model) -> dict:
    """An official-style ``config.json`` describing ``model`` (field names of the release's VisionLLMv2Config)."""
    cfg, llm, ids = model.cfg, model.config.llm_config, model.config.token_ids
    v = cfg.vision

    def diffusion(name: str, token: str) -> dict:
        d = cfg.decoders[name]
        return {"llm_hidden_size": llm["hidden_size"], "sd_hidden_size": d.cross_attention_dim,
                "num_queries": d.num_prompt_tokens, "num_encoder_layers": d.mapper_encoder_layers,
                "num_decoder_layers": d.mapper_decoder_layers, "num_embed_tokens": model.routes.decoder_num_embs(name),
                "trigger_token": token, "trigger_token_id": ids[token], "cfg_drop_rate": 0.1}

    g = cfg.decoders["gdino"]
    gdino = {"d_model": g.d_model, "encoder_layers": g.num_encoder_layers, "decoder_layers": g.num_decoder_layers,
             "encoder_ffn_dim": g.ffn_dim, "decoder_ffn_dim": g.ffn_dim, "encoder_attention_heads": g.num_heads,
             "decoder_attention_heads": g.num_heads, "encoder_n_points": g.num_points,
             "decoder_n_points": g.num_points, "num_feature_levels": g.num_feature_levels,
             "num_queries": g.num_queries, "max_text_len": g.max_text_len, "mask_dim": g.d_model, "norm": "GN",
             "l_hidden_size": llm["hidden_size"], "two_stage": True, "embedding_init_target": True,
             "backbone_config": {"model_type": "swin", "embed_dim": g.backbone_embed_dim,
                                 "depths": list(g.backbone_depths), "num_heads": list(g.backbone_num_heads),
                                 "window_size": g.backbone_window_size, "out_indices": [1, 2, 3, 4]}}

    return {
        "model_type": "visionllmv2",
        "architectures": ["VisionLLMv2Model"],
        "vis_encoder_config": {"architectures": ["CLIPVisionModel"], "hidden_size": v.hidden_size,
                               "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                               "num_attention_heads": v.num_heads, "image_size": v.image_size,
                               "patch_size": v.patch_size},
        "llm_config": dict(llm, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16"),
        "use_llm_lora": False,
        "vl_bridge_type": "mlp2x_gelu",
        "vis_output_layer": v.output_layer,
        "use_pixelshuffle": False,
        "num_embs": 4,
        "num_embs_gen": 64,
        "use_region_encoder": True,
        "use_gdino": True,
        "gdino_config": gdino,
        "use_unipose": True,
        "unipose_config": {"hidden_dim": cfg.decoders["keypoint"].d_model},
        "use_sd": True,
        "sd_config": diffusion("sd", "[GEN]"),
        "use_ip2p": True,
        "ip2p_config": diffusion("ip2p", "[EDIT]"),
    }


def _write_official(folder: Path, official: dict[str, torch.Tensor], config: dict, tokenizer) -> None:
    """Two pickled shards + index + config.json + tokenizer files, as the release ships them."""
    folder.mkdir(parents=True)
    keys = sorted(official)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: official[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny source model, its bf16 tensors, its processor and the fake official folder built from them."""
    torch.manual_seed(0)
    cfg = load_config("tiny", OFFICIAL_MAPPER)
    model = build_model(cfg).eval()
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    index_buffers = {k: b for k, b in model.named_buffers() if k.endswith("relative_position_index")}  # int64
    official, leftover = to_official_state_dict({**state, **index_buffers})
    official["unipose.transformer.level_embed"] = torch.randn(4, 64, dtype=torch.bfloat16)
    processor = VisionLLMv2Processor.from_config(cfg)
    folder = tmp_path_factory.mktemp("official") / "VisionLLMv2"
    _write_official(folder, official, _official_config(model), processor.tokenizer)
    return {"cfg": cfg, "state": state, "leftover": leftover, "processor": processor, "model": model,
            "folder": folder, "index_buffers": len(index_buffers)}


def _samples() -> list[Sample]:
    image = make_image(120, 50, 1)
    return [
        Sample([("user", "<image>\nDescribe <reg>region1<region></reg>."), ("assistant", "a small green circle")],
               [image], [(box_to_mask((5, 5, 40, 30), 120, 50), 0)]),
        Sample([("user", "Generate image with caption: a red square."),
                ("assistant", "Here it is [GEN]" + "[EMB]" * 64 + ".")]),
    ]


def _copy_with(folder: Path, dst: Path, add: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of an official folder with entries replaced or added (new ones go to the last shard) and dropped."""
    shutil.copytree(folder, dst)
    index_path = dst / "pytorch_model.bin.index.json"
    weight_map = json.loads(index_path.read_text())["weight_map"]
    add = add or {}
    last = sorted(set(weight_map.values()))[-1]
    for key in add:
        weight_map.setdefault(key, last)
    for name in set(weight_map.values()):
        state = torch.load(dst / name, weights_only=True)
        state.update({k: v for k, v in add.items() if weight_map[k] == name})
        torch.save({k: v for k, v in state.items() if k not in drop}, dst / name)
    index_path.write_text(json.dumps({"weight_map": {k: v for k, v in weight_map.items() if k not in drop}}))
    return dst


# ------------------------------------------------------------------------------------------------------------ table


def test_table_maps_known_official_keys():
    for rule in KEY_MAP:
        assert rule.note
        assert all(p.pattern for p in rule.our_patterns)
    assert map_official_key("vis_encoder.vision_model.pre_layrnorm.weight")[1] == (
        "vis_encoder.vision_model.pre_layrnorm.weight",)
    assert map_official_key("sd.sd_text_encoder.text_model.final_layer_norm.bias")[1] == (
        "sd.sd_text_encoder.final_layer_norm.bias",)
    assert map_official_key("ip2p.sd_unet.conv_in.weight")[1] == ("ip2p.sd_unet.conv_in.weight",)
    assert map_official_key("unipose.projection_kpt_llava.layers.2.bias")[1] == (
        "keypoint.projection_kpt_llava.layers.2.bias",)
    assert map_official_key("unipose.transformer.decoder.hw.weight")[1] == ()
    assert map_official_key("llm.base_model.model.model.layers.3.mlp.up_proj.weight")[1] == (
        "llm.base_model.model.model.layers.3.mlp.up_proj.base_layer.weight",)
    assert map_official_key("llm.base_model.model.model.layers.3.mlp.gate_proj.weight")[1] == (
        "llm.base_model.model.model.layers.3.mlp.gate_proj.weight",)
    assert map_official_key("no_such_module.weight") is None


def test_official_token_ids_follow_the_reference_table():
    ids = official_token_ids(RouteTable.default())
    expected = {"[PAD]": 32000, "<image>": 32001, "<im_patch>": 32002, "<region>": 32003, "<img>": 32004,
                "</img>": 32005, "<reg>": 32006, "</reg>": 32007, "<det>": 32008, "</det>": 32009, "<grd>": 32010,
                "</grd>": 32011, "[DET]": 32012, "[GRD]": 32013, "[SEG]": 32014, "[POSE]": 32015, "[GEN]": 32016,
                "[EDIT]": 32017, "[EMB]": 32018, **{f"[EMB{i}]": 32017 + i for i in range(2, 9)}}
    assert ids == expected


def test_token_ids_out_of_official_order_are_refused():
    routes = RouteTable.default()
    tokenizer = build_tiny_tokenizer()
    ordered = list(official_token_ids(routes))
    tokenizer.add_tokens([ordered[1], ordered[0], *ordered[2:]], special_tokens=True)  # <image> before [PAD]
    with pytest.raises(ConversionError, match=r"\[PAD\] is \d+, expected"):
        check_token_ids(tokenizer, routes, len(tokenizer))
    with pytest.raises(ConversionError, match="vocab_size"):
        check_token_ids(tokenizer, routes, len(tokenizer) + 1)


def test_official_config_maps_onto_ours(source):
    official = _official_config(source["model"])
    base = load_config("tiny")
    cfg = project_config(dict(official, num_embs=2, use_llm_lora=True, use_ip2p=False), base)
    assert {r["table"]: r["num_embs"] for r in cfg.superlink.routes} == {"det": 2, "pose": 2, "gen": 64, "edit": 64}
    assert cfg.llm.lora.enabled and (cfg.llm.lora.r, cfg.llm.lora.alpha) == (32, 64)
    assert sorted(cfg.decoders) == ["gdino", "keypoint", "sd"]
    assert (cfg.decoders["sd"].mapper_heads, cfg.decoders["sd"].mapper_ffn_dim) == (8, 128)
    assert cfg.llm.hidden_size == source["cfg"].llm.hidden_size and cfg.llm.pretrained is None
    for bad, field in ((dict(official, vl_bridge_type="internvl_mlp"), "vl_bridge_type"),
                       (dict(official, use_pixelshuffle=True), "use_pixelshuffle"),
                       (dict(official, sd_config=dict(official["sd_config"], num_embed_tokens=8)),
                        r"sd_config.num_embed_tokens=8 differs from num_embs_gen=64"),
                       (dict(official, llm_config=dict(official["llm_config"], architectures=["InternLM2ForCausalLM"])),
                        "llm_config.architectures")):
        with pytest.raises(ConversionError, match=field):
            project_config(bad, base)


def test_lora_checkpoint_names_reach_peft_layers():
    """peft 0.6 (the release) kept a LoRA layer's weight in place; ours nests it under base_layer."""
    with torch.device("meta"):
        model = build_model(load_config("tiny", ["llm.lora.enabled=true"]))
    spec = TargetSpec.of(model)
    prefix = "llm.base_model.model.model.layers.0."
    official = {prefix + name: torch.empty(shape, device="meta") for name, shape in (
        ("self_attn.q_proj.weight", (64, 64)), ("self_attn.q_proj.lora_A.default.weight", (32, 64)),
        ("self_attn.q_proj.lora_B.default.weight", (64, 32)), ("mlp.gate_proj.weight", (128, 64)),
        ("mlp.down_proj.weight", (64, 128)))}
    result = convert_tensors(official.items(), spec, torch.float32)
    assert not (result.unmapped or result.unexpected or result.errors), result
    assert prefix + "self_attn.q_proj.base_layer.weight" in result.tensors


# ------------------------------------------------------------------------------------------------------------ gdino


def test_gdino_legacy_names_convert_back_exactly():
    """The release's GroundingDINO names (transformers 4 Swin, nn.MultiheadAttention, mask head under model.) map
    onto our decoder tensor for tensor; the Swin int64 relative_position_index buffers are checked, not stored."""
    from decoders.gdino.model import GroundingDinoDecoder

    torch.manual_seed(0)
    holder = nn.ModuleDict({"gdino": GroundingDinoDecoder(tiny_decoder_config("gdino"), 64)})
    ours = dict(holder.state_dict())
    buffers = {k: b for k, b in holder.named_buffers() if k.endswith("relative_position_index")}
    official, leftover = to_official_state_dict({**ours, **buffers})
    official["gdino.model.mask_embed.layers.0.weight"] = torch.randn(64, 64)
    assert leftover == []
    prefix = "gdino.model.backbone.conv_encoder.model."
    assert official[prefix + "encoder.layers.0.blocks.0.attention.self.relative_position_index"].dtype == torch.int64
    assert prefix + "encoder.layers.0.blocks.0.intermediate.dense.weight" in official
    assert official["gdino.model.decoder.layers.0.self_attn.in_proj_weight"].shape == (3 * 64, 64)
    assert "gdino.model.lateral_convs.0.norm.weight" in official and not any("pixel_decoder" in k for k in official)

    result = convert_tensors(official.items(), TargetSpec.of(holder), torch.float32)
    assert not (result.unmapped or result.unexpected or result.errors or result.missing), result
    assert result.not_convertible == ["gdino.model.mask_embed.layers.0.weight"]
    assert len(result.recomputed) == len(buffers) > 0
    spec = TargetSpec.of(holder)
    assert all(torch.equal(result.tensors[spec.canonical[key]], value) for key, value in ours.items())


def test_split_attention_matches_torch_multihead_attention():
    """An official nn.MultiheadAttention, split by the table, computes the same as transformers' attention."""
    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoMultiheadAttention

    torch.manual_seed(0)
    torch_attn = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    nn.init.normal_(torch_attn.in_proj_bias)
    ours = GroundingDinoMultiheadAttention(GroundingDinoConfig(d_model=64), num_attention_heads=4).eval()
    prefix = "gdino.model.decoder.layers.0.self_attn."
    holder = nn.ModuleDict({"gdino": nn.ModuleDict({"model": nn.ModuleDict({"decoder": nn.ModuleDict(
        {"layers": nn.ModuleList([nn.ModuleDict({"self_attn": ours})])})})})})
    official = {prefix + k: v for k, v in torch_attn.state_dict().items()}
    result = convert_tensors(official.items(), TargetSpec.of(holder), torch.float32)
    assert not (result.unmapped or result.unexpected or result.errors or result.missing)
    holder.load_state_dict(result.tensors)
    q, k = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(q, k, k)[0], torch_attn(q, k, k, need_weights=False)[0],
                                   atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------ CLI


def test_round_trip_gives_identical_logits(source, tmp_path):
    dst = tmp_path / "converted"
    assert main(["official", str(source["folder"]), str(dst), "--config", "tiny",
                 "--allow-missing", "keypoint"]) == 0
    loaded = VisionLLMv2Model.from_pretrained(dst).eval()
    reference = build_model(source["cfg"]).eval()
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in source["state"].items()})
    processor = VisionLLMv2Processor.from_pretrained(dst)
    batch, again = source["processor"](_samples()), processor(_samples())
    assert torch.equal(batch["input_ids"], again["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded(**again).logits, reference(**batch).logits)
    got, want = loaded.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    fresh = [k for k in want if not torch.equal(got[k], want[k])]
    assert fresh and all(k.startswith("keypoint.") and not k.startswith(PROJECTIONS) for k in fresh)
    assert loaded.config.token_ids == source["model"].config.token_ids
    report = json.loads((dst / "conversion.json").read_text())
    assert report["not_convertible"] == ["unipose.transformer.level_embed"]
    assert sorted(report["initialised"]) == sorted(source["leftover"])
    assert report["recomputed_buffers"] == source["index_buffers"] > 0  # the int64 Swin relative_position_index


def test_unmapped_and_missing_keys_fail_with_a_listing(source, tmp_path, capsys):
    folder = _copy_with(source["folder"], tmp_path / "official", add={"extra_head.weight": torch.zeros(2)},
                        drop=("vl_bridge.0.bias",))
    dst = tmp_path / "converted"
    assert main(["official", str(folder), str(dst), "--config", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "vl_bridge.0.bias" in err and "extra_head.weight" in err and "keypoint. [" in err
    assert not dst.exists()
    assert main(["official", str(folder), str(dst), "--config", "tiny", "--allow-missing", "keypoint",
                 "--allow-missing", "extra_head", "--allow-missing", "vl_bridge"]) == 1
    assert "only decoder and query-table weights" in capsys.readouterr().err
    folder = _copy_with(source["folder"], tmp_path / "official2", add={"extra_head.weight": torch.zeros(2)},
                        drop=("emb_embeddings_gen.weight",))
    assert main(["official", str(folder), str(dst), "--config", "tiny", "--allow-missing", "keypoint",
                 "--allow-missing", "extra_head", "--allow-missing", "emb_embeddings_gen"]) == 0
    report = json.loads((dst / "conversion.json").read_text())
    assert report["unmapped_dropped"] == ["extra_head.weight"] and "emb_embeddings_gen.weight" in report["initialised"]


def test_shape_mismatch_is_named(source, tmp_path, capsys):
    folder = _copy_with(source["folder"], tmp_path / "official", add={"vl_bridge.0.bias": torch.zeros(3)})
    assert main(["official", str(folder), str(tmp_path / "out"), "--config", "tiny", "--allow-missing",
                 "keypoint"]) == 1
    assert "vl_bridge.0.bias -> vl_bridge.0.bias: official (3,)" in capsys.readouterr().err


class Trap:
    """A pickled object whose unpickling would run code."""

    triggered: list[int] = []

    def __setstate__(self, state: dict) -> None:
        Trap.triggered.append(1)


def test_checkpoint_with_a_pickled_object_is_refused(source, tmp_path, capsys):
    trap = Trap()
    trap.armed = True  # a non-empty state makes unpickling call __setstate__
    folder = _copy_with(source["folder"], tmp_path / "official", add={"trap": trap})
    assert main(["official", str(folder), str(tmp_path / "out"), "--config", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "arbitrary unpickling" in err and "Trap" in err
    assert "pytorch_model-00002-of-00002.bin" in err
    assert Trap.triggered == []


# ------------------------------------------------------------------------------------------------------------ 7B


def _reconstructed_meta_manifest() -> tuple[dict[str, torch.Tensor], dict]:
    """The reconstructed official 7B keys as meta tensors (bf16; int64 for the listed buffers), and the file."""
    data = json.loads(RECONSTRUCTED_MANIFEST.read_text())
    int64 = set(data["int64"])
    tensors = {k: torch.empty(shape, dtype=torch.int64 if k in int64 else torch.bfloat16, device="meta")
               for k, shape in data["keys"].items()}
    return tensors, data


# Layer counts of the release's state dict as reference/visionllmv2-official.md section 7 lists them (an independent
# source: key ranges such as ``llm.model.layers.{0-31}``, not derived from our rename table).
REFERENCE_LAYER_COUNTS = {
    "vis_encoder.vision_model.encoder.layers.": 24,
    "llm.model.layers.": 32,
    "gdino.model.encoder.layers.": 6,
    "gdino.model.decoder.layers.": 6,
    "gdino.bbox_embed.": 6,
    "gdino.mask_embed.": 6,
    "gdino.model.mask_embed.layers.": 3,
    "gdino.patch2query.layers.": 3,
    "unipose.projection_llava.layers.": 3,
    "unipose.projection_kpt_llava.layers.": 3,
}


def _layer_counts(keys: Iterable[str]) -> dict[str, int]:
    """For each prefix of :data:`REFERENCE_LAYER_COUNTS`, how many distinct indices follow it in ``keys``."""
    return {prefix: len({key[len(prefix):].split(".", 1)[0] for key in keys if key.startswith(prefix)})
            for prefix in REFERENCE_LAYER_COUNTS}


def test_7b_preset_matches_the_reconstructed_official_key_manifest():
    """Every reconstructed official 7B tensor maps onto the 7B preset with its shape; ours are all filled except the
    keypoint decoder's own layers (UniPose is not our keypoint decoder)."""
    tensors, _ = _reconstructed_meta_manifest()
    assert _layer_counts(tensors) == REFERENCE_LAYER_COUNTS
    assert tuple(tensors["llm.model.embed_tokens.weight"].shape) == (32026, 4096)
    assert tuple(tensors["vl_bridge.0.weight"].shape) == (4096, 1024)
    assert tuple(tensors["region_encoder.mask_embedding.0.weight"].shape) == (64, 4, 7, 7)
    assert tuple(tensors["emb_embeddings_gen.weight"].shape) == (64, 4096)
    assert tuple(tensors["gdino.model.query_position_embeddings.weight"].shape) == (900, 256)
    assert tuple(tensors["gdino.patch2query.layers.0.weight"].shape) == (256, 4096)
    assert tuple(tensors["sd.llm2sd_mapper_queries"].shape) == (1, 77, 768)
    assert tuple(tensors["ip2p.sd_unet.conv_in.weight"].shape) == (320, 8, 3, 3)

    cfg = load_config("vllmv2-7b", LOCAL_PATHS_OFF)
    routes = cfg.route_table()
    ids = official_token_ids(routes)
    token_ids = {t: ids[t] for t in ("<image>", "<im_patch>", "<region>", *routes.route_tokens,
                                     *routes.placeholder_tokens)}
    llm = llm_config(cfg)
    llm.vocab_size = 32026
    model = build_target(cfg, llm.to_dict(), token_ids, torch.bfloat16)
    spec = TargetSpec.of(model)
    result = convert_tensors(tensors.items(), spec, torch.bfloat16)
    assert not result.unmapped and not result.unexpected and not result.errors, result.errors[:5]
    assert result.not_convertible == [f"gdino.model.mask_embed.layers.{i}.{p}" for i in range(3)
                                      for p in ("bias", "weight")]
    keypoint_own = {k for k in spec.canonical.values() if k.startswith("keypoint.") and not k.startswith(PROJECTIONS)}
    assert keypoint_own and set(result.missing) == keypoint_own
    assert len(result.recomputed) == sum(k.endswith("relative_position_index") for k in tensors)
    assert {k.split(".", 1)[0] for k in result.tensors} == {
        "vis_encoder", "llm", "vl_bridge", "region_encoder", "emb_embeddings_det", "emb_embeddings_pose",
        "emb_embeddings_gen", "emb_embeddings_edit", "gdino", "keypoint", "sd", "ip2p"}


# ------------------------------------------------------------------------------------------------------------ manifest


def build_reconstructed_official_7b_manifest() -> dict:
    """Reconstructed official 7B key names and shapes, from the reference's dimensions, the libraries' modules (meta
    device) and the inverse of our renames."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, LlamaConfig, LlamaForCausalLM)

    keys: dict[str, list[int]] = {}
    int64: list[str] = []

    def add(prefix: str, module: nn.Module | dict) -> None:
        state = module if isinstance(module, dict) else module.state_dict()
        keys.update({prefix + k: list(v.shape) for k, v in state.items()})

    def mlp(prefix: str, dims: list[int]) -> None:
        for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
            keys[f"{prefix}.layers.{i}.weight"], keys[f"{prefix}.layers.{i}.bias"] = [n_out, n_in], [n_out]

    with torch.device("meta"):
        # transformers 4's CLIPVisionModel wraps the tower in `vision_model.`
        add("vis_encoder.vision_model.", CLIPVisionModel(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
            patch_size=14)))
        add("llm.", LlamaForCausalLM(LlamaConfig(vocab_size=32026, hidden_size=4096, intermediate_size=11008,
                                                 num_hidden_layers=32, num_attention_heads=32,
                                                 max_position_embeddings=4096, tie_word_embeddings=False)))
        add("vl_bridge.", {"0.weight": torch.empty(4096, 1024), "0.bias": torch.empty(4096),
                           "2.weight": torch.empty(4096, 4096), "2.bias": torch.empty(4096)})
        region = {"0": (64, 4, 7, 7), "1": (64,), "3": (256, 64, 2, 2), "4": (256,), "6": (1024, 256, 1, 1)}
        for i, shape in region.items():
            out = shape[0]
            keys[f"region_encoder.mask_embedding.{i}.weight"] = list(shape)
            keys[f"region_encoder.mask_embedding.{i}.bias"] = [out]
        keys["region_encoder.up_dim.weight"], keys["region_encoder.up_dim.bias"] = [4096, 1024], [4096]
        for table, k in (("det", 4), ("pose", 4), ("gen", 64), ("edit", 64)):
            keys[f"emb_embeddings_{table}.weight"] = [k, 4096]
        _add_gdino(keys, int64, GroundingDinoForObjectDetection(GroundingDinoConfig()), mlp)
        mlp("unipose.projection_llava", [4096, 256, 256, 256])
        mlp("unipose.projection_kpt_llava", [4096, 256, 256, 256])
        for name, in_channels in (("sd", 4), ("ip2p", 8)):
            keys[f"{name}.emb_proj.0.weight"], keys[f"{name}.emb_proj.0.bias"] = [768, 4096], [768]
            keys[f"{name}.emb_proj.2.weight"], keys[f"{name}.emb_proj.2.bias"] = [768, 768], [768]
            keys[f"{name}.llm2sd_mapper_queries"] = [1, 77, 768]
            add(f"{name}.llm2sd_mapper.", nn.Transformer(768, 8, 1, 1, 3072, 0.0, batch_first=True, norm_first=True))
            add(f"{name}.sd_text_encoder.text_model.", CLIPTextModel(CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768)))
            add(f"{name}.sd_vae.", AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, sample_size=512))
            add(f"{name}.sd_unet.", UNet2DConditionModel(
                sample_size=64, in_channels=in_channels, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    return {
        "about": "VisionLLM v2 7B (OpenGVLab/VisionLLMv2) state-dict keys and shapes, reconstructed (not read from "
                 "the release). unipose.*: only the super-link projections are listed (the rest depends on the "
                 "UniPose config and does not convert).",
        "int64": sorted(int64),
        "keys": dict(sorted(keys.items())),
    }


def _add_gdino(keys: dict, int64: list, detector: nn.Module, mlp) -> None:
    """GroundingDINO as reconstructed: transformers' grounding-dino-tiny minus the text branch, under the transformers 4
    names (Swin without `swin.`, nn.MultiheadAttention in_proj), plus the stage-1 norm, mask head and patch2query."""
    swin_old = {"attention.q_proj": "attention.self.query", "attention.k_proj": "attention.self.key",
                "attention.v_proj": "attention.self.value", "attention.o_proj": "attention.output.dense",
                "attention.relative_position_bias.": "attention.self.", "mlp.fc1": "intermediate.dense",
                "mlp.fc2": "output.dense"}
    backbone = "model.backbone.conv_encoder.model."
    state = {k: list(v.shape) for k, v in detector.state_dict().items()}
    state.update({k: list(b.shape) for k, b in detector.named_buffers() if k.endswith("relative_position_index")})
    for key, shape in state.items():
        if key.startswith(("model.text_backbone.", "model.text_projection.")) or "swin.layernorm." in key:
            continue
        if key.startswith(backbone + "swin."):
            key = backbone + key[len(backbone + "swin."):]
            for new, old in swin_old.items():
                key = key.replace(new, old)
        for attention in (".self_attn.", ".encoder_attn_text."):  # nn.MultiheadAttention packs q, k, v
            head, _, tail = key.rpartition(attention)
            if head and tail.split(".")[0] in ("query", "key", "value"):
                key = f"{head}{attention}in_proj_{tail.split('.')[1]}"
                shape = [3 * shape[0], *shape[1:]]
        keys["gdino." + key] = shape
        if key.endswith("relative_position_index"):
            int64.append("gdino." + key)
    keys[f"gdino.{backbone}hidden_states_norms.stage1.weight"] = [96]
    keys[f"gdino.{backbone}hidden_states_norms.stage1.bias"] = [96]
    keys["gdino.model.lateral_convs.0.weight"] = [256, 96, 1, 1]
    keys["gdino.model.output_convs.0.weight"] = [256, 256, 3, 3]
    for conv in ("lateral_convs", "output_convs"):
        keys[f"gdino.model.{conv}.0.norm.weight"] = keys[f"gdino.model.{conv}.0.norm.bias"] = [256]
    keys["gdino.model.mask_features.weight"], keys["gdino.model.mask_features.bias"] = [256, 256, 1, 1], [256]
    mlp("gdino.model.mask_embed", [256, 256, 256, 256])
    for layer in range(6):
        mlp(f"gdino.mask_embed.{layer}", [256, 256, 256, 256])
    mlp("gdino.patch2query", [4096, 256, 256, 256])


if __name__ == "__main__":
    manifest = build_reconstructed_official_7b_manifest()
    RECONSTRUCTED_MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    RECONSTRUCTED_MANIFEST.write_text(json.dumps(manifest, separators=(",", ":")))
    print(f"wrote {RECONSTRUCTED_MANIFEST}: {len(manifest['keys'])} keys", file=sys.stderr)
