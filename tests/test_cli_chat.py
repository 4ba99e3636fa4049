"""``vllm2 chat`` in process: one-shot JSON, the REPL commands, clean errors, and ``--help`` of the commands."""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import pytest

from conftest import make_image
from vllm2.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SAMPLE = str(ROOT / "data" / "samples" / "shapes.png")
DEMO = str(ROOT / "data" / "samples" / "demo.json")
TOKENS = ["--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def reference():
    """The model and processor the CLI builds from ``--config configs/tiny.yaml`` (seed 0), for direct answers."""
    from vllm2.cli.common import load_model

    model, processor, untrained = load_model(argparse.Namespace(model=None, config=TINY, overrides=[], seed=0))
    assert untrained
    return model, processor


def _answer(reference, image: str, prompt: str, history=()) -> str:
    model, processor = reference
    return model.chat(processor, [image], [prompt], history=[list(history)], max_new_tokens=6)[0].text


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_one_shot_json(reference, tmp_path, capsys):
    code = main(["chat", "--config", TINY, "--image", SAMPLE, "--prompt", "What is in the image?", "--json",
                 "--out", str(tmp_path), *TOKENS])
    captured = capsys.readouterr()
    assert code == 0
    (turn,) = _json_lines(captured.out)
    assert turn["turn"] == 0 and turn["prompt"] == "What is in the image?" and isinstance(turn["outputs"], list)
    assert turn["text"] == _answer(reference, SAMPLE, "What is in the image?")
    assert "UNTRAINED" in captured.err


def test_repl_history_reset_image_and_quit(reference, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other.png"
    make_image(80, 60, seed=3).save(other)
    script = [
        "What is it?",
        "Tell me more.",  # sees the first turn
        "/reset",
        "Tell me more.",  # fresh history
        f"/image {tmp_path / 'missing.png'}",  # reported, the session goes on
        f"/image {other}",  # new image, fresh history
        "What is it?",
        "/quit",
        "never answered",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(script) + "\n"))
    code = main(["chat", "--config", TINY, "--image", SAMPLE, "--json", "--out", str(tmp_path / "out"), *TOKENS])
    captured = capsys.readouterr()
    assert code == 0
    turns = _json_lines(captured.out)
    assert [t["turn"] for t in turns] == [0, 1, 2, 3]
    assert [t["prompt"] for t in turns] == ["What is it?", "Tell me more.", "Tell me more.", "What is it?"]
    first = _answer(reference, SAMPLE, "What is it?")
    history = [("user", "<image>\nWhat is it?"), ("assistant", first)]
    assert turns[0]["text"] == first
    assert turns[1]["text"] == _answer(reference, SAMPLE, "Tell me more.", history)
    assert turns[2]["text"] == _answer(reference, SAMPLE, "Tell me more.")
    assert turns[3]["text"] == _answer(reference, str(other), "What is it?")
    assert "missing.png" in captured.err and "does not exist" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("args, named", [
    (["--image", "no/such/image.png"], "no/such/image.png"),
    (["--image", SAMPLE, "--region", "1,2,3"], "--region"),
    (["--image", SAMPLE, "--point", "500,5"], "outside"),
])
def test_bad_input_is_a_clean_error(args, named, tmp_path, capsys):
    code = main(["chat", "--config", TINY, "--prompt", "What is it?", "--out", str(tmp_path), *args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and named in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_corrupt_image_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    assert main(["chat", "--config", TINY, "--image", str(bad), "--prompt", "What is it?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.png" in err and "Traceback" not in err


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "chat" in out and "demo" in out
    assert main(["no-such-command"]) == 2
    assert "subcommands:" in capsys.readouterr().out
    for command, flags in [("chat", ["--prompt", "--image", "--json", "REPL"]),
                           ("demo", ["--host", "127.0.0.1", "--port", "--max-file-size", "UNTRAINED"]),
                           ("tower", ["pretrain", "probe", "ClipLoss", "vision.pretrained"])]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: vllm2 {command}") and all(flag in out for flag in flags)


def test_batch_file_answers_like_one_at_a_time(reference, tmp_path, capsys):
    """``--batch``: every item answered in one batched call, each as it would be alone (image or none)."""
    prompts = ["What is in the image?", "Generate image with caption: a red circle."]
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([{"image": SAMPLE, "prompt": prompts[0]}, {"image": None, "prompt": prompts[1]}]))
    code = main(["chat", "--config", TINY, "--batch", str(batch), "--json", "--out", str(tmp_path / "out"), *TOKENS])
    assert code == 0
    items = _json_lines(capsys.readouterr().out)
    model, processor = reference
    alone = model.chat(processor, [None], [prompts[1]], max_new_tokens=6)[0].text
    assert [(i["item"], i["prompt"]) for i in items] == [(0, prompts[0]), (1, prompts[1])]
    assert [i["text"] for i in items] == [_answer(reference, SAMPLE, prompts[0]), alone]
    written = _json_lines((tmp_path / "out" / "answers.jsonl").read_text())
    assert written == items and written[0]["image"] == SAMPLE and written[1]["image"] is None


def test_batch_items_with_expect_are_judged(tmp_path, capsys):
    """The demo file on a tiny random model: one judged line per item (task, right/wrong, reason), the total, and
    ``right`` / ``reason`` in answers.jsonl; answers the judges cannot read are wrong, never a crash."""
    code = main(["chat", "--config", TINY, "--batch", DEMO, "--out", str(tmp_path), *TOKENS])
    out = capsys.readouterr().out
    assert code == 0
    tasks = [item["task"] for item in json.loads(Path(DEMO).read_text())]
    judged = out[out.index("judged against each item's 'expect':"):].splitlines()
    assert len(judged) == len(tasks) + 2
    verdicts = [re.fullmatch(r"  (\w+) +(right|wrong)  (.+)", line) for line in judged[1:-1]]
    assert all(verdicts) and [v[1] for v in verdicts] == tasks
    rights = sum(v[2] == "right" for v in verdicts)
    assert judged[-1] == f"{rights} of {len(tasks)} right"
    written = _json_lines((tmp_path / "answers.jsonl").read_text())
    assert [(w["task"], w["right"], w["reason"]) for w in written] == [(v[1], v[2] == "right", v[3]) for v in verdicts]


@pytest.mark.parametrize("content, message", [
    ('[{"prompt": "a", "expect": {"rule": "guess"}}]', "item 0: 'expect' must be an object whose 'rule'"),
    ('[{"image": null}]', "item 0 needs a string 'prompt'"),
    ('[]', "has no items"),
    ('{"prompt": "a"}\n{oops', "neither a JSON list nor JSON lines"),
    ('[{"image": "missing.png", "prompt": "a"}]', "missing.png"),
])
def test_batch_file_errors_name_the_file_and_item(tmp_path, capsys, content, message):
    batch = tmp_path / "batch.json"
    batch.write_text(content)
    assert main(["chat", "--config", TINY, "--batch", str(batch), *TOKENS]) == 2
    assert message in capsys.readouterr().err
