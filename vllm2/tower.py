"""Stage 0: teach an open_clip vision tower what lies under each patch before the LLM meets it, and measure a tower by
a linear probe on its frozen patch features.

Real towers come pretrained (CLIP-L saw hundreds of millions of image-text pairs); a tower trained from scratch by the
LM loss alone never learns a shape's kind from one-word answers. Stage 0 gives it a dense signal: **patch-phrase
contrast**. Every patch of a COCO instances file is labelled with the phrase of the object under its centre
(attributes, category and side: ``"red small circle on the left"``) or ``"background"``; the patch features the LLM
will read (:class:`~vllm2.vision.VisionTower`, ``vision.output_layer``) go through a linear head and are contrasted
with the open_clip text tower's embeddings of the phrases by open_clip's ``ClipLoss``. Each step draws ``rounds`` sets
of pairs in which every phrase present appears once (so in-batch negatives are never the same phrase), which also
balances rare phrases against the background. The result is an ordinary open_clip checkpoint:
``vision.backend: open_clip``, ``vision.pretrained: OUT/tower.pt``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .data.annotations import decode_segmentation
from .images import load_image
from .vision import VisionTower, create_open_clip

logger = logging.getLogger(__name__)

__all__ = ["PatchLabels", "fit_probe", "patch_labels", "pretrain_tower", "probe_tower", "tower_features"]

BACKGROUND = "background"


# ------------------------------------------------------------------------------------------------ data


@dataclass
class PatchLabels:
    """A COCO instances file read for stage 0: the images and, per patch, the object under the patch centre.

    Attributes:
        pixels: ``[N, 3, S, S]`` normalised images (one tile each).
        fields: field name -> ``[N, T]`` class index per patch (0 = background) for ``category``, every attribute
            and ``side``; ``names[field]`` lists each field's classes.
        phrases: ``[N, T]`` index into ``phrase_names`` (0 = background).
    """

    pixels: torch.Tensor
    fields: dict[str, torch.Tensor]
    names: dict[str, list[str]]
    phrases: torch.Tensor
    phrase_names: list[str]


def _owners(anns: list[dict[str, Any]], height: int, width: int, grid: int, where: str) -> np.ndarray:
    """The index of the annotation under each patch centre ``[grid * grid]`` (-1: none; smaller objects win)."""
    ys = ((np.arange(grid) + 0.5) * height / grid).astype(int)  # [g] patch-centre rows in image pixels
    xs = ((np.arange(grid) + 0.5) * width / grid).astype(int)  # [g]
    owner = np.full((grid, grid), -1)
    for k in np.argsort([-a["area"] for a in anns], kind="stable"):  # largest first: smaller objects overwrite
        mask = decode_segmentation(anns[k]["segmentation"], height, width, f"{where}: annotation {anns[k]['id']}")
        owner[mask[np.ix_(ys, xs)]] = k  # [H, W] -> [g, g]
    return owner.reshape(-1)


def patch_labels(path: str | Path, pixel_values: Callable[[list], torch.Tensor], grid: int, limit: int | None = None,
                 image_root: str | Path | None = None, vocab: PatchLabels | None = None) -> PatchLabels:
    """Read a COCO instances file (RLE or polygon masks; optional ``attributes`` per annotation) into patch labels.

    Args:
        path: the instances JSON.
        pixel_values: images -> ``[N, 3, S, S]`` (the processor's, so stage 0 sees what the LLM sees).
        grid: patches per side (``image_size // patch_size``).
        limit: read only the first images.
        image_root: folder of ``file_name`` (default: the JSON's folder).
        vocab: share the class and phrase lists of another split (a held-out split indexes classes as the training
            split does): its classes keep their indices, and values it lacks are appended to the shared lists (the
            zero-shot phrase accuracy can score them; a probe never predicts them).
    Returns:
        The labels.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        categories = {c["id"]: c["name"] for c in data["categories"]}
        by_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        images = data["images"][:limit]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a COCO instances file ({type(err).__name__}: {err})") from None
    root = Path(image_root) if image_root else path.parent
    attributes = sorted({k for a in data["annotations"] for k in a.get("attributes", {})})
    names = vocab.names if vocab else {f: [BACKGROUND] for f in ("category", *attributes, "side")}
    if set(attributes) - set(names):
        raise ValueError(f"{path}: attributes {sorted(set(attributes) - set(names))} are not in the training split")
    phrase_names = vocab.phrase_names if vocab else [BACKGROUND]
    fields = {f: np.zeros((len(images), grid * grid), np.int64) for f in names}
    phrases = np.zeros((len(images), grid * grid), np.int64)
    for i, info in enumerate(images):
        anns = by_image.get(info["id"], [])
        owner = _owners(anns, info["height"], info["width"], grid, str(path))
        for k, ann in enumerate(anns):
            x, _, w, _ = ann["bbox"]
            values = {"category": categories[ann["category_id"]], **ann.get("attributes", {}),
                      "side": "left" if x + w / 2 < info["width"] / 2 else "right"}
            where = owner == k
            for field, value in values.items():
                fields[field][i, where] = _index(names[field], value)
            words = [*(values[a] for a in attributes if a in values), values["category"], "on the", values["side"]]
            phrases[i, where] = _index(phrase_names, " ".join(words))
    pixels = pixel_values([load_image(root / info["file_name"]) for info in images])
    return PatchLabels(pixels, {f: torch.from_numpy(v) for f, v in fields.items()}, names,
                       torch.from_numpy(phrases), phrase_names)


def _index(names: list[str], value: str) -> int:
    """The index of ``value`` in ``names``, appended first if new."""
    if value not in names:
        names.append(value)
    return names.index(value)


# ------------------------------------------------------------------------------------------------ stage 0


def _unique_draw(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices into flat ``labels`` ``[M]``: one random patch per label present. Returns ``[P]``."""
    order = torch.randperm(labels.numel(), generator=generator)  # [M]
    first = torch.full((int(labels.max()) + 1,), labels.numel(), dtype=torch.long)
    first.scatter_reduce_(0, labels[order], torch.arange(labels.numel()), reduce="amin")  # first rank of each label
    return order[first[first < labels.numel()]]


class PatchPhraseModel(nn.Module):
    """The tower (as the LLM reads it), a linear patch head and the open_clip model whose text tower embeds the
    phrases."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        from open_clip.loss import ClipLoss

        self.clip = create_open_clip(cfg)
        self.initial_state = dict(self.clip.state_dict())  # keeps trimmed ResNet stages for a strict reload
        self.tower = VisionTower(cfg, num_levels=0, visual=self.clip.visual)
        self.tower.set_frozen(False)  # vision.freeze is for the stages after this one
        self.head = nn.Linear(cfg.hidden_size, self.clip.text_projection.shape[-1])
        self.loss = ClipLoss()

    def patch_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> unit patch embeddings ``[N, T, D]``."""
        return F.normalize(self.head(self.tower(pixels)[0]), dim=-1)

    def forward(self, pixels: torch.Tensor, phrases: torch.Tensor, tokens: torch.Tensor, rounds: int,
                generator: torch.Generator) -> torch.Tensor:
        """The mean ``ClipLoss`` over ``rounds`` draws of unique-phrase patch/phrase pairs."""
        patches = self.patch_embeddings(pixels).flatten(0, 1)  # [N*T, D]
        texts = F.normalize(self.clip.encode_text(tokens), dim=-1)  # [V, D]
        flat = phrases.reshape(-1)  # [N*T]
        losses = []
        for _ in range(rounds):
            pick = _unique_draw(flat, generator)  # [P]
            losses.append(self.loss(patches[pick], texts[flat[pick]], self.clip.logit_scale.exp()))
        return torch.stack(losses).mean()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The open_clip state dict (stages a ResNet tower does not read keep their initial weights)."""
        return {**self.initial_state, **self.clip.state_dict()}


def pretrain_tower(cfg: VisionConfig, train: PatchLabels, out: str | Path, steps: int, batch_size: int = 64,
                   lr: float = 1e-3, rounds: int = 16, seed: int = 0, held_out: PatchLabels | None = None,
                   progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train the tower by patch-phrase contrast and write ``OUT/tower.pt`` (an open_clip checkpoint) and
    ``OUT/stage0.json``.

    Args:
        cfg: the vision config (``backend: open_clip``; ``image_mode: resize``).
        train: patch labels of the training split.
        out: output folder.
        steps / batch_size / lr / rounds: AdamW steps with cosine decay, images per step, unique draws per step.
        seed: seed of the model, the batches and the draws.
        held_out: patch labels read with ``vocab=train``: the zero-shot phrase accuracy of its object patches is
            reported.
        progress: called with (step, loss) after each step.
    Returns:
        The summary written to ``stage0.json``.
    """
    import open_clip

    if cfg.backend != "open_clip" or cfg.image_mode != "resize":
        raise ValueError("stage 0 needs vision.backend=open_clip and vision.image_mode=resize, got "
                         f"{cfg.backend!r} and {cfg.image_mode!r}")
    torch.manual_seed(seed)
    model = PatchPhraseModel(cfg).train()
    tokens = open_clip.get_tokenizer(cfg.open_clip_model)(train.phrase_names)  # [V, L]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(len(train.pixels), (batch_size,), generator=generator)
        loss = model(train.pixels[idx], train.phrases[idx], tokens, rounds, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, losses[-1])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.checkpoint_state()}, out / "tower.pt")
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "rounds": rounds, "seed": seed,
               "seconds": round(time.perf_counter() - start, 1), "first_loss": losses[0],
               "last_loss": float(np.mean(losses[-50:])), "phrases": train.phrase_names,
               "open_clip_model": cfg.open_clip_model, "checkpoint": str(out / "tower.pt")}
    if held_out is not None:
        summary["held_out_phrase_accuracy"] = _zero_shot(model.eval(), held_out, tokens)
    (out / "stage0.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("stage 0: %d steps in %.0f s, loss %.3f -> %.3f; wrote %s", steps, summary["seconds"], losses[0],
                summary["last_loss"], out / "tower.pt")
    return summary


@torch.no_grad()
def _zero_shot(model: PatchPhraseModel, data: PatchLabels, tokens: torch.Tensor) -> float:
    """How often an object patch's nearest phrase embedding is its own phrase."""
    texts = F.normalize(model.clip.encode_text(tokens), dim=-1)  # [V, D]
    pred = torch.cat([(model.patch_embeddings(p) @ texts.T).argmax(-1) for p in data.pixels.split(64)])  # [N, T]
    objects = data.phrases > 0
    return float((pred[objects] == data.phrases[objects]).float().mean())


# ------------------------------------------------------------------------------------------------ linear probe


@torch.no_grad()
def tower_features(tower: VisionTower, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Frozen patch features ``[N, T, C]`` of ``pixels`` ``[N, 3, S, S]`` (the tower in eval mode)."""
    tower.eval()
    return torch.cat([tower(chunk)[0] for chunk in pixels.split(batch_size)])


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300) -> nn.Linear:
    """A linear classifier ``[C] -> classes`` fitted by L-BFGS on standardised features ``[M, C]``."""
    probe = nn.Linear(features.shape[-1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe


def probe_tower(tower: VisionTower, train: PatchLabels, held_out: PatchLabels) -> dict[str, Any]:
    """Linear-probe accuracy of every field (category, attributes, side) on the held-out split: over object patches
    (``<field>``) and, for the category, over all patches (``category_all``, background included).

    Returns:
        ``{"<field>": accuracy, ..., "chance": {"<field>": majority-class rate}, "patches": counts}``.
    """
    feats_tr, feats_ho = tower_features(tower, train.pixels).flatten(0, 1), tower_features(tower, held_out.pixels)
    mean, std = feats_tr.mean(0), feats_tr.std(0) + 1e-6
    feats_tr, feats_ho = (feats_tr - mean) / std, ((feats_ho - mean) / std).flatten(0, 1)  # [M, C]
    result: dict[str, Any] = {"chance": {}}
    for field, names in train.names.items():
        y_tr, y_ho = train.fields[field].reshape(-1), held_out.fields[field].reshape(-1)
        on_tr, on_ho = (y_tr > 0) if field != "category" else torch.ones_like(y_tr, dtype=torch.bool), y_ho > 0
        probe = fit_probe(feats_tr[on_tr], y_tr[on_tr], len(names))
        pred = probe(feats_ho).argmax(-1)
        result[field] = round(float((pred[on_ho] == y_ho[on_ho]).float().mean()), 4)
        result["chance"][field] = round(float(y_ho[on_ho].bincount().max() / on_ho.sum()), 4)
        if field == "category":
            result["category_all"] = round(float((pred == y_ho).float().mean()), 4)
    result["patches"] = {"train_objects": int((train.phrases > 0).sum()),
                         "held_out_objects": int((held_out.phrases > 0).sum())}
    return result
