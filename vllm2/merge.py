"""Merging the exports of training runs that began from one model and trained disjoint parts of it.

Stages 3a and 3b of the shapes recipe both start from stage 2's export, and each freezes what the other trains
(GroundingDINO and its query table; the keypoint decoder, the UNets and theirs), so they can run side by side, one
core each. :func:`merge_changes` then puts each run's changes into one model: every weight that a run changed from
the common base is taken from that run; a weight that two runs changed is an error naming it, never averaged. The
folders load as models (so their weights compare by the names the model gives them), the base and one run at a time
beside the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

__all__ = ["merge_changes"]


def merge_changes(model: torch.nn.Module, base: str | Path, others: Sequence[str | Path]) -> dict[str, str]:
    """Copy into ``model`` every weight that a model folder of ``others`` changed from the folder ``base``.

    Args:
        model: loaded from a run that began at ``base`` (its own changes stay).
        base: the folder every run began from.
        others: folders of further runs from ``base``.
    Returns:
        weight name -> the folder it was taken from.
    Raises:
        ValueError: a weight changed by two runs (``model`` included), a folder whose weights differ in name or
            shape from ``base``'s, or a folder that changed nothing (the base itself, or a run that never trained).
    """
    from .modeling import VisionLLMv2Model

    mine = model.state_dict()
    start = VisionLLMv2Model.from_pretrained(base).state_dict()
    _check_same_weights(mine, start, "the model", base)
    changed = {name for name, tensor in mine.items() if not torch.equal(tensor, start[name])}  # the model's own
    taken: dict[str, tuple[str, torch.Tensor]] = {}
    for folder in map(str, others):
        run = VisionLLMv2Model.from_pretrained(folder).state_dict()
        _check_same_weights(run, start, repr(folder), base)
        theirs = {name: tensor for name, tensor in run.items() if not torch.equal(tensor, start[name])}
        if not theirs:
            raise ValueError(f"{folder!r} changed no weight of {str(base)!r}: is it the base, or a run that never "
                             "trained?")
        for name, tensor in theirs.items():
            rival = taken[name][0] if name in taken else "the model" if name in changed else None
            if rival:
                raise ValueError(f"weight {name!r} was changed by both {rival} and {folder!r}; the runs must train "
                                 "disjoint parts (freeze what the other trains)")
            taken[name] = (folder, tensor)
    with torch.no_grad():
        for name, (_, tensor) in taken.items():
            mine[name].copy_(tensor)
    return {name: folder for name, (folder, _) in taken.items()}


def _check_same_weights(run: dict[str, torch.Tensor], start: dict[str, torch.Tensor], what: str,
                        base: str | Path) -> None:
    """Raise unless ``run`` holds the weights of ``start`` by name and shape."""
    if run.keys() != start.keys():
        raise ValueError(f"{what} and {str(base)!r} do not hold the same weights")
    other = [name for name, tensor in run.items() if tensor.shape != start[name].shape]
    if other:
        raise ValueError(f"weight {other[0]!r} of {what} has shape {tuple(run[other[0]].shape)}, "
                         f"{tuple(start[other[0]].shape)} in {str(base)!r} ({len(other)} such weights)")
