"""One evaluation prompt (``EvalSample``), its second turn, how its answer is graded, and its
store key.

A sample's ``input_ids`` are the whole chat-templated prompt; ``context_len`` says how many of
them are the context alone (the template's start, the context and the blank line after it), so
the query-agnostic setting can compress the context before the question exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

#: Hex digits of the sha256 kept in a prompt key.
KEY_DIGITS = 16


def prompt_key(input_ids: list[int] | None, max_tokens: int | None,
               followup: dict[str, Any] | None) -> str:
    """What identifies a prompt in the results store: its token ids, its answer length and its
    second turn's template tokens (sha256 of their JSON, ``KEY_DIGITS`` hex digits).

    Args:
        input_ids: the prompt, ``[prompt_tokens]``.
        max_tokens: answer length limit.
        followup: ``Followup.to_json()`` or None.

    Returns:
        The key: equal keys mean the same tokens go into the model.
    """
    second = None if followup is None else {k: followup.get(k) for k in
                                            ("suffix_ids", "stop_ids", "max_tokens")}
    text = json.dumps({"input_ids": input_ids, "max_tokens": max_tokens, "followup": second},
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_DIGITS]


@dataclass(frozen=True)
class Followup:
    """The second turn of a multi-turn sample: what to append after turn 1's answer, and how to
    grade the answer to it.

    Attributes:
        question: the turn-2 user message (for reading; the tokens are in ``suffix_ids``).
        suffix_ids: the chat template's tokens after turn 1's answer: the end of the assistant
            turn, the new user turn (``question``) and the start of the assistant's answer.
        stop_ids: tokens that end a turn-1 answer (the tokenizer's EOS and the template's end of
            turn); dropped from the end of the answer before ``suffix_ids``, which re-adds the
            template's own end-of-turn token.
        answers: what the turn-2 answer must contain.
        match: ``"all"`` or ``"any"``, as ``EvalSample.match``.
        max_tokens: turn-2 answer length limit.
    """

    question: str
    suffix_ids: list[int] = field(repr=False)
    stop_ids: list[int]
    answers: list[str]
    match: str
    max_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "suffix_ids": self.suffix_ids,
                "stop_ids": self.stop_ids, "answers": self.answers, "match": self.match,
                "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class EvalSample:
    """One prompt of the evaluation and how to grade its answer.

    Attributes:
        id: unique and stable across runs (task, length, depth, index).
        task: one of ``TASKS``.
        length: the task's length class in tokens (prompt + ``max_tokens``; for a multi-turn
            sample both turns).
        depth: where the asked needle sits (0.0 start .. 1.0 end); -1.0 where it does not apply.
        input_ids: the full prompt, chat template included, ``[prompt_tokens]``.
        answers: what the answer must contain.
        match: ``"all"`` (score = fraction of ``answers`` found) or ``"any"`` (1 if any is).
        max_tokens: answer length limit.
        needle_offsets: token index in ``input_ids`` where each needle's value starts, the
            asked needle first (for ``niah_multiturn``: turn 1's, then turn 2's); empty for the
            tasks without needles.
        followup: the second turn (``niah_multiturn`` only).
        context_len: how many leading ``input_ids`` are the context alone (the template's start,
            the context and the blank line after it; ``PromptBuilder.context_len``); None for a
            sample read from a file written before it existed.
    """

    id: str
    task: str
    length: int
    depth: float
    input_ids: list[int] = field(repr=False)
    answers: list[str]
    match: str
    max_tokens: int
    needle_offsets: list[int] = field(default_factory=list)
    followup: Followup | None = None
    context_len: int | None = None

    @property
    def prompt_key(self) -> str:
        """The store's key of this prompt (``prompt_key``)."""
        return prompt_key(self.input_ids, self.max_tokens,
                          None if self.followup is None else self.followup.to_json())

    def to_json(self) -> dict[str, Any]:
        """The line written to ``samples.jsonl`` (also what the kvpress runner reads)."""
        return {"id": self.id, "task": self.task, "length": self.length, "depth": self.depth,
                "input_ids": self.input_ids, "answers": self.answers, "match": self.match,
                "max_tokens": self.max_tokens, "needle_offsets": self.needle_offsets,
                "followup": None if self.followup is None else self.followup.to_json(),
                "context_len": self.context_len, "prompt_key": self.prompt_key}


def turn2_input_ids(input_ids: list[int], output_ids: list[int], suffix_ids: list[int],
                    stop_ids: list[int]) -> list[int]:
    """Turn 2's prompt: turn 1's prompt, turn 1's answer token for token, the template's rest.

    Args:
        input_ids: turn 1's prompt (ends with the assistant's answer prefix).
        output_ids: the tokens turn 1 generated, exactly as generated.
        suffix_ids: ``Followup.suffix_ids``.
        stop_ids: ``Followup.stop_ids``: trailing ones are dropped from ``output_ids`` (the
            suffix starts with the template's end-of-turn token).

    Returns:
        ``input_ids + answer + suffix_ids``.
    """
    answer = list(output_ids)
    stops = set(stop_ids)
    while answer and answer[-1] in stops:
        answer.pop()
    return [*input_ids, *answer, *suffix_ids]


def score_answer(text: str, answers: list[str], match: str) -> float:
    """RULER's string-match metrics, case-insensitive.

    Returns:
        ``match == "all"``: the fraction of ``answers`` that occur in ``text``;
        ``match == "any"``: 1.0 if one of them does, else 0.0.
    """
    lowered = text.lower()
    found = [a.lower() in lowered for a in answers]
    if match == "all":
        return sum(found) / len(found)
    if match == "any":
        return float(any(found))
    raise ValueError(f"match must be 'all' or 'any', got {match!r}")
