"""Config presets, overrides, unknown keys, and the HF config round trip."""

from __future__ import annotations

import pytest

from superlink import RouteTable
from vllm2 import VLLM2Config, load_config
from vllm2.config import config_from_dict, config_to_dict


def test_presets_load():
    tiny = load_config("tiny")
    big = load_config("vllmv2-7b")
    assert tiny.llm.hidden_size == 64 and tiny.vision.image_size == 56
    assert big.vision.image_size == 336 and big.vision.max_tiles == 4 and big.vision.output_layer == -2
    assert big.llm.hidden_size == 4096 and big.bridge.type == "mlp2x_gelu"


def test_overrides_are_typed():
    cfg = load_config("tiny", ["llm.num_layers=3", "vision.freeze=false", "training.learning_rate=3e-4",
                               "llm.lora.target_modules=[q_proj]"])
    assert cfg.llm.num_layers == 3 and cfg.vision.freeze is False and cfg.training.learning_rate == 3e-4
    assert cfg.llm.lora.target_modules == ("q_proj",)


def test_unknown_key_is_named():
    with pytest.raises(KeyError, match="llm.num_layerz"):
        load_config("tiny", ["llm.num_layerz=3"])
    with pytest.raises(KeyError, match="visoin"):
        load_config("tiny", ["visoin.image_size=3"])


def test_wrong_type_is_named():
    with pytest.raises(ValueError, match="llm.num_layers"):
        load_config("tiny", ["llm.num_layers=abc"])


def test_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        load_config("no_such.yaml")


def test_yaml_base_merge(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny\nllm:\n  num_layers: 5\n")
    cfg = load_config(path)
    assert cfg.llm.num_layers == 5 and cfg.llm.hidden_size == 64


def test_dict_round_trip():
    cfg = load_config("tiny", ["training.loss_weights={gdino: 2.0}"])
    again = config_from_dict(VLLM2Config, config_to_dict(cfg))
    assert again == cfg


def test_legacy_num_queries_keys_load():
    """An older config (or a saved model's): routes name K ``num_queries`` and ``decoders.sd`` / ``ip2p`` repeat it
    under that name. Both load; a repeated K that disagrees with the routes is an error naming the key."""
    legacy = [{("num_queries" if key == "num_embs" else key): value for key, value in entry.items()}
              for entry in RouteTable.default().to_config()]
    data = {"superlink": {"routes": legacy},
            "decoders": {"gdino": {"num_queries": 20}, "sd": {"num_queries": 64}, "ip2p": {"num_queries": 64}}}
    cfg = config_from_dict(VLLM2Config, data)
    assert cfg.route_table() == RouteTable.default() and cfg.decoders["gdino"].num_queries == 20  # DETR proposals
    assert not hasattr(cfg.decoders["sd"], "num_queries") and config_from_dict(VLLM2Config, config_to_dict(cfg)) == cfg
    assert data["decoders"]["sd"] == {"num_queries": 64}  # the caller's dicts are left as they are
    load_config("shapes", ["decoders.ip2p.num_queries=4"])  # the K of the shapes routes
    with pytest.raises(ValueError, match=r"config key decoders\.sd\.num_queries: 8 differs from num_embs=64 of the "
                                         r"routes \['\[GEN\]'\] of decoder 'sd'"):
        load_config("tiny", ["decoders.sd.num_queries=8"])
    with pytest.raises(ValueError, match=r"decoders\.ip2p\.num_queries: 64 differs from num_embs=4"):
        load_config("shapes", ["decoders.ip2p.num_queries=64"])


def test_a_null_in_a_file_restores_the_default_over_its_base(tmp_path):
    (tmp_path / "stage.yaml").write_text(
        "base: tiny\ntraining: {lr_multipliers: null, loss_weights: {gdino: 0.5}}\ndecoders: {sd: null}\n")
    (tmp_path / "base.yaml").write_text("base: tiny\ntraining: {lr_multipliers: {llm: 0.1}}\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntraining: {lr_multipliers: null}\n")
    cfg = load_config(tmp_path / "stage.yaml")
    assert cfg.training.lr_multipliers == {} and cfg.training.loss_weights == {"gdino": 0.5}
    assert "sd" not in cfg.decoders and "ip2p" in cfg.decoders
    assert load_config(tmp_path / "base.yaml").training.lr_multipliers == {"llm": 0.1}
    assert load_config(tmp_path / "top.yaml").training.lr_multipliers == {}


def test_deepspeed_config_by_file_or_shipped_name(tmp_path):
    from vllm2.config import CONFIG_DIR, resolve_deepspeed

    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_deepspeed(str(own)) == str(own)
    assert resolve_deepspeed("zero3_offload") == str(CONFIG_DIR / "deepspeed" / "zero3_offload.json")
    with pytest.raises(FileNotFoundError, match=r"training.deepspeed: 'zero9' .*\['zero2', 'zero3', 'zero3_offload'\]"):
        resolve_deepspeed("zero9")
