"""Special tokens: official order, one id each, added once; template label spans."""

from __future__ import annotations

from vllm2.conversation import get_template
from vllm2.tokenizer import add_special_tokens, build_tiny_tokenizer, load_tokenizer, special_tokens

from superlink import RouteTable


def test_official_order_and_count():
    tokens = special_tokens(RouteTable.default())
    assert len(tokens) == 26
    assert tokens[:4] == ["[PAD]", "<image>", "<im_patch>", "<region>"]
    assert tokens[12:18] == ["[DET]", "[GRD]", "[SEG]", "[POSE]", "[GEN]", "[EDIT]"]
    assert tokens[18:] == ["[EMB]"] + [f"[EMB{i}]" for i in range(2, 9)]


def test_each_special_token_is_one_id_and_ids_are_contiguous():
    routes = RouteTable.default()
    tok = load_tokenizer(None, routes=routes)
    base = len(build_tiny_tokenizer())
    for offset, token in enumerate(special_tokens(routes)):
        assert tok.encode(token, add_special_tokens=False) == [base + offset]
        assert tok.convert_tokens_to_ids(token) == base + offset
    text = "person[DET][EMB][EMB2][EMB3][EMB4] and <image>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[-1] == tok.convert_tokens_to_ids("<image>")


def test_adding_twice_adds_nothing():
    routes = RouteTable.default()
    tok = load_tokenizer(None, routes=routes)
    size = len(tok)
    assert add_special_tokens(tok, routes) == 0 and len(tok) == size


def test_tiny_tokenizer_is_deterministic():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()


def test_template_supervises_only_answers():
    segs = get_template("vicuna_v1").segments([("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                                                ("assistant", "a2")], eos="</s>")
    assert [s for _, s in segs] == [False, True, False, True]
    text = "".join(t for t, _ in segs)
    assert text.endswith("USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>")
    assert text.startswith("A chat between a curious user")
