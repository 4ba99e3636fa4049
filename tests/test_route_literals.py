"""The route table is the only place route tokens, placeholders and their ids are named in library code."""

from __future__ import annotations

import ast
from pathlib import Path

from superlink import RouteTable

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "superlink" / "routes.py"


def test_no_route_literals_outside_the_table():
    table = RouteTable.default()
    tokens = set(table.route_tokens) | set(table.placeholder_tokens)
    official_ids = set(range(32012, 32026))
    found = []
    for package in ("vllm2", "superlink", "decoders", "benchmarks"):
        for path in (REPO / package).rglob("*.py"):
            if path == TABLE:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and (node.value in tokens or (
                        type(node.value) is int and node.value in official_ids)):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert found == []
