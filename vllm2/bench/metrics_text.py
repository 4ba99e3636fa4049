"""Text metrics: VQA accuracy (official VQA answer normalisation), CIDEr-D and BLEU (pycocoevalcap definitions).

VQA accuracy follows the official VQA evaluation: the answer and the ten human answers are normalised
(punctuation, number words to digits, articles dropped, contractions restored), then the accuracy of a question is the
mean, over the ten subsets of nine human answers, of ``min(#humans in the subset that gave the answer / 3, 1)``.
Differences: the official script normalises only when the humans disagree; here every answer is normalised, so
"two" and "2" always match. A question with a single reference answer is scored by exact match.

Captions are tokenised by :func:`caption_tokens` (lowercase; words are runs of letters and digits, apostrophes kept
inside words; all other punctuation is a separator), a Java-free stand-in for the PTB tokenizer of pycocoevalcap.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import product
from typing import Mapping, Sequence

__all__ = ["bleu", "caption_metrics", "caption_tokens", "cider_d", "normalize_vqa_answer", "vqa_accuracy", "vqa_score"]

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = ";/[]\"{}()=+\\_->`<@,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've "
    "he'll he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've she'll she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll something's that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we're we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've "
    "y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
# Stripped spellings that are ordinary words and so stay as written.
_REAL_WORDS = {"hell", "shell", "shed", "were"}


def _contraction_map() -> dict[str, str]:
    """Every spelling of a contraction with some of its apostrophes dropped -> the canonical spelling."""
    table: dict[str, str] = {}
    for canonical in _CANONICAL_CONTRACTIONS:
        pieces = canonical.split("'")
        for keep in product((True, False), repeat=len(pieces) - 1):
            variant = pieces[0] + "".join(("'" if k else "") + p for k, p in zip(keep, pieces[1:]))
            if variant != canonical and variant not in _REAL_WORDS:
                table[variant] = canonical
    return table


_CONTRACTIONS = _contraction_map()


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation.

    Punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when the text has it next to a
    space or contains a digit-comma-digit, otherwise replaced by a space; periods not followed by a digit are deleted.
    Words: lowercased, number words zero..ten (and "none") become digits, articles a/an/the are dropped, contractions
    written without apostrophes get them back ("dont" -> "don't").
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or glued) else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_score(answer: str, human_answers: Sequence[str]) -> float:
    """Accuracy of one answer against the human answers (usually ten), in [0, 1].

    The mean over leave-one-out subsets of ``min(matches in the subset / 3, 1)``; with ten humans this is
    ``min(n / 3, 1)`` for n <= 2 or n >= 4 matches and 0.9 for exactly 3. A single reference answer (GQA-style
    datasets) is scored by exact match after normalisation.
    """
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    pred = normalize_vqa_answer(answer)
    matches = sum(normalize_vqa_answer(h) == pred for h in human_answers)
    if len(human_answers) == 1:
        return float(matches)
    # Leaving out a matching human removes one match; leaving out another keeps all of them.
    total = matches * min((matches - 1) / 3, 1.0) + (len(human_answers) - matches) * min(matches / 3, 1.0)
    return total / len(human_answers)


def vqa_accuracy(answers: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_score` over questions, in [0, 1]."""
    if len(answers) != len(human_answers):
        raise ValueError(f"{len(answers)} answers for {len(human_answers)} questions")
    return sum(vqa_score(a, h) for a, h in zip(answers, human_answers)) / len(answers) if answers else 0.0


def caption_tokens(text: str) -> list[str]:
    """Lowercased words (letters/digits, with inner apostrophes); punctuation separates and is dropped."""
    return re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", text.lower())


