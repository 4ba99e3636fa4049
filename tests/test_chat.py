"""Chat runs the model's own routes: forced routes reach their decoders, results are drawn, errors become messages."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm2 import build_model, load_config
from vllm2.cli.chat import save_outputs

IMAGE = "data/samples/shapes.png"


class Force:
    """A logits processor that makes chosen samples write chosen token ids, then end."""

    def __init__(self, plans: dict[int, list[int]], eos: int) -> None:
        self.plans, self.eos = plans, eos

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = history.shape[1]
        forced = scores.clone()
        for b, plan in self.plans.items():
            forced[b] = float("-inf")
            forced[b, plan[step] if step < len(plan) else self.eos] = 0.0
        return forced


def _plan(processor, text: str, task: str) -> list[int]:
    tok, routes = processor.tokenizer, processor.routes
    return tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids(routes.route_for_task(task))]


def test_forced_detection_route_runs_gdino_and_draws(tiny_cfg, tiny_processor, tmp_path):
    model = build_model(tiny_cfg).eval()
    tok = tiny_processor.tokenizer
    force = Force({1: _plan(tiny_processor, " the square", "det")}, tok.eos_token_id)
    results = model.chat(tiny_processor, [IMAGE, IMAGE, None], ["What is it?", "Find the square.", "Hi"],
                         max_new_tokens=8, logits_processor=force)
    assert [len(r.outputs) for r in results] == [0, 1, 0]
    out = results[1].outputs[0]
    det = tiny_processor.routes.route_for_task("det")
    assert (out.route, out.decoder, out.phrases, out.error) == (det, "gdino", ["square"], None)
    assert out.result["boxes"].shape[1] == 4 and len(out.result["scores"]) == len(out.result["boxes"])
    assert results[1].text.startswith("the square" + det)
    paths = save_outputs(results[1], tiny_processor._load(IMAGE), tmp_path, "t")
    assert len(paths) == 1 and paths[0].endswith("_gdino.png") and Path(paths[0]).is_file()


def test_batched_chat_equals_one_at_a_time(tiny_cfg, tiny_processor):
    model = build_model(tiny_cfg).eval()
    tok = tiny_processor.tokenizer
    plan = _plan(tiny_processor, " the circle", "det")
    batched = model.chat(tiny_processor, [IMAGE, None], ["Find the circle.", "Hello"], max_new_tokens=6,
                         logits_processor=Force({0: plan}, tok.eos_token_id))
    single = model.chat(tiny_processor, [IMAGE], ["Find the circle."], max_new_tokens=6,
                        logits_processor=Force({0: plan}, tok.eos_token_id))
    alone = model.chat(tiny_processor, [None], ["Hello"], max_new_tokens=6)
    assert batched[0].text == single[0].text and batched[1].text == alone[0].text
    torch.testing.assert_close(batched[0].outputs[0].result["scores"], single[0].outputs[0].result["scores"],
                               atol=1e-4, rtol=1e-4)


def test_unconfigured_decoder_and_failing_decoder_become_messages(tiny_processor, monkeypatch):
    cfg = load_config("tiny", ["decoders.sd=null"])
    model = build_model(cfg).eval()
    tok = tiny_processor.tokenizer
    force = Force({0: _plan(tiny_processor, " here", "t2i"), 1: _plan(tiny_processor, " a", "det")}, tok.eos_token_id)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model.gdino, "predict", broken)
    results = model.chat(tiny_processor, [None, IMAGE], ["Draw a cat.", "Find it."], max_new_tokens=6,
                         logits_processor=force)
    assert "no decoder 'sd' is configured" in results[0].outputs[0].error
    assert "decoder 'gdino' failed: out of memory" in results[1].outputs[0].error
    assert results[1].outputs[0].result is None
