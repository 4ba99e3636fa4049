"""The route table: official defaults, configuration, validation and binding to token ids."""

from __future__ import annotations

import pytest
import torch

from superlink import PLACEHOLDER_TOKENS, Route, RouteTable, placeholder_sequence


def _ids(table: RouteTable, first: int = 80) -> dict[str, int]:
    return {t: first + i for i, t in enumerate(table.route_tokens + table.placeholder_tokens)}


def test_default_table_is_official() -> None:
    table = RouteTable.default()
    assert table.route_tokens == ("[DET]", "[GRD]", "[SEG]", "[POSE]", "[GEN]", "[EDIT]")
    assert table.placeholder_tokens == ("[EMB]", "[EMB2]", "[EMB3]", "[EMB4]", "[EMB5]", "[EMB6]", "[EMB7]", "[EMB8]")
    assert table.tables == {"det": 4, "pose": 4, "gen": 64, "edit": 64}
    assert table.decoders == ["gdino", "keypoint", "sd", "ip2p"]
    assert [table.route(t).decoder for t in ("[DET]", "[SEG]", "[GRD]")] == ["gdino"] * 3
    assert table.route("[POSE]").absorbs == ("[DET]",)
    assert table.answer_suffix("[DET]") == "[DET][EMB][EMB2][EMB3][EMB4]"
    assert table.answer_suffix("[GEN]") == "[GEN]" + "[EMB]" * 64
    assert table.decoder_num_embs("sd") == 64


def test_placeholder_sequence_rule() -> None:
    assert placeholder_sequence(1) == ("[EMB]",)
    assert placeholder_sequence(8) == PLACEHOLDER_TOKENS
    assert placeholder_sequence(9) == ("[EMB]",) * 9


def test_config_round_trip_add_route_change_k_drop_decoder() -> None:
    config = RouteTable.default().to_config()
    assert RouteTable.from_config(config) == RouteTable.default()
    for entry in config:
        if entry["table"] == "det":
            entry["num_embs"] = 6
    config[3]["num_embs"] = 6  # [POSE] absorbs [DET]: same K
    config.append({"token": "[OCR]", "decoder": "ocr", "num_embs": 2})
    table = RouteTable.from_config(config)
    assert table.answer_suffix("[SEG]") == "[SEG][EMB][EMB2][EMB3][EMB4][EMB5][EMB6]"
    assert table.route("[OCR]").table == "ocr"  # table defaults to the decoder name
    assert table.tables == {"det": 6, "pose": 6, "gen": 64, "edit": 64, "ocr": 2}
    reduced = table.without_decoders(["gdino", "ocr"])
    assert reduced.route_tokens == ("[POSE]", "[GEN]", "[EDIT]")
    assert reduced.route("[POSE]").absorbs == ()
    assert reduced.decoders == ["keypoint", "sd", "ip2p"]


