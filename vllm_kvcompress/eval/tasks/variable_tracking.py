"""RULER's variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... spread through a
repetitive noise text; asked for every variable that holds the value."""

from __future__ import annotations

import random

from .prompts import PromptBuilder, fit_prompt, insert_at_depths
from .samples import EvalSample

# RULER's variable-tracking and "repeat" haystacks use this noise.
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again. ")


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
        body = insert_at_depths(filler, list(zip(depths, chain, strict=True)))
        return f"{instruction}\n\n{body}", question, prefix

    ids, parts = fit_prompt(builder, length - max_tokens, make, length - max_tokens)
    return EvalSample(id=f"variable_tracking-{length}-{index}", task="variable_tracking",
                      length=length, depth=-1.0, input_ids=ids, answers=names, match="all",
                      max_tokens=max_tokens, context_len=builder.context_len(*parts, ids))
