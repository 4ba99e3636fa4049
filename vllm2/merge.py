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

import torch

__all__ = ["merge_changes"]


def merge_changes(model: torch.nn.Module, base: str | Path, others: list[str | Path]) -> dict[str, str]:
    """Copy into ``model`` every weight that a model folder of ``others`` changed from the folder ``base``.

    Args:
        model: loaded from a run that began at ``base`` (its own changes stay).
        base: the folder every run began from.
        others: folders of further runs from ``base``.
    Returns:
        weight name -> the folder it was taken from.
    Raises:
        ValueError: a weight changed by two runs (``model`` included), or a folder with other weights.
    """
    from .modeling import VisionLLMv2Model

    mine = model.state_dict()
    start = VisionLLMv2Model.from_pretrained(base).state_dict()
    if mine.keys() != start.keys():
        raise ValueError(f"the model and {str(base)!r} do not hold the same weights")
    changed = {name for name, tensor in mine.items() if not torch.equal(tensor, start[name])}  # before any copy:
    taken: dict[str, tuple[str, torch.Tensor]] = {}  # tied weights share one tensor under several names
    for folder in map(str, others):
        run = VisionLLMv2Model.from_pretrained(folder).state_dict()
        if run.keys() != start.keys():
            raise ValueError(f"{folder!r} and {str(base)!r} do not hold the same weights")
        for name, theirs in run.items():
            if torch.equal(theirs, start[name]):
                continue
            rival = taken[name][0] if name in taken else "the model" if name in changed else None
            if rival:
                raise ValueError(f"weight {name!r} was changed by both {rival} and {folder!r}; the runs must train "
                                 "disjoint parts (freeze what the other trains)")
            taken[name] = (folder, theirs)
    with torch.no_grad():
        for name, (_, theirs) in taken.items():
            mine[name].copy_(theirs)
    return {name: folder for name, (folder, _) in taken.items()}
