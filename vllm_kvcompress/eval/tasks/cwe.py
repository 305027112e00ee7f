"""RULER's common-word extraction (``cwe``): a numbered list of words in which ``CWE_COMMON``
words appear 30 times each and the others 3 times (``CWE_FREQ``; 6 and 1 below 4k tokens), in a
random order, after one short worked example; asked for the most common words (score: the
fraction of them in the answer). No word of a list contains another (substring grading).
Qwen2.5-0.5B scores 0 on it even with its full KV (docs/eval-plan.md).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable

from .prompts import PromptBuilder, essay_sentences
from .samples import EvalSample

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
        ids, parts = _fit_count(builder, length - max_tokens, make, len(uncommon))
    except RuntimeError as error:
        raise RuntimeError(f"cwe at {length} tokens: {common} words x {common_freq} and the "
                           f"worked example do not fit ({error}); use a longer length") from None
    return EvalSample(id=f"cwe-{length}-{index}", task="cwe", length=length, depth=-1.0,
                      input_ids=ids, answers=answer, match="all", max_tokens=max_tokens,
                      context_len=builder.context_len(*parts, ids))


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
