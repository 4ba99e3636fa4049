"""``vllm2 serve`` through the real ``openai`` client against a tiny model served on loopback by uvicorn.

Served answers are compared with direct ``chat()`` calls on the same model; routes are forced with ``logit_bias``
(per request) or with the server-wide test logits processor :class:`Gate`, which can also hold the worker inside a
batch so that later requests queue up deterministically.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import make_image
from vllm2 import build_model
from vllm2.chat import history_text
from vllm2.serve import ServeOptions, create_app

KEY = "test-key"
NAME = "tiny"
CAP = 16
EXT = "vllm2_outputs"


class Gate:
    """The server's logits processor in these tests: it can hold the worker inside its next call until released,
    and can force every row to write ``plan`` (token ids), then end."""

    def __init__(self, eos: int) -> None:
        self.eos, self.plan, self.armed = eos, None, False
        self.entered, self.release = threading.Event(), threading.Event()

    def arm(self) -> None:
        self.entered.clear()
        self.release.clear()
        self.armed = True

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.release.wait(30)
        if self.plan is None:
            return scores
        step = history.shape[1]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.plan[step] if step < len(self.plan) else self.eos] = 0.0
        return forced


class Bias:
    """The reference for ``logit_bias``: +100 on chosen ids."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids] += 100.0
        return scores