def _ngrams(tokens: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _tfidf(counts: Counter, doc_freq: Counter, log_num_docs: float, max_n: int):
    """tf-idf vectors per n, their norms, and the length (number of bigrams, as pycocoevalcap counts it)."""
    vec = [dict() for _ in range(max_n)]
    norm = [0.0] * max_n
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        vec[n][gram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
        norm[n] += vec[n][gram] ** 2
        if n == 1:
            length += tf
    return vec, [math.sqrt(v) for v in norm], length


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> dict[str, float | list[float]]:
    """CIDEr-D as in pycocoevalcap.

    Per n-gram order n = 1..4, tf-idf vectors (document frequency = number of images whose references contain the
    n-gram; idf = log(#images) - log(max(1, df))); similarity to each reference = sum over the candidate's n-grams
    of ``min(c, r) * r`` divided by the two norms, times the Gaussian length penalty ``exp(-(l_c - l_r)^2 / (2
    sigma^2))`` (lengths as bigram counts); averaged over n and over references, times 10.

    Args:
        candidates: one caption per image.
        references: per image its reference captions.
    Returns:
        ``{"CIDEr": corpus mean, "per_image": [...]}``. One image alone scores 0 (idf of every n-gram is 0).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} captions for {len(references)} reference sets")
    cands = [_ngrams(caption_tokens(c), max_n) for c in candidates]
    refs = [[_ngrams(caption_tokens(r), max_n) for r in rs] for rs in references]
    doc_freq = Counter(gram for rs in refs for gram in set().union(*[set(r) for r in rs]))
    log_docs = math.log(len(candidates)) if candidates else 0.0
    scores = []
    for cand, rs in zip(cands, refs):
        if not rs:
            raise ValueError("every image needs at least one reference caption")
        vec_c, norm_c, len_c = _tfidf(cand, doc_freq, log_docs, max_n)
        total = 0.0
        for ref in rs:
            vec_r, norm_r, len_r = _tfidf(ref, doc_freq, log_docs, max_n)
            penalty = math.exp(-((len_c - len_r) ** 2) / (2 * sigma**2))
            sims = []
            for n in range(max_n):
                val = sum(min(v, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, v in vec_c[n].items())
                if norm_c[n] and norm_r[n]:
                    val /= norm_c[n] * norm_r[n]
                sims.append(val * penalty)
            total += sum(sims) / max_n
        scores.append(10.0 * total / len(rs))
    return {"CIDEr": sum(scores) / len(scores) if scores else 0.0, "per_image": scores}


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..4 as pycocoevalcap computes it.

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus; each reference length is the
    reference length closest to the candidate's (ties: the shorter); brevity penalty ``exp(1 - r / c)`` when the
    candidates are shorter in total. Zero counts use the same tiny smoothing (1e-15 / 1e-9).

    Returns:
        ``{"BLEU-1": ..., ..., "BLEU-4": ...}`` in [0, 1].
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} captions for {len(references)} reference sets")
    correct, guess = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, rs in zip(candidates, references):
        tokens = caption_tokens(cand)
        ref_tokens = [caption_tokens(r) for r in rs]
        max_ref: Counter = Counter()
        for r in ref_tokens:
            max_ref |= _ngrams(r, max_n)
        for gram, count in _ngrams(tokens, max_n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for n in range(max_n):
            guess[n] += max(0, len(tokens) - n)
        cand_len += len(tokens)
        ref_len += min((abs(len(r) - len(tokens)), len(r)) for r in ref_tokens)[1]
    scores, product_p = {}, 1.0
    ratio = (cand_len + 1e-15) / (ref_len + 1e-9)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    for n in range(max_n):
        product_p *= (correct[n] + 1e-15) / (guess[n] + 1e-9)
        scores[f"BLEU-{n + 1}"] = product_p ** (1 / (n + 1)) * penalty
    return scores


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> Mapping[str, float]:
    """CIDEr (CIDEr-D) and BLEU-4 of a caption set."""
    return {"CIDEr": float(cider_d(candidates, references)["CIDEr"]), "BLEU-4": bleu(candidates, references)["BLEU-4"]}
