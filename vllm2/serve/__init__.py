"""``vllm2 serve``: an OpenAI-compatible HTTP server over the batched :func:`vllm2.chat.chat`.

Endpoints (``/v1`` ones need ``Authorization: Bearer KEY`` when the server has an API key):

- ``POST /v1/chat/completions``: ``model``, ``messages`` (roles ``user`` and ``assistant``, alternating, ending with
  ``user``; content a string or ``text`` / ``image_url`` parts; images as ``data:image/...;base64,`` URLs, or local
  files under an ``--allow-path`` root), ``max_tokens`` / ``max_completion_tokens`` (default and cap:
  ``--max-tokens-cap``), ``temperature`` (0 or absent: greedy), ``top_p``, ``logit_bias`` (ids of the model's
  tokenizer), ``stream`` (server-sent events; ``stream_options.include_usage``), ``n`` (1 only), ``user`` (ignored).
  Other fields are refused. Earlier assistant turns are sent back as the server wrote them; their route tokens get
  their placeholders again, as in ``vllm2 chat``.
- ``POST /v1/images/generations`` (``prompt``) and ``POST /v1/images/edits`` (multipart ``image`` + ``prompt``):
  the prompt is phrased as the training data phrases a text-to-image / edit request; the answer is
  ``{"created", "data": [{"b64_json", "revised_prompt"}]}`` (the image at the decoder's resolution; ``size``,
  ``quality``, ``style`` are ignored). When the model does not route to [GEN] / [EDIT] the answer is a 400 error
  (code ``not_routed``) quoting the model's text.
- ``GET /v1/models``, ``GET /health``.

The extension field: each choice of a completion (and the final chunk of a stream) carries ``vllm2_outputs``, one
object per route output of the answer, in answer order::

    {"route": "[DET]", "decoder": "gdino", "phrases": ["circle", "square"], "error": null,
     "boxes": [[x1, y1, x2, y2], ...],   # pixels of the request's (first) image
     "scores": [...], "labels": [...],    # labels index into phrases
     "masks": [{"size": [h, w], "counts": "..."}, ...],      # COCO RLE (pycocotools), one per box, when segmenting
     "semantic": [{"label": 0, "mask": {"size", "counts"}}],  # semantic segmentation: one RLE per group present
     "keypoints": [[[x, y, score], ...], ...],                # [POSE]: per box, per keypoint name
     "image": "iVBORw0..."}                                   # [GEN] / [EDIT]: base64 PNG

Only the keys a decoder produced are present. ``error`` is a message when that decoder failed or is not configured;
the rest of the answer (and every other request) is unaffected. ``usage.completion_tokens`` counts every position
the model decoded, route query positions included.

Errors are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}``: 400 ``invalid_request_error``
naming the field at fault (``param``, e.g. ``messages[0].content[1].image_url.url``), 401 without the API key,
500 ``server_error`` when the model failed, 503 while shutting down.

Batching: one worker thread owns the model; requests that arrive within ``--batch-wait-ms`` of each other are
answered by one batched ``chat`` call (see :mod:`vllm2.serve.batcher`).
"""

from .app import create_app
from .options import ServeOptions

__all__ = ["ServeOptions", "create_app"]
