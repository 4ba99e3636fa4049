"""Chat runs the model's own routes: forced routes reach their decoders, results are drawn, errors become messages."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    assert [r.outputs[0].unconfigured for r in results] == [True, False]
    for prompt, plan, error in (("Draw a cat.", force.plans[0], "no decoder 'sd' is configured for the route"),
                                ("Find it.", force.plans[1], "out of memory")):  # strict: the decoder's own exception
        with pytest.raises(ValueError if "sd" in error else RuntimeError, match=error):
            model.chat(tiny_processor, [IMAGE], [prompt], max_new_tokens=6, raise_decoder_errors=True,
                       logits_processor=Force({0: plan}, tok.eos_token_id))


def test_per_prompt_token_budgets_equal_separate_calls(tiny_cfg, tiny_processor):
    model = build_model(tiny_cfg).eval()
    eos = tiny_processor.tokenizer.eos_token_id
    ends = Force({1: tiny_processor.tokenizer.encode(" a b", add_special_tokens=False)}, eos)  # writes 2 + eos
    batched = model.chat(tiny_processor, [IMAGE, None, None], ["What is it?", "Say a b.", "Hi"],
                         max_new_tokens=[3, 6, 5], logits_processor=ends)
    alone = [model.chat(tiny_processor, [im], [p], max_new_tokens=n, logits_processor=f)[0]
             for im, p, n, f in ((IMAGE, "What is it?", 3, None), (None, "Say a b.", 6, Force({0: ends.plans[1]}, eos)),
                                 (None, "Hi", 5, None))]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.num_tokens for r in batched] == [3, 3, 5] == [r.num_tokens for r in alone]
    assert [r.finish_reason for r in batched] == ["length", "stop", "length"]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in alone]


def test_a_decoder_failure_stays_with_its_sample(tiny_cfg, tiny_processor, monkeypatch):
    model = build_model(tiny_cfg).eval()
    tok = tiny_processor.tokenizer
    plan = _plan(tiny_processor, " it", "det")
    bad = tiny_processor._load(IMAGE).resize((40, 40))
    predict = model.gdino.predict

    def flaky(queries, mask, inputs, *args, **kwargs):
        if [40, 40] in inputs["orig_sizes"].tolist():
            raise RuntimeError("boom")
        return predict(queries, mask, inputs, *args, **kwargs)

    alone = model.chat(tiny_processor, [IMAGE], ["Find it."], max_new_tokens=4,
                       logits_processor=Force({0: plan}, tok.eos_token_id))[0]
    monkeypatch.setattr(model.gdino, "predict", flaky)
    failed, fine = model.chat(tiny_processor, [bad, IMAGE], ["Find it.", "Find it."], max_new_tokens=4,
                              logits_processor=Force({0: plan, 1: plan}, tok.eos_token_id))
    assert failed.outputs[0].error == "decoder 'gdino' failed: boom" and failed.outputs[0].result is None
    assert fine.outputs[0].error is None
    torch.testing.assert_close(fine.outputs[0].result["boxes"], alone.outputs[0].result["boxes"], atol=1e-3, rtol=0)