class Running:
    """An app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg).eval()


@pytest.fixture(scope="module")
def served(model, tiny_processor, tmp_path_factory):
    gate = Gate(tiny_processor.tokenizer.eos_token_id)
    root = tmp_path_factory.mktemp("allowed")
    options = ServeOptions(model_name=NAME, api_key=KEY, allow_paths=(root,), max_tokens_cap=CAP,
                           max_request_bytes=2**20, batch_wait_ms=20, gen_kwargs={"logits_processor": gate})
    running = Running(create_app(model, tiny_processor, options))
    running.gate, running.root = gate, root
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def gate(served):
    served.gate.plan = None
    yield served.gate
    served.gate.plan, served.gate.armed = None, False
    served.gate.release.set()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image | bytes, mime: str = "image/png") -> str:
    data = image if isinstance(image, bytes) else png_bytes(image)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text: str, *images: Image.Image | str) -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": im if isinstance(im, str) else data_url(im)}} for im in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def token_id(processor, token: str) -> int:
    return processor.tokenizer.convert_tokens_to_ids(token)


def direct(model, processor, image, prompt, max_tokens, bias=(), history=None):
    """The answer of a direct ``chat()`` call, one request alone."""
    return model.chat(processor, [image], [prompt], history=[history or []], max_new_tokens=max_tokens,
                      logits_processor=Bias(list(bias)) if bias else None)[0]


def assert_same_boxes(served: dict[str, Any], result: dict[str, torch.Tensor]) -> None:
    np.testing.assert_allclose(np.reshape(served["boxes"], (-1, 4)), result["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(served["scores"], result["scores"].numpy(), atol=1e-4)
    assert served["labels"] == result["labels"].tolist()


def post(served, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.post(f"{served.url}{path}", headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)


# ------------------------------------------------------------------------------------------------ answers


def test_text_answer_equals_direct_chat(client, model, tiny_processor, gate):
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=6)
    expected = direct(model, tiny_processor, None, "Hello there", 6)
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == expected.finish_reason and choice.model_extra[EXT] == []
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens,
                                                                           expected.num_tokens)
    assert reply.model == NAME and reply.object == "chat.completion"


def test_models_and_health(client, served):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok" and health["model"] == NAME and len(health["batches"]) == 1
    assert health["replicas_alive"] == [True]


def _rle_masks(rles: list[dict[str, Any]]) -> np.ndarray:
    return np.stack([mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()}) for m in rles]).astype(bool)


def test_forced_routes_carry_boxes_and_masks(client, model, tiny_processor, gate):
    image = make_image(64, 48, seed=1)
    outputs = {}
    for route in ("[DET]", "[SEG]"):
        bias = [token_id(tiny_processor, route)]
        reply = client.chat.completions.create(model=NAME, messages=[user("Segment the shapes.", image)],
                                               max_tokens=1, logit_bias={str(bias[0]): 100})
        expected = direct(model, tiny_processor, image, "<image>\nSegment the shapes.", 1, bias)
        assert reply.choices[0].message.content == expected.text == route
        (outputs[route],) = reply.choices[0].model_extra[EXT]
        assert (outputs[route]["route"], outputs[route]["decoder"], outputs[route]["error"]) == (route, "gdino", None)
        outputs[route + "ref"] = expected.outputs[0].result
    det, ref = outputs["[DET]"], outputs["[DET]ref"]
    assert len(det["boxes"]) == len(ref["boxes"]) > 0
    assert_same_boxes(det, ref)
    np.testing.assert_array_equal(_rle_masks(det["masks"]), ref["masks"].numpy())  # [n, 48, 64]
    semantic, ref = outputs["[SEG]"]["semantic"], outputs["[SEG]ref"]["semantic"].numpy()
    assert [g["label"] for g in semantic] == sorted(set(np.unique(ref)) - {-1})
    np.testing.assert_array_equal(_rle_masks([g["mask"] for g in semantic]),
                                  np.stack([ref == g["label"] for g in semantic]))


def test_history_keeps_route_placeholders(client, model, tiny_processor, gate):
    image = make_image(64, 48, seed=2)
    det = token_id(tiny_processor, "[DET]")
    first = client.chat.completions.create(model=NAME, messages=[user("Find the shapes.", image)], max_tokens=1,
                                           logit_bias={str(det): 100})
    answer = first.choices[0].message.content
    assert answer == "[DET]"
    messages = [user("Find the shapes.", image), {"role": "assistant", "content": answer},
                {"role": "user", "content": "Describe them."}]
    second = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5)
    history = [("user", "<image>\nFind the shapes."), ("assistant", history_text(answer, tiny_processor.routes))]
    expected = model.chat(tiny_processor, [image], ["Describe them."], history=[history], max_new_tokens=5)[0]
    assert "[EMB]" in history[1][1]  # the placeholders are back in the turn the model sees
    assert second.choices[0].message.content == expected.text
    assert second.usage.prompt_tokens == expected.prompt_tokens


def test_streaming_deltas_and_final_outputs(client, tiny_processor, gate):
    image = make_image(64, 48, seed=3)
    det = token_id(tiny_processor, "[DET]")
    request = dict(model=NAME, messages=[user("Where are they?", image)], max_tokens=3, logit_bias={str(det): 100})
    whole = client.chat.completions.create(**request)
    events = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole.choices[0].message.content == "[DET][DET][DET]"
    final = [e for e in events if e.choices and e.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert final[0].choices[0].model_extra[EXT] == whole.choices[0].model_extra[EXT]
    assert len(whole.choices[0].model_extra[EXT][0]["boxes"]) > 0
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({e.id for e in events}) == 1


def _decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_image_generation_and_edit(client, model, tiny_processor, gate):
    gen, edit = token_id(tiny_processor, "[GEN]"), token_id(tiny_processor, "[EDIT]")
    gate.plan = [gen]
    made = client.images.generate(model=NAME, prompt="a red circle")
    reference = model.chat(tiny_processor, [None], ["Generate image with caption: a red circle."], max_new_tokens=4,
                           logits_processor=gate)[0].outputs[0].result
    np.testing.assert_array_equal(_decoded(made.data[0].b64_json), np.asarray(reference))
    source = make_image(40, 30, seed=4)
    gate.plan = [edit]
    edited = client.images.edit(model=NAME, image=("in.png", png_bytes(source), "image/png"),
                                prompt="make the square blue")
    reference = model.chat(tiny_processor, [source], ["Edit the image according to the caption: make the square "
                                                      "blue."], max_new_tokens=4, logits_processor=gate)[0]
    np.testing.assert_array_equal(_decoded(edited.data[0].b64_json), np.asarray(reference.outputs[0].result))
    assert _decoded(edited.data[0].b64_json).shape == (30, 40, 3)


def test_images_without_the_route_are_a_clear_error(client, tiny_processor, gate):
    gate.plan = [token_id(tiny_processor, "[DET]")]
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model=NAME, prompt="a red circle")
    assert err.value.body["code"] == "not_routed" and err.value.body["param"] == "prompt"
    assert "[GEN]" in err.value.body["message"] and "'[DET]'" in err.value.body["message"]


# ------------------------------------------------------------------------------------------------ bad requests


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12000, 8000)).save(buffer, format="PNG")  # 96M pixels in 12 kB
    return buffer.getvalue()


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


IMAGE_URL = "messages[0].content[0].image_url.url"
BAD_CHAT = {
    "not an image": (_chat(messages=[user("Hi", data_url(b"hello"))]), IMAGE_URL, "invalid_image"),
    "decompression bomb": (_chat(messages=[user("Hi", data_url(_bomb()))]), IMAGE_URL, "image_too_large"),
    "data URL not an image type": (_chat(messages=[user("Hi", data_url(b"hi", "text/plain"))]), IMAGE_URL,
                                   "invalid_content_type"),
    "bad base64": (_chat(messages=[user("Hi", "data:image/png;base64,@@@")]), IMAGE_URL, "invalid_image"),
    "remote URL": (_chat(messages=[user("Hi", "https://example.com/a.png")]), IMAGE_URL, "unsupported_url"),
    "path outside the roots": (_chat(messages=[user("Hi", "/etc/passwd")]), IMAGE_URL, "path_not_allowed"),
    "no messages": (_chat(messages=[]), "messages", "missing_messages"),
    "missing messages": ({"model": NAME}, "messages", "missing_field"),
    "unknown model": (_chat(model="gpt-4o"), "model", "model_not_found"),
    "two images": (_chat(messages=[user("Hi", make_image(32, 32), make_image(32, 32, 1))]),
                   "messages[0].content[1]", "too_many_images"),
    "max_tokens 0": (_chat(max_tokens=0), "max_tokens", "invalid_value"),
    "max_tokens over the cap": (_chat(max_tokens=CAP + 1), "max_tokens", "invalid_value"),
    "max_tokens not an int": (_chat(max_tokens="ten"), "max_tokens", "invalid_value"),
    "unknown role": (_chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "invalid_role"),
    "system role": (_chat(messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]),
                    "messages[0].role", "unsupported_role"),
    "two user turns": (_chat(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
                       "messages[1].role", "invalid_role"),
    "special token": (_chat(messages=[{"role": "user", "content": "Find [DET] it"}]), "messages[0].content",
                      "special_token"),
    "unknown part": (_chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
                     "messages[0].content[0].type", "invalid_value"),
    "unsupported field": (_chat(tools=[]), "tools", "unsupported_field"),
    "n over 1": (_chat(n=2), "n", "invalid_value"),
    "temperature below 0": (_chat(temperature=-1), "temperature", "invalid_value"),
    "bad logit_bias": (_chat(logit_bias={"99999": 5}), "logit_bias", "invalid_value"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_chat_request_is_400_naming_the_field(served, case):
    body, param, code = BAD_CHAT[case]
    reply = post(served, "/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


@pytest.mark.parametrize("case", ["wrong content type", "not JSON", "too large", "edit without multipart",
                                  "edit with two images", "edit of a non-image", "generation without prompt"])
def test_bad_request_shapes_are_400(served, case):
    png = png_bytes(make_image(32, 32))
    path, kwargs, param, code = {
        "wrong content type": ("/v1/chat/completions", {"content": json.dumps(_chat()),
                                                        "headers": {"Content-Type": "text/plain"}},
                               None, "invalid_content_type"),
        "not JSON": ("/v1/chat/completions", {"content": b"{oops", "headers": {"Content-Type": "application/json"}},
                     None, "invalid_json"),
        "too large": ("/v1/chat/completions", {"json": _chat(messages=[{"role": "user", "content": "x" * 2**21}])},
                      None, "request_too_large"),
        "edit without multipart": ("/v1/images/edits", {"json": {"prompt": "x"}}, None, "invalid_content_type"),
        "edit with two images": ("/v1/images/edits", {"files": [("image[]", ("a.png", png)), ("image[]", ("b.png",
                                                                                                           png))],
                                                      "data": {"prompt": "x"}}, "image", "invalid_value"),
        "edit of a non-image": ("/v1/images/edits", {"files": {"image": ("a.png", b"text")}, "data": {"prompt": "x"}},
                                "image", "invalid_image"),
        "generation without prompt": ("/v1/images/generations", {"json": {"model": NAME}}, "prompt", "missing_field"),
    }[case]
    reply = post(served, path, **kwargs)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_bad_request_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=CAP + 5)
    assert err.value.status_code == 400 and err.value.body["param"] == "max_tokens"


def test_api_key_is_required(served):
    wrong = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert post(served, "/v1/chat/completions", key=None, json=_chat()).status_code == 401
    assert httpx.get(f"{served.url}/v1/models").status_code == 401
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_local_files_under_an_allowed_root(client, served, model, tiny_processor, gate):
    image = make_image(48, 40, seed=5)
    path = served.root / "pic.png"
    image.save(path)
    replies = [client.chat.completions.create(model=NAME, messages=[user("What is it?", url)], max_tokens=4)
               for url in (str(path), path.as_uri(), data_url(image))]
    expected = direct(model, tiny_processor, image, "<image>\nWhat is it?", 4).text
    assert [r.choices[0].message.content for r in replies] == [expected] * 3


def test_still_healthy_after_bad_inputs(client, served, model, tiny_processor, gate):
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Still there?"}],
                                           max_tokens=4)
    assert reply.choices[0].message.content == direct(model, tiny_processor, None, "Still there?", 4).text


# ------------------------------------------------------------------------------------------------ batching, faults


def _kinds(processor) -> list[dict[str, Any]]:
    """16 distinct requests: text only or with an image, some forced to route, budgets 1 to 8."""
    det = token_id(processor, "[DET]")
    kinds = []
    for k in range(16):
        image = make_image(56, 56, seed=10 + k) if k % 2 else None
        kinds.append({"prompt": f"Question {k}: what do you see?", "image": image, "max_tokens": 1 + k % 8,
                      "bias": [det] if k % 4 == 1 else []})
    return kinds


def _ask(client, kind: dict[str, Any]):
    message = user(kind["prompt"], kind["image"]) if kind["image"] else {"role": "user", "content": kind["prompt"]}
    return client.chat.completions.create(model=NAME, messages=[message], max_tokens=kind["max_tokens"],
                                          logit_bias={str(t): 100 for t in kind["bias"]})


def _load_equals_direct(client, model, processor, count: int) -> list:
    """``count`` requests cycling over :func:`_kinds` from 16 client threads; every answer (text, routes, boxes)
    equals direct ``chat`` on the model. Returns the replies."""
    kinds = _kinds(processor)
    expected = [direct(model, processor, k["image"], ("<image>\n" if k["image"] else "") + k["prompt"],
                       k["max_tokens"], k["bias"]) for k in kinds]
    order = [i % len(kinds) for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: _ask(client, kinds[i]), order))
    for i, reply in zip(order, replies):
        assert reply.choices[0].message.content == expected[i].text
        outputs = reply.choices[0].model_extra[EXT]
        assert [o["route"] for o in outputs] == [o.route for o in expected[i].outputs]
        for got, ref in zip(outputs, expected[i].outputs):
            assert_same_boxes(got, ref.result)
    return replies


def test_concurrent_load_matches_sequential_answers(client, served, model, tiny_processor, gate):
    served.app.state.batcher.batch_sizes.clear()
    replies = _load_equals_direct(client, model, tiny_processor, 64)
    assert len(replies) == 64 and len({r.id for r in replies}) == 64
    sizes = list(served.app.state.batcher.batch_sizes)
    assert sum(sizes) == 64 and max(sizes) > 1


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_decoder_failure_stays_in_its_answer(client, served, model, tiny_processor, gate, monkeypatch):
    det = token_id(tiny_processor, "[DET]")
    bad, good = make_image(40, 40, seed=6), make_image(56, 56, seed=7)
    predict = model.gdino.predict

    def flaky(queries, mask, inputs, *args, **kwargs):
        if [40, 40] in inputs["orig_sizes"].tolist():
            raise RuntimeError("boom")
        return predict(queries, mask, inputs, *args, **kwargs)

    expected = direct(model, tiny_processor, good, "<image>\nFind it.", 1, [det])
    monkeypatch.setattr(model.gdino, "predict", flaky)
    batcher = served.app.state.batcher
    gate.arm()
    with ThreadPoolExecutor(3) as pool:
        holder = pool.submit(client.chat.completions.create, model=NAME, max_tokens=1,
                             messages=[{"role": "user", "content": "Hold on"}])
        assert gate.entered.wait(10)
        asks = [pool.submit(client.chat.completions.create, model=NAME, messages=[user("Find it.", im)],
                            max_tokens=1, logit_bias={str(det): 100}) for im in (bad, good)]
        _wait_until(lambda: batcher.pending == 2)
        batcher.batch_sizes.clear()
        gate.release.set()
        holder.result()
        failed, fine = [a.result() for a in asks]
    assert list(batcher.batch_sizes)[0] == 2  # the two ran in one batch
    (broken,) = failed.choices[0].model_extra[EXT]
    assert broken["error"] == "decoder 'gdino' failed: boom" and "boxes" not in broken
    (output,) = fine.choices[0].model_extra[EXT]
    assert output["error"] is None
    assert_same_boxes(output, expected.outputs[0].result)


def test_client_leaving_frees_its_slot(client, served, gate):
    batcher = served.app.state.batcher
    skipped = batcher.skipped
    gate.arm()
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(client.chat.completions.create, model=NAME, max_tokens=1,
                             messages=[{"role": "user", "content": "Hold on"}])
        assert gate.entered.wait(10)
        body = _chat(stream=True)
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=10,
                          headers={"Authorization": f"Bearer {KEY}"}) as stream:
            assert json.loads(next(stream.iter_lines())[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
        with pytest.raises(httpx.ReadTimeout):
            post(served, "/v1/chat/completions", json=_chat(), timeout=0.5)
        _wait_until(lambda: [job.future.cancelled() for job in batcher.queued()] == [True, True])
        gate.release.set()
        assert holder.result().choices[0].message.content
    _wait_until(lambda: batcher.skipped == skipped + 2 and batcher.pending == 0)


def test_shutdown_answers_requests_in_flight(model, tiny_processor):
    gate = Gate(tiny_processor.tokenizer.eos_token_id)
    running = Running(create_app(model, tiny_processor, ServeOptions(gen_kwargs={"logits_processor": gate})))
    gate.arm()
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(httpx.post, f"{running.url}/v1/chat/completions", json=_chat(model="vllm2"), timeout=30)
        assert gate.entered.wait(10)
        running.server.should_exit = True  # what uvicorn's SIGTERM handler sets
        time.sleep(0.3)
        assert running.thread.is_alive()  # still serving the request in flight
        gate.release.set()
        assert reply.result().status_code == 200
    running.thread.join(30)
    assert not running.thread.is_alive()
    with pytest.raises(RuntimeError, match="shutting down"):
        running.app.state.batcher.submit(None)


def test_cli_help_and_sigterm_exit(capsys):
    from vllm2.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: vllm2 serve")
    assert all(flag in out for flag in ("--api-key", "--max-batch", "--batch-wait-ms", "--allow-path", "127.0.0.1",
                                        "--max-tokens-cap", "--max-request-bytes", "vllm2_outputs"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "vllm2.cli", "serve", "--config", "tiny", "--port", str(port), "--model-name",
               "cli"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_until(lambda: _up(f"http://127.0.0.1:{port}") or process.poll() is not None, timeout=120)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=_chat(model="cli"), timeout=30)
        assert reply.status_code == 200 and reply.json()["model"] == "cli"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
    assert "serving 'cli' on http://127.0.0.1" in process.stderr.read().decode()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_replicas_answer_batches_side_by_side_with_the_same_answers(model, tiny_processor, tmp_path):
    """``vllm2 serve --replicas 2``: two model processes answer concurrent requests, each batch on one of them (both
    used), every answer (text and boxes, logit_bias included) equal to direct ``chat`` on the model."""
    model.save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "vllm2.cli", "serve", "--model", str(tmp_path / "model"), "--port", str(port),
               "--model-name", NAME, "--replicas", "2", "--max-batch", "4", "--max-tokens-cap", str(CAP)]
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen(command, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_until(lambda: _up(url) or process.poll() is not None, timeout=180)
        assert process.poll() is None, (tmp_path / "server.log").read_text()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        _load_equals_direct(client, model, tiny_processor, 32)
        health = httpx.get(f"{url}/health").json()
        batches = health["batches"]
        assert len(batches) == 2 and min(batches) > 0 and sum(batches) >= 32 / 4
        assert health["status"] == "ok" and health["replicas_alive"] == [True, True]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        process.kill()
        log.close()


def test_a_replica_reports_a_failing_call_and_answers_the_next(model, tiny_processor, tmp_path):
    """A call that raises inside a replica raises ReplicaError with the replica's message; the replica answers the
    next call; a stopped replica is one clear error."""
    from functools import partial

    from vllm2.cli.serve import _load_replica, build_parser
    from vllm2.serve.replicas import Replica, ReplicaError, ReplicaGone

    model.save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    args = build_parser().parse_args(["--model", str(tmp_path / "model")])
    replica = Replica(partial(_load_replica, args), threads=1)
    try:
        with pytest.raises(ReplicaError, match="ValueError: 2 prompts but 1 image entries"):
            replica(images=[None], prompts=["a", "b"])
        (result,) = replica(images=[None], prompts=["Hello"], max_new_tokens=4)
        assert result.text == direct(model, tiny_processor, None, "Hello", 4).text
    finally:
        replica.close()
    with pytest.raises(ReplicaGone, match="is gone"):
        replica(images=[None], prompts=["Hello"])


class _Runner:
    """A stand-in replica: answers each prompt with its own text, or (``gone``) raises ReplicaGone."""

    def __init__(self, gone: bool) -> None:
        self.gone, self.batches = gone, 0

    def __call__(self, prompts: list[str], **kwargs: Any) -> list[str]:
        from vllm2.serve.replicas import ReplicaGone

        self.batches += 1
        if self.gone:
            time.sleep(0.05)  # the other runner is busy too, so both take jobs
            raise ReplicaGone("replica process 123 is gone (exit code -9)")
        time.sleep(0.05)
        return [f"answer to {p}" for p in prompts]


def test_a_dead_replica_hands_its_jobs_to_the_others_and_the_last_fails_them():
    from vllm2.serve.batcher import Batcher, Job
    from vllm2.serve.replicas import ReplicaGone

    dead, live = _Runner(gone=True), _Runner(gone=False)
    batcher = Batcher(None, None, max_batch=2, wait_s=0.001, replicas=[dead, live])
    batcher.start()
    futures = [batcher.submit(Job(prompt=f"p{i}")) for i in range(8)]
    assert [f.result(10) for f in futures] == [f"answer to p{i}" for i in range(8)]
    assert dead.batches == 1 and batcher.alive == [False, True]
    batcher.close()

    batcher = Batcher(None, None, max_batch=2, wait_s=0.001, replicas=[_Runner(gone=True)])
    batcher.start()
    futures = [batcher.submit(Job(prompt=f"p{i}")) for i in range(5)]
    for future in futures:
        with pytest.raises(ReplicaGone, match="123 is gone"):
            future.result(10)
    assert batcher.alive == [False] and batcher.pending == 0
    with pytest.raises(RuntimeError, match="no model replica is left"):
        batcher.submit(Job(prompt="late"))
    batcher.close()
