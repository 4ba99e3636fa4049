"""Placing nested input structures on a device: shared by the model's training forward, chat and the benchmarks."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["to_device"]


def to_device(data: Any, device: torch.device) -> Any:
    """Move the tensors of a nested dict/list structure to ``device``.

    Args:
        data: a tensor, or dicts, lists and tuples of them (other leaves are returned as they are).
        device: the target device.
    Returns:
        The same structure with every tensor on ``device``.
    """
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(v, device) for v in data)
    return data
