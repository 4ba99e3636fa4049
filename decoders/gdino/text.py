"""Category "text" for GroundingDINO built from super-link query groups.

transformers' GroundingDINO reads its phrase structure from BERT token ids: ids 101 ([CLS]), 102 ([SEP]), 1012 (".")
and 1029 ("?") delimit phrases and build the text self-attention blocks and position ids. The BERT branch is replaced
by :class:`CategoryTextBackbone`, which returns the projected category features, and each sample's text is laid out as

    position:   0     1    ...  n-1   n    n+1 ... L-1
    input_ids:  CAT   CAT  ...  CAT   "."  PAD ... PAD        (L = G + 2, G = groups in the batch)

so the stock model code gives: full self-attention among a sample's categories, position ids 0..n-1, identity
attention on padding. ``attention_mask`` marks the category positions only, so the "." (a zero vector) never enters
the image-text fusion, the decoder's text cross-attention or the scores; a sample without categories keeps its "."
valid so that no attention row is empty. Category ``g`` of a sample sits at position ``slots[b, g]`` (its rank among
the sample's valid groups), where its scores are read back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

__all__ = ["CATEGORY_TOKEN_ID", "CategoryText", "CategoryTextBackbone", "DELIMITER_TOKEN_ID", "layout_categories"]

CATEGORY_TOKEN_ID = 1  # any id that is neither padding (0) nor a GroundingDINO phrase delimiter
DELIMITER_TOKEN_ID = 1012  # BERT "."
PAD_TOKEN_ID = 0


@dataclass
class CategoryText:
    """A batch of category texts.

    Attributes:
        input_ids: ``[B, L]`` fake token ids carrying the phrase structure.
        attention_mask: ``[B, L]`` long, 1 on category positions.
        features: ``[B, L, d]`` text features (categories at their slots, zeros elsewhere).
        slots: ``[B, G]`` long, the text position of each group (0 for padding groups).
        group_mask: ``[B, G]`` bool, real groups.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    features: torch.Tensor
    slots: torch.Tensor
    group_mask: torch.Tensor

    def gather(self, per_position: torch.Tensor) -> torch.Tensor:
        """Read per-text-position values back per group.

        Args:
            per_position: ``[B, ..., L']`` with ``L' >= L`` (e.g. logits padded to ``max_text_len``).

        Returns:
            ``[B, ..., G]``, ``-inf`` on padding groups.
        """
        batch, groups = self.slots.shape
        shape = (batch,) + (1,) * (per_position.dim() - 2) + (groups,)
        index = self.slots.view(shape).expand(*per_position.shape[:-1], groups)  # [B, ..., G]
        values = per_position.gather(-1, index)  # [B, ..., G]
        return values.masked_fill(~self.group_mask.view(shape), float("-inf"))


def layout_categories(features: torch.Tensor, group_mask: torch.Tensor) -> CategoryText:
    """Lay out per-group category features as GroundingDINO text (see the module docstring).

    Args:
        features: ``[B, G, d]`` one feature per group (gradients flow through).
        group_mask: ``[B, G]`` bool, real groups (need not be a prefix).

    Returns:
        The :class:`CategoryText` of length ``G + 2``.
    """
    batch, groups, dim = features.shape
    device = features.device
    length = groups + 2
    group_mask = group_mask.bool()
    counts = group_mask.sum(1)  # [B]
    slots = (group_mask.long().cumsum(1) - 1).clamp(min=0) * group_mask  # [B, G]
    positions = torch.arange(length, device=device).expand(batch, length)  # [B, L]
    is_category = positions < counts[:, None]  # [B, L]
    is_delimiter = positions == counts[:, None]  # [B, L]
    input_ids = torch.full((batch, length), PAD_TOKEN_ID, dtype=torch.long, device=device)
    input_ids = input_ids.masked_fill(is_category, CATEGORY_TOKEN_ID).masked_fill(is_delimiter, DELIMITER_TOKEN_ID)
    attention_mask = is_category | (is_delimiter & (counts == 0)[:, None])  # [B, L]
    batch_index = torch.arange(batch, device=device)[:, None].expand(batch, groups)  # [B, G]
    text = features.new_zeros(batch, length, dim).index_put(
        (batch_index[group_mask], slots[group_mask]), features[group_mask]
    )  # [B, L, d]
    return CategoryText(input_ids, attention_mask.long(), text, slots, group_mask)


class CategoryTextBackbone(nn.Module):
    """Stands in for GroundingDINO's BERT text backbone: returns the category features provided for the current call.

    It has no parameters (the official checkpoint has no text-branch keys). Use :meth:`provide` around the model call.
    """

    def __init__(self) -> None:
        super().__init__()
        self._features: torch.Tensor | None = None

    @contextmanager
    def provide(self, features: torch.Tensor) -> Iterator[None]:
        """Make ``features`` ``[B, L, d]`` the text features of the model calls inside the ``with`` block."""
        self._features = features
        try:
            yield
        finally:
            self._features = None

    def forward(self, input_ids: torch.Tensor, *args: Any, return_dict: bool | None = True, **kwargs: Any) -> Any:
        """Return the provided features (``[B, L, d]``) in the shape of a text encoder output."""
        if self._features is None:
            raise RuntimeError("CategoryTextBackbone was called without features; wrap the call in provide(...)")
        if self._features.shape[:2] != input_ids.shape:
            raise ValueError(f"text features {tuple(self._features.shape[:2])} do not match input_ids "
                             f"{tuple(input_ids.shape)}")
        if return_dict is False:
            return (self._features,)
        return BaseModelOutput(last_hidden_state=self._features)
