"""The web demo: its handlers in process, and the real app (``vllm2 demo``) driven in headless Chromium."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples" / "shapes.png"
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="the chromium browser is not installed (make browser)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoServer:
    """``vllm2 demo --config configs/tiny.yaml`` in a subprocess, started at once and awaited on first use."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.log_path = log
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm2.cli", "demo", "--config", "configs/tiny.yaml", "--port", str(self.port),
                 "--max-new-tokens", "6"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self._ready = False

    def url(self, timeout: float = 240.0) -> str:
        url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None:
                pytest.fail(f"vllm2 demo exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    self._ready = response.status == 200
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm2 demo did not answer on {url}:\n{self.log_path.read_text()}")
                time.sleep(0.5)
        return url

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def server(tmp_path_factory):
    """Started before the in-process tests run, so the app boots meanwhile."""
    if CHROMIUM is None:
        yield None
        return
    demo = DemoServer(tmp_path_factory.mktemp("demo") / "server.log")
    yield demo
    demo.stop()


# ----------------------------------------------------------------------------------------------- in process


class ForceToken:
    """A logits processor that makes every sample emit ``token_id`` at sampled step ``step``."""

    def __init__(self, token_id: int, step: int) -> None:
        self.token_id, self.step = token_id, step

    def __call__(self, sampled: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if sampled.shape[1] != self.step:
            return scores
        forced = torch.full_like(scores, float("-inf"))  # [B, V]
        forced[:, self.token_id] = 0.0
        return forced


@pytest.fixture(scope="module")
def model_and_processor():
    from vllm2 import VisionLLMv2Processor, build_model, load_config

    cfg = dataclasses.replace(load_config("tiny"), decoders={})  # no decoder: every route reports an error
    torch.manual_seed(0)
    return build_model(cfg).eval(), VisionLLMv2Processor.from_config(cfg)


def test_parse_region_box_point_and_errors():
    from vllm2.demo_app import parse_region

    image = make_image(40, 30)
    box = parse_region("2, 3, 12, 8", "", image)
    assert box.shape == (30, 40) and box.sum() == 10 * 5 and box[3:8, 2:12].all()
    point = parse_region("", "20,15", image)
    assert point.shape == (30, 40) and point[15, 20] and not point[0, 0]
    assert parse_region(" ", "", image) is None
    with pytest.raises(ValueError, match="region box needs 4"):
        parse_region("1,2,3", "", image)
    with pytest.raises(ValueError, match="outside"):
        parse_region("", "50,5", image)


def test_respond_multi_turn_regions_route_errors_and_reset(model_and_processor):
    from superlink import placeholder_sequence
    from vllm2.demo_app import Conversation, DemoChat

    model, processor = model_and_processor
    det = model.routes.route_tokens[0]
    chat = DemoChat(model, processor, max_new_tokens=4,
                    logits_processor=ForceToken(processor.tokenizer.convert_tokens_to_ids(det), step=1))
    image = make_image(64, 48)
    messages, state, annotated, pictures, cleared = chat.respond(image, "What is here?", "", "", [], Conversation())
    assert cleared == "" and pictures == []
    assert messages[0] == {"role": "user", "content": "What is here?"}
    assert det in messages[1]["content"]
    assert messages[2]["content"].startswith(f"error ({det} -> {model.routes.route(det).decoder}): no decoder")
    assert annotated.size == image.size and np.array_equal(np.asarray(annotated), np.asarray(image))
    assert state.history[0] == ("user", "<image>\nWhat is here?") and state.history[1][0] == "assistant"
    placeholders = "".join(placeholder_sequence(model.routes.route(det).num_embs))
    assert det + placeholders in state.history[1][1]  # the next turn's prompt holds the route with its queries

    messages, state, annotated, _, _ = chat.respond(image, "And <region>?", "8,8,24,20", "", messages, state)
    assert len(state.history) == 4 and state.history[2] == ("user", "And <region>?")
    assert len(state.regions) == 1 and state.regions[0][8:20, 8:24].all() and state.regions[0].sum() == 16 * 12
    tinted = np.asarray(annotated).astype(int) - np.asarray(image).astype(int)  # the region is lightened
    assert (tinted[8:20, 8:24] > 0).any() and not tinted[30:, 40:].any()

    messages, same, _, _, kept = chat.respond(image, "Where?", "8,8,24,20", "", messages, state)
    assert messages[-1] == {"role": "assistant", "content": "error: write <region> in the message where the box or "
                                                            "point belongs"}
    assert same is state and kept == "Where?"
    assert chat.reset() == ([], Conversation(), None, [], "", "")


# ----------------------------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url())
    yield page
    page.close()


def _upload(page) -> None:
    """Upload the sample and wait until the upload's reset has cleared the fields (a click before it would be lost)."""
    from playwright.sync_api import expect

    box = page.locator("#region-box textarea")
    box.fill("marker")
    page.locator("#input-image input[type=file]").set_input_files(str(SAMPLE))
    page.locator("#input-image img").wait_for()
    expect(box).to_have_value("")


def _send(page, text: str, turns: int) -> None:
    """Send a message and wait until the chat shows ``turns`` user messages (a turn appears with its answer)."""
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill(text)
    page.locator("#send").click()
    expect(page.locator('#chatbot [data-testid="user"]')).to_have_count(turns, timeout=60_000)


@needs_chromium
def test_browser_upload_ask_and_see_the_answer_on_the_image(page):
    from PIL import Image

    assert "UNTRAINED" in page.locator("#untrained-banner").inner_text()
    _upload(page)
    _send(page, "What do you see in this image?", turns=1)
    assert page.locator('#chatbot [data-testid="user"]').inner_text().strip() == "What do you see in this image?"
    assert page.locator('#chatbot [data-testid="bot"]').inner_text().strip()
    shown = page.locator("#annotated img")
    shown.wait_for()
    page.wait_for_function("document.querySelector('#annotated img').naturalWidth > 0")
    size = shown.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert tuple(size) == Image.open(SAMPLE).size


@needs_chromium
def test_browser_click_point_region_error_and_reset(page):
    from PIL import Image
    from playwright.sync_api import expect

    _upload(page)
    page.locator("#input-image img").click()  # the centre of the picture
    point = page.locator("#region-point textarea")
    expect(point).to_have_value(re.compile(r"^\d+,\d+$"))
    x, y = (int(v) for v in point.input_value().split(","))
    width, height = Image.open(SAMPLE).size
    assert abs(x - width / 2) <= 3 and abs(y - height / 2) <= 3  # image pixels, not screen pixels

    page.locator("#region-box textarea").fill("1,2,3")
    _send(page, "What is <region>?", turns=1)
    expect(page.locator('#chatbot [data-testid="bot"]')).to_contain_text("error: the region box needs 4")
    page.locator("#region-box textarea").fill("")
    _send(page, "What is <region>?", turns=2)
    assert "error: " not in page.locator('#chatbot [data-testid="bot"]').last.inner_text()
    page.locator("#annotated img").wait_for()

    page.locator("#reset").click()
    expect(page.locator('#chatbot [data-testid="user"]')).to_have_count(0)
    expect(point).to_have_value("")
