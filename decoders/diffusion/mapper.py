"""The mapper from super-link query states to diffusion prompt embeddings.

``emb_proj`` (Linear-GELU-Linear) lifts the K query states from the LLM width to the cross-attention width; a small
pre-norm ``nn.Transformer`` (``llm2sd_mapper``) then reads them as its source sequence while its target sequence is
77 learnable queries (``llm2sd_mapper_queries``), giving a CLIP-shaped prompt embedding ``[N, 77, C_text]``.
Parameter names follow the official checkpoint (``emb_proj.{0,2}``, ``llm2sd_mapper.*``, ``llm2sd_mapper_queries``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PromptMapper"]


class PromptMapper(nn.Module):
    """Maps ``[N, K, C_llm]`` query states to ``[N, T, C_text]`` prompt embeddings.

    Decoders subclass it so that the parameters sit at the official names directly under the decoder.

    Args:
        llm_hidden_size: C_llm, width of the query states.
        cross_attention_dim: C_text, width of the prompt embeddings.
        num_prompt_tokens: T, number of learnable mapper queries (77).
        num_encoder_layers / num_decoder_layers: layers of the mapper transformer.
        num_heads: attention heads of the mapper transformer.
        ffn_dim: feed-forward width of the mapper transformer.
        dropout: dropout of the mapper transformer (0 officially).
    """

    def __init__(
        self,
        llm_hidden_size: int,
        cross_attention_dim: int,
        num_prompt_tokens: int = 77,
        num_encoder_layers: int = 1,
        num_decoder_layers: int = 1,
        num_heads: int = 8,
        ffn_dim: int = 3072,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.llm_hidden_size = llm_hidden_size
        self.emb_proj = nn.Sequential(
            nn.Linear(llm_hidden_size, cross_attention_dim),
            nn.GELU(),
            nn.Linear(cross_attention_dim, cross_attention_dim),
        )
        self.llm2sd_mapper_queries = nn.Parameter(torch.randn(1, num_prompt_tokens, cross_attention_dim))  # [1, T, C]
        layer = nn.TransformerEncoderLayer(
            cross_attention_dim, num_heads, ffn_dim, dropout, batch_first=True, norm_first=True
        )
        encoder = nn.TransformerEncoder(  # nested tensors do not apply to pre-norm layers
            layer, num_encoder_layers, nn.LayerNorm(cross_attention_dim), enable_nested_tensor=False
        )
        self.llm2sd_mapper = nn.Transformer(
            d_model=cross_attention_dim,
            nhead=num_heads,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=ffn_dim,
            dropout=dropout,
            custom_encoder=encoder,
            batch_first=True,
            norm_first=True,
        )

    def map_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Map query states to prompt embeddings.

        Args:
            queries: ``[N, K, C_llm]`` query states.

        Returns:
            ``[N, T, C_text]`` prompt embeddings.
        """
        if queries.shape[-1] != self.llm_hidden_size:
            raise ValueError(f"query states have width {queries.shape[-1]}, expected {self.llm_hidden_size}")
        weight = self.emb_proj[0].weight
        source = self.emb_proj(queries.to(device=weight.device, dtype=weight.dtype))  # [N, K, C]
        target = self.llm2sd_mapper_queries.expand(source.shape[0], -1, -1)  # [N, T, C]
        return self.llm2sd_mapper(src=source, tgt=target)  # [N, T, C]
