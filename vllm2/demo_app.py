"""The web demo: a gradio app to chat with a model about an image.

Left: the image (upload or paste) and an optional region prompt, a box ``x1,y1,x2,y2`` or a point ``x,y`` (a click on
the image fills the point). Middle: the conversation (multi-turn; a new image or Reset starts over). Right: the image
the last answer refers to, with what its decoders found drawn on it (boxes, masks, keypoints, the region prompt), and
the images it generated or edited. Decoder and input errors appear as messages in the conversation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np
from PIL import Image



from .chat import ChatResult, history_text
from .images import to_rgb
from .region import box_to_mask, point_to_mask
from .tokenizer import IMAGE_TOKEN, REGION_TOKEN
from .visualize import draw_result

if TYPE_CHECKING:
    from .modeling import VisionLLMv2Model
    from .processor import VisionLLMv2Processor

__all__ = ["Conversation", "DemoChat", "build_demo", "launch_demo", "parse_region"]

logger = logging.getLogger(__name__)

REGION_TINT = np.array([255, 255, 255], dtype=np.float32)
# System fonts only: the page makes no request outside the demo's own server.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


@dataclass
class Conversation:
    """The state of one browser session: earlier turns for the model and the region masks their prompts used."""

    history: list[tuple[str, str]] = field(default_factory=list)
    regions: list[np.ndarray] = field(default_factory=list)


def _numbers(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ValueError(f"the {what} needs {n} comma-separated numbers, got {text!r}")
    return values


def parse_region(box: str, point: str, image: Image.Image) -> np.ndarray | None:
    """The region mask described by the box or point field (the box wins), or None when both are empty.

    Args:
        box: ``"x1,y1,x2,y2"`` in image pixels, or empty.
        point: ``"x,y"`` in image pixels, or empty.
        image: the image the region lies on.
    Returns:
        A bool ``[H, W]`` mask, or None.
    Raises:
        ValueError: a malformed field or a region outside the image.
    """
    w, h = image.size
    if box.strip():
        return box_to_mask(_numbers(box, 4, "region box"), w, h)  # type: ignore[arg-type]
    if point.strip():
        return point_to_mask(_numbers(point, 2, "region point"), w, h)  # type: ignore[arg-type]
    return None


def annotate(image: Image.Image, result: ChatResult, region: np.ndarray | None) -> Image.Image:
    """The image with the region prompt tinted and every box/mask/keypoint result of the answer drawn on it."""
    canvas = image.convert("RGB")
    if region is not None:
        arr = np.asarray(canvas, dtype=np.float32).copy()  # [H, W, 3]
        arr[region] = 0.6 * arr[region] + 0.4 * REGION_TINT
        canvas = Image.fromarray(arr.astype(np.uint8))
    for output in result.outputs:
        if isinstance(output.result, dict):
            canvas = draw_result(canvas, output.result, output.phrases, min_side=0)  # same scale for every output
    return canvas


def _error_lines(result: ChatResult) -> list[str]:
    return [f"error ({o.route} -> {o.decoder}): {o.error}" for o in result.outputs if o.error]


def _pictures(result: ChatResult) -> list[tuple[Image.Image, str]]:
    return [(o.result, f"{o.route} {', '.join(o.phrases)}".strip()) for o in result.outputs
            if isinstance(o.result, Image.Image)]


class DemoChat:
    """The demo's event handlers around one model.

    Args:
        model: the model.
        processor: its processor.
        max_new_tokens: sampled-token budget per answer.
        gen_kwargs: further options for :func:`vllm2.chat.chat` (sampling, ``logits_processor``, ``decoder_options``).
    """

    def __init__(self, model: VisionLLMv2Model, processor: VisionLLMv2Processor, max_new_tokens: int = 64,
                 **gen_kwargs: Any) -> None:
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.gen_kwargs = gen_kwargs

    def reset(self) -> tuple[list, Conversation, None, list, str, str]:
        """A fresh conversation: chat, state, annotated image, gallery, box and point fields."""
        return [], Conversation(), None, [], "", ""

    def respond(
        self, image: Image.Image | None, prompt: str, box: str, point: str, messages: list[dict[str, Any]],
        state: Conversation,
    ) -> tuple[list[dict[str, Any]], Conversation, Image.Image | None, list[tuple[Image.Image, str]], str]:
        """Answer one message.

        Args:
            image: the uploaded image or None.
            prompt: the user's message.
            box, point: the region fields.
            messages: the chat so far (gradio message dicts).
            state: the conversation state.
        Returns:
            The new chat, state, annotated image, gallery of generated/edited images, and the cleared prompt.
        """
        prompt = prompt.strip()
        if not prompt:
            return messages, state, gr.skip(), gr.skip(), ""
        messages = messages + [{"role": "user", "content": prompt}]
        try:
            image, region = self._inputs(image, prompt, box, point)
            regions = state.regions + ([region] if region is not None else [])
            result = self.model.chat(self.processor, [image], [prompt], [regions] if regions else None,
                                     history=[state.history], max_new_tokens=self.max_new_tokens, **self.gen_kwargs)[0]
        except ValueError as err:  # the user's input: a bad region, a <region> or <image> without its picture
            return messages + [{"role": "assistant", "content": f"error: {err}"}], state, gr.skip(), gr.skip(), prompt
        except Exception as err:  # keep the page usable; the log has the traceback
            logger.exception("answering %r failed", prompt)
            return messages + [{"role": "assistant", "content": f"internal error: {err}"}], state, gr.skip(), \
                gr.skip(), prompt
        shown = result.text or "(empty answer)"
        messages = messages + [{"role": "assistant", "content": line} for line in [shown, *_error_lines(result)]]
        first = f"{IMAGE_TOKEN}\n" if image is not None and not state.history and IMAGE_TOKEN not in prompt else ""
        answer = ("assistant", history_text(result.text, self.model.routes))
        state = Conversation(state.history + [("user", first + prompt), answer], regions)
        annotated = annotate(image, result, region) if image is not None else None
        return messages, state, annotated, _pictures(result), ""

    def _inputs(self, image: Image.Image | None, prompt: str, box: str, point: str) -> tuple[Image.Image | None,
                                                                                          np.ndarray | None]:
        """The RGB image and the region mask of this turn; raises ValueError on bad input."""
        if image is not None:
            limit = self.processor.vision.max_image_pixels
            if image.width * image.height > limit:
                raise ValueError(f"the image has {image.width}x{image.height} pixels, over the limit of {limit}")
            image = to_rgb(image)
        if not (box.strip() or point.strip()):
            return image, None
        if image is None:
            raise ValueError("a region prompt needs an image")
        if REGION_TOKEN not in prompt:
            raise ValueError(f"write {REGION_TOKEN} in the message where the box or point belongs")
        return image, parse_region(box, point, image)


def _click_point(evt: gr.SelectData) -> str:
    """The clicked image pixel as the point field's text."""
    x, y = evt.index
    return f"{x},{y}"


