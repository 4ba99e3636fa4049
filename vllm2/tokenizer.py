"""Tokenizer loading and the project's special tokens.

The special tokens follow the official order (ids 32000-32025 on a 32000-word Llama vocabulary): ``[PAD]``, the
image/region markers, start/end pairs, the route tokens (from the route table) and the ``[EMB]`` placeholders.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from superlink import RouteTable, TextLink

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PATCH_TOKEN = "<im_patch>"
REGION_TOKEN = "<region>"
MARKER_TOKENS = ("[PAD]", IMAGE_TOKEN, PATCH_TOKEN, REGION_TOKEN, "<img>", "</img>", "<reg>", "</reg>", "<det>",
                 "</det>", "<grd>", "</grd>")

# A small English corpus for the built-in tiny tokenizer (tests and synthetic worlds; real runs load a local folder).
_TINY_CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and
polite answers to the user's questions. USER: ASSISTANT: Can you analyze the image and identify the person, bicycle,
car present? Yes, here are the results for in the image. Where can we locate the in the image? Yes, it is Could you aid
me in generating unique masks for every category present in this image? Answer the question and localize each object.
Can you examine the image and pinpoint the keypoint locations of the nose, left eye, right eye, left ear, right ear,
left shoulder, right shoulder, left elbow, right elbow, left wrist, right wrist, left hip, right hip, left knee, right
knee, left ankle, right ankle, head, neck, hand, foot? Utilizing keypoints detection, the image analysis reveals the
location of Sure, these objects are region Can you provide me with a brief description of in the picture? Answer the
question using a single word or phrase. Generate image with caption: Here it is Edit the image according to the
caption: make the change turn it into a red green blue yellow purple orange white black gray cyan magenta circle
square triangle star diamond rectangle shape shapes stick figure figures small large big medium left right top bottom
middle center how many what color is the where is describe draw paint segment find detect count pose of and or with
without there are is one two three four five six seven eight nine ten zero yes no a an the of on in at to for it this
that these those image picture photo object objects background dog cat horse bird person people man woman 0 1 2 3 4 5
6 7 8 9 . , ? ! : ; ' " - ( ) [ ] /
"""


def special_tokens(routes: RouteTable) -> list[str]:
    """The 26 official special tokens, in the official order: markers, route tokens, then placeholders."""
    return list(MARKER_TOKENS) + list(routes.route_tokens) + list(routes.placeholder_tokens)


def official_token_ids(routes: RouteTable, first: int = 32000) -> dict[str, int]:
    """The official special-token ids: the 26 tokens in order from ``first`` (``[PAD]`` 32000 ... ``[EMB8]`` 32025)."""
    return {token: first + i for i, token in enumerate(special_tokens(routes))}


def misplaced_tokens(tokenizer: PreTrainedTokenizerBase, expected: dict[str, int]) -> str:
    """``"<image> is 5, expected 32001, ..."`` for every token whose id is not the expected one ("" when none)."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in expected}
    return ", ".join(f"{t} is {ids[t]}, expected {want}" for t, want in expected.items() if ids[t] != want)


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer in memory (deterministic, no download).

    Args:
        vocab_size: target size of the base vocabulary (before special tokens).
    Returns:
        A fast tokenizer with ``<s>``, ``</s>``, ``<unk>`` (pad = unk, as in the official Vicuna setup).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def load_tokenizer(path: str | None, config_key: str = "llm.tokenizer", *, routes: RouteTable,
                   text_link: TextLink | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (or build the tiny one) and add the special tokens once.

    Args:
        path: local tokenizer folder, or None for the built-in tiny tokenizer.
        routes: the route table (its route and placeholder tokens are added).
        config_key: the config key named in errors.
        text_link: text transmission's vocabulary; its location and class tokens are added after the official ones.
    Returns:
        The tokenizer; every special token maps to exactly one id.
    """
    if path is None:
        tokenizer = build_tiny_tokenizer()
    else:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer folder {path!r} (config key {config_key}) does not exist")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    add_special_tokens(tokenizer, routes, text_link, where=f"tokenizer folder {path!r} (config key {config_key})")
    return tokenizer


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, routes: RouteTable, text_link: TextLink | None = None,
                       where: str = "the tokenizer") -> int:
    """Add the missing special tokens in the official order, then those of ``text_link``; returns how many were
    added.

    The 26 official tokens must then hold consecutive ids in the official order (``[PAD]`` first): a tokenizer that
    already had some of them at other ids, or in another order, is refused (``where`` names it in the error), since
    weights trained with the official ids would read the wrong embedding rows.
    """
    wanted = special_tokens(routes) + list(text_link.tokens if text_link else ())
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
    for token in wanted:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"special token {token!r} encodes to {len(ids)} ids {ids}, expected exactly one")
    wrong = misplaced_tokens(tokenizer, official_token_ids(routes, tokenizer.convert_tokens_to_ids("[PAD]")))
    if wrong:
        raise ValueError(f"{where}: the special tokens do not hold the official order of consecutive ids from [PAD] "
                         f"({wrong}); it already had some of them at other ids: use a tokenizer without them (they "
                         "are added in order) or with all 26 in the official order")
    return added
