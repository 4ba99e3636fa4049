"""Official VisionLLM v2 checkpoint keys of the GroundingDINO decoder (``gdino.*``) -> this decoder's keys.

The rows (first match wins; ``vllm2.convert`` places them in its one table): the Swin backbone's transformers 4
names -> transformers 5 names (as transformers' own legacy mapping), ``nn.MultiheadAttention``'s packed ``in_proj``
split into query, key and value, the mask head ``model.{lateral_convs,output_convs,mask_features}`` ->
``pixel_decoder.``, no counterpart for ``model.mask_embed.`` (the official encoder-stage mask loss head), identity
for the rest.
"""

from __future__ import annotations

from ..keyrules import KeyRule, same_key

__all__ = ["OFFICIAL_KEY_RULES"]

_SWIN_OLD = "gdino.model.backbone.conv_encoder.model."
_SWIN_NEW = _SWIN_OLD + "swin."
_BLOCK = r"encoder.layers.{i:\d+}.blocks.{j:\d+}."
_SWIN_NOTE = "Swin: transformers 4 names -> transformers 5 names (as transformers' own legacy mapping)"


def _swin_block(old: str, new: str) -> KeyRule:
    """A Swin block row: ``old`` (transformers 4) -> ``new`` (transformers 5) within each block."""
    return KeyRule(_SWIN_OLD + _BLOCK + old, (_SWIN_NEW + _BLOCK + new,), _SWIN_NOTE)


OFFICIAL_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule(_SWIN_OLD + "embeddings.{rest}", (_SWIN_NEW + "embeddings.{rest}",), _SWIN_NOTE),
    _swin_block("attention.self.query.{p}", "attention.q_proj.{p}"),
    _swin_block("attention.self.key.{p}", "attention.k_proj.{p}"),
    _swin_block("attention.self.value.{p}", "attention.v_proj.{p}"),
    _swin_block("attention.self.{t:relative_position_bias_table|relative_position_index}",
                "attention.relative_position_bias.{t}"),
    _swin_block("attention.output.dense.{p}", "attention.o_proj.{p}"),
    _swin_block("intermediate.dense.{p}", "mlp.fc1.{p}"),
    _swin_block("output.dense.{p}", "mlp.fc2.{p}"),
    _swin_block("{n:layernorm_before|layernorm_after}.{p}", "{n}.{p}"),
    KeyRule(_SWIN_OLD + r"encoder.layers.{i:\d+}.downsample.{rest}",
            (_SWIN_NEW + "encoder.layers.{i}.downsample.{rest}",), _SWIN_NOTE),
    same_key(_SWIN_OLD + "hidden_states_norms.{rest}", _SWIN_NOTE),
    KeyRule(
        "gdino.model.{path}.in_proj_{p:weight|bias}",
        ("gdino.model.{path}.query.{p}", "gdino.model.{path}.key.{p}", "gdino.model.{path}.value.{p}"),
        "nn.MultiheadAttention packs q, k, v; transformers' GroundingDinoMultiheadAttention keeps them apart",
    ),
    KeyRule("gdino.model.{part:lateral_convs|output_convs|mask_features}.{rest}",
            ("gdino.pixel_decoder.{part}.{rest}",), "mask head: our pixel decoder is its own module"),
    KeyRule("gdino.model.mask_embed.{rest}", (), "the official encoder-stage mask embedding (training loss only)"),
    same_key("gdino.{rest}", "GroundingDINO (transformers layout), heads, patch2query"),
)
"""The GroundingDINO rows of the official -> ours key table (see the module docstring)."""