def test_legacy_num_queries_key_is_read_as_num_embs() -> None:
    """Older configs and saved models name a route's K ``num_queries``; both names agreeing is accepted too."""
    legacy = [{("num_queries" if key == "num_embs" else key): value for key, value in entry.items()}
              for entry in RouteTable.default().to_config()]
    assert RouteTable.from_config(legacy) == RouteTable.default()
    both = [{"token": "[A]", "decoder": "x", "num_queries": 3, "num_embs": 3}]
    assert RouteTable.from_config(both).route("[A]").num_embs == 3
    assert "num_queries" not in RouteTable.from_config(both).to_config()[0]
    assert both[0]["num_queries"] == 3  # the caller's dicts are left as they are
    with pytest.raises(ValueError, match=r"routes\[1\] \('\[B\]'\): num_queries=3 \(the old name of num_embs\) and "
                                         r"num_embs=4 differ"):
        RouteTable.from_config([{"token": "[A]", "decoder": "x", "num_embs": 4},
                                {"token": "[B]", "decoder": "y", "num_queries": 3, "num_embs": 4}])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"token": "[A]", "decoder": "x", "num_embs": 4, "table": "t"},
          {"token": "[B]", "decoder": "y", "num_embs": 8, "table": "t"}], "share table 't'"),
        ([{"token": "[A]", "decoder": "x", "num_embs": 4, "table": "t"},
          {"token": "[B]", "decoder": "x", "num_embs": 8, "table": "u"}], "share decoder 'x'"),
        ([{"token": "[A]", "decoder": "x", "num_embs": 4}, {"token": "[A]", "decoder": "y", "num_embs": 4}],
         "duplicate route token"),
        ([{"token": "[A]", "decoder": "x", "num_embs": 4, "k": 3}], "unknown key"),
        ([{"token": "[A]", "decoder": "x"}], "missing key"),
        ([{"token": "[A]", "decoder": "x", "num_embs": 0}], "num_embs must be a positive int"),
        ([{"token": "[EMB3]", "decoder": "x", "num_embs": 4}], "is a placeholder token"),
        ([{"token": "[A]", "decoder": "x", "num_embs": 4, "absorbs": ["[Z]"]}], "absorbs unknown"),
        ([{"token": "[A]", "decoder": "x", "num_embs": 4, "absorbs": ["[B]"]},
          {"token": "[B]", "decoder": "y", "num_embs": 8}], "must share num_embs"),
        ([{"token": "[A]", "decoder": "x", "num_embs": 4, "absorbs": ["[C]"]},
          {"token": "[B]", "decoder": "y", "num_embs": 4, "absorbs": ["[C]"]},
          {"token": "[C]", "decoder": "z", "num_embs": 4}], "absorbed by both"),
        ([{"token": "[A]", "decoder": "x", "num_embs": 4, "absorbs": ["[B]"]},
          {"token": "[B]", "decoder": "y", "num_embs": 4, "absorbs": ["[C]"]},
          {"token": "[C]", "decoder": "z", "num_embs": 4}], "absorbs others and is absorbed"),
        ({"token": "[A]"}, "must be a list"),
    ],
)
def test_invalid_config_raises(entries: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouteTable.from_config(entries)  # type: ignore[arg-type]


def test_unknown_names_raise() -> None:
    table = RouteTable.default()
    with pytest.raises(ValueError, match="unknown decoder"):
        table.without_decoders(["nope"])
    with pytest.raises(KeyError, match="unknown route token"):
        table.answer_suffix("[NOPE]")
    with pytest.raises(ValueError, match="absorbs must be a list"):
        Route("[A]", "x", 4, "t", absorbs="[B]")  # type: ignore[arg-type]


def test_bind_tensors() -> None:
    table = RouteTable.default()
    ids = _ids(table)
    bound = table.bind(ids.__getitem__)
    assert bound.route_ids.tolist() == [80, 81, 82, 83, 84, 85]
    assert bound.num_embs.tolist() == [4, 4, 4, 4, 64, 64]
    assert bound.table_offset.tolist() == [0, 0, 0, 4, 8, 72]
    assert bound.total_queries == 136
    assert bound.decoder_index.tolist() == [0, 0, 0, 1, 2, 3]
    assert bound.absorber.tolist() == [3, -1, -1, -1, -1, -1]
    assert bound.placeholder_ids.tolist() == list(range(86, 94))
    assert bound.query_ids[0, :5].tolist() == [86, 87, 88, 89, -1]
    assert bound.query_ids[4].tolist() == [86] * 64
    assert bound.k_by_id == {80: 4, 81: 4, 82: 4, 83: 4, 84: 64, 85: 64}
    probe = torch.tensor([[-100, 0, 80, 85, 86, 1000]])
    assert bound.route_index(probe).tolist() == [[-1, -1, 0, 5, -1, -1]]
    assert bound.is_placeholder(probe).tolist() == [[False, False, False, False, True, False]]


def test_bind_rejects_missing_or_shared_ids() -> None:
    table = RouteTable.default()
    ids = _ids(table)
    unk = {**ids, "[EMB8]": 0, "[POSE]": 0}
    with pytest.raises(ValueError, match="map to the same id 0"):
        table.bind(unk.__getitem__)
    with pytest.raises(ValueError, match=r"token '\[GEN\]' has no valid id"):
        table.bind(lambda t: None if t == "[GEN]" else ids[t])  # type: ignore[arg-type, return-value]