def build_demo(chat: DemoChat, source: str, untrained: bool) -> gr.Blocks:
    """The gradio app.

    Args:
        chat: the handlers around the model.
        source: the model folder or config it was built from (shown in the header).
        untrained: whether the model has random weights (the page then says so in its header).
    Returns:
        The ``gr.Blocks`` app (not launched).
    """
    title = "vllm2 demo" + (" (UNTRAINED model)" if untrained else "")
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nModel: `{source}`")
        if untrained:
            gr.Markdown(f"**UNTRAINED model**: `{source}` builds randomly initialised weights, so its answers are "
                        "noise. Start the demo with `--model DIR` for a trained model.", elem_id="untrained-banner")
        state = gr.State(Conversation())
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], height=320,
                                 elem_id="input-image")
                box = gr.Textbox(label="Region box x1,y1,x2,y2 (pixels)", elem_id="region-box")
                point = gr.Textbox(label="Region point x,y (pixels; click the image)", elem_id="region-point")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", render_markdown=False,
                                     feedback_options=None, height=420)
                prompt = gr.Textbox(label="Message", placeholder="Ask about the image (write <region> to use the "
                                    "box or point)", elem_id="prompt", lines=2)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    reset = gr.Button("Reset", elem_id="reset")
            with gr.Column(scale=1):
                annotated = gr.Image(type="pil", label="Answer on the image", interactive=False, format="png",
                                     height=320, elem_id="annotated")
                gallery = gr.Gallery(label="Generated / edited images", elem_id="generated", format="png")
        cleared = [chatbot, state, annotated, gallery, box, point]
        answer = dict(fn=chat.respond, inputs=[image, prompt, box, point, chatbot, state],
                      outputs=[chatbot, state, annotated, gallery, prompt])
        send.click(**answer)
        prompt.submit(**answer)
        reset.click(chat.reset, outputs=cleared)
        chatbot.clear(chat.reset, outputs=cleared)
        image.upload(chat.reset, outputs=cleared)
        image.clear(chat.reset, outputs=cleared)
        image.select(_click_point, outputs=point)
    return demo


def launch_demo(demo: gr.Blocks, host: str, port: int, max_file_size: str) -> None:
    """Serve the app (blocks until interrupted); one answer is computed at a time."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the demo listens on %s: anyone who can reach this address can use it", host)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, max_file_size=max_file_size, share=False, ssr_mode=False,
        mcp_server=False, footer_links=[], theme=THEME,
    )
