"""Projection of super-link query states from the LLM width to a decoder's width."""

from __future__ import annotations

import torch
from torch import nn


class QueryProjection(nn.Module):
    """An MLP ``in_dim -> hidden_dim -> ... -> out_dim`` with ReLU between layers (no activation after the last).

    Parameter names are ``layers.{i}.weight/bias`` (the official ``patch2query`` layout).

    Args:
        in_dim: input width (the LLM hidden size).
        hidden_dim: width of the hidden layers.
        out_dim: output width (the decoder's model width).
        num_layers: number of linear layers (>= 1).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        nn.init.xavier_uniform_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` ``[..., in_dim]`` to ``[..., out_dim]``."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x
