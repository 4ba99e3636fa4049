"""The super link: route table, query splice (training and decoding), gather and projection; and the text
transmission baseline (location and class tokens)."""

from superlink.decoding import DecodeStep, build_step, compact_steps, prompt_position_ids
from superlink.gather import QueryGroups, gather_queries
from superlink.projection import QueryProjection
from superlink.routes import DEFAULT_ROUTES, PLACEHOLDER_TOKENS, BoundRoutes, Route, RouteTable, placeholder_sequence
from superlink.splice import RouteGroups, Truncation, locate_groups, query_position_mask, splice_queries, truncate_ids
from superlink.text import CLASS_TOKEN, ParsedText, TextBox, TextLink

__all__ = [
    "BoundRoutes",
    "CLASS_TOKEN",
    "DEFAULT_ROUTES",
    "DecodeStep",
    "PLACEHOLDER_TOKENS",
    "QueryGroups",
    "ParsedText",
    "QueryProjection",
    "Route",
    "RouteGroups",
    "RouteTable",
    "TextBox",
    "TextLink",
    "Truncation",
    "build_step",
    "compact_steps",
    "gather_queries",
    "locate_groups",
    "placeholder_sequence",
    "prompt_position_ids",
    "query_position_mask",
    "splice_queries",
    "truncate_ids",
]
