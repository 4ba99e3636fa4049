"""Conversation templates. A conversation is a list of ``(role, text)`` turns, role ``"user"`` or ``"assistant"``.

A template renders a conversation as text segments flagged as supervised or not; the processor tokenises each
segment separately, so the label span of every assistant turn is exact (no offset arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Template", "TEMPLATES", "get_template"]

Turn = tuple[str, str]


@dataclass(frozen=True)
class Template:
    """A two-role chat template (``vicuna_v1`` layout: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``)."""

    name: str
    system: str
    user: str = "USER"
    assistant: str = "ASSISTANT"

    def segments(self, turns: list[Turn], eos: str, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """Render ``turns`` as ``(text, supervised)`` segments.

        Args:
            turns: alternating user/assistant turns starting with a user turn.
            eos: the tokenizer's end-of-sequence string, closing every assistant turn.
            add_generation_prompt: end with an open assistant turn (for generation); then the last turn must be a
                user turn.
        Returns:
            Segments whose concatenation is the full prompt; assistant answers (with their eos) are supervised.
        """
        for i, (role, _) in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"turn {i} has role {role!r}, expected {expected!r} (turns alternate from 'user')")
        if add_generation_prompt and turns and turns[-1][0] != "user":
            raise ValueError("a generation prompt must end with a user turn")
        segments: list[tuple[str, bool]] = []
        prefix = f"{self.system} " if self.system else ""
        for role, text in turns:
            if role == "user":
                segments.append((f"{prefix}{self.user}: {text} {self.assistant}:", False))
                prefix = ""
            else:
                segments.append((f" {text}{eos}", True))
        return segments


TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template(
        name="vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.",
    ),
    "plain": Template(name="plain", system=""),
}


def get_template(name: str) -> Template:
    """Look up a template by name (config key ``llm.template``)."""
    if name not in TEMPLATES:
        raise KeyError(f"config key llm.template: unknown template {name!r} (known: {sorted(TEMPLATES)})")
    return TEMPLATES[name]
