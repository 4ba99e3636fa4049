"""Checkpoint key rename rules: one row maps an official key template onto our key template(s).

Each decoder keeps the rows for its own official keys beside it (``decoders/<name>/convert.py``);
``vllm2.convert`` composes them with the core model's rows into the one official -> ours table.
Templates hold ``{name}`` (any text) or ``{name:REGEX}`` placeholders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KeyRule", "fill_template", "same_key"]

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]+))?\}")


def _compile(template: str, declared: Mapping[str, str] | None = None) -> re.Pattern[str]:
    """A key template as a regex: ``{name:REGEX}`` matches REGEX, ``{name}`` what ``declared`` gives it (any text)."""
    parts, pos = [], 0
    for match in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : match.start()]))
        parts.append(f"(?P<{match[1]}>{match[2] or (declared or {}).get(match[1]) or '.+?'})")
        pos = match.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


def _placeholder_names(template: str) -> list[str]:
    return [match[1] for match in _PLACEHOLDER.finditer(template)]


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """A key template with its placeholders replaced by ``values``."""
    return _PLACEHOLDER.sub(lambda match: values[match[1]], template)


@dataclass(frozen=True)
class KeyRule:
    """One row of the table.

    Attributes:
        official: the official key template (``{name}`` / ``{name:REGEX}`` placeholders).
        ours: our key template(s) using the same placeholders; several = the official tensor is their concatenation
            along dim 0 in equal parts (in this order); none = no counterpart (not convertible).
        note: why the row exists.
    """

    official: str
    ours: tuple[str, ...]
    note: str

    def __post_init__(self) -> None:
        names = set(_placeholder_names(self.official))
        for template in self.ours:
            if set(_placeholder_names(template)) != names:
                raise ValueError(f"key rule {self.official!r} -> {template!r}: placeholders differ")

    @property
    def official_pattern(self) -> re.Pattern[str]:
        return _compile(self.official)

    @property
    def our_patterns(self) -> tuple[re.Pattern[str], ...]:
        """Our templates as regexes, each placeholder matching what the official template declares."""
        declared = {m[1]: m[2] for m in _PLACEHOLDER.finditer(self.official) if m[2]}
        return tuple(_compile(t, declared) for t in self.ours)


def same_key(template: str, note: str) -> KeyRule:
    """A row whose official and our keys are identical."""
    return KeyRule(template, (template,), note)
