"""Needle-in-a-haystack tasks (RULER's ``niah_*``) in Paul Graham's essays.

- ``niah_single``: one needle ("One of the special magic numbers for {key} is: {value}.") at a
  given depth; asked for its value.
- ``niah_multikey``: the asked needle at the given depth plus three needles with other keys at
  random depths (distractors).
- ``niah_multivalue``: four values for the same key at random depths; all four are asked for.
- ``niah_multiturn``: two needles with different keys, the first at the given depth, the second
  at a random depth at least 0.25 away; turn 1 asks for the first. Turn 2 (``Followup``) is built
  by the backend once turn 1 has answered: turn 1's prompt, turn 1's generated tokens as they
  came out, then the chat template's end of that turn and a new user turn asking for the SECOND
  needle (``turn2_input_ids``).
- ``niah_single_uuid``, ``niah_multikey_word``, ...: the needle tasks with other needle values
  (RULER's ``type_needle_v``): the suffix names the value type, ``uuid`` (a random UUID4, about
  29 tokens) or ``word`` (an adjective-noun pair such as ``amber-compass``); no suffix means
  numbers (7 digits). The needle, instruction and question name the type ("special magic
  UUIDs"). ``niah_multiturn`` keeps numbers.

Needle offsets are jittered: a needle at depth ``d`` goes ``round(d x sentences)`` sentences
into the haystack, moved by 1-2 sentences towards the middle at depth 0 and 1 and by -2..2
sentences in between (seeded per sample). With the random start of every sample's essay window,
the needle's first token lands at a different offset in every sample, depth 0 included, so no
fixed chunk grid is favoured (``EvalSample.needle_offsets`` records where each needle value
starts).
"""

from __future__ import annotations

import random
import uuid

from .prompts import PromptBuilder, chat_messages, essay_sentences, fit_prompt, insert_at_depths
from .samples import EvalSample, Followup

#: Needle tasks whose value type can be chosen by a suffix (``niah_single_uuid``).
NEEDLE_BASES = ("niah_single", "niah_multikey", "niah_multivalue")
#: Needle value types (RULER's ``type_needle_v``); the first one is a bare task name's.
VALUE_TYPES = ("number", "uuid", "word")
TYPED_NEEDLE_TASKS = tuple(f"{base}_{kind}" for base in NEEDLE_BASES for kind in VALUE_TYPES[1:])

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



def _jitter(rng: random.Random, depth: float) -> int:
    """Sentences a needle at ``depth`` moves: 1-2 inwards at the edges, -2..2 in between."""
    if depth <= 0.0:
        return rng.randint(1, JITTER_SENTENCES)
    if depth >= 1.0:
        return -rng.randint(1, JITTER_SENTENCES)
    return rng.randint(-JITTER_SENTENCES, JITTER_SENTENCES)



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
        body = insert_at_depths(builder.fill(haystack, budget, overhead), needles, jitters)
        return f"{instruction}\n{body}", question, prefix

    ids, parts = fit_prompt(builder, length - max_tokens, make, length - max_tokens)
    offsets = builder.value_offsets(*parts, ids, [n for _, n in needles], shown)
    return EvalSample(id=f"{task}-{length}-d{depth:g}-{index}", task=task, length=length,
                      depth=depth, input_ids=ids, answers=values,
                      match="all" if multi else "any", max_tokens=max_tokens,
                      needle_offsets=offsets, context_len=builder.context_len(*parts, ids))


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
        body = insert_at_depths(builder.fill(haystack, budget, overhead), needles, jitters)
        return f"{instruction}\n{body}", question, prefix

    # The template's turn-2 tokens do not depend on the context: measured on a stand-in.
    suffix = followup_suffix(builder, chat_messages("", question, prefix), question2, prefix2)
    room = length - max_tokens - len(suffix) - FOLLOWUP_MAX_TOKENS
    ids, parts = fit_prompt(builder, room, make, room)
    # The real context, to be sure (the check inside raises if the template disagrees).
    suffix = followup_suffix(builder, chat_messages(*parts), question2, prefix2)
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
                      followup=followup, context_len=builder.context_len(*parts, ids))

