"""`kvcompress eval`'s tasks: generators, grading, the prompt set's limit, the context boundary.

The generators are checked on what makes a long-context task valid: the prompt has the size
class asked for, every answer is really in the context, needles sit at their depth (jittered, so
depth-0 needles do not all start at one token offset), a seed gives the same prompts, a cell has
its own needles per sample, a multi-turn sample's turn 2 carries turn 1's answer token for token
through the chat template and asks about the other needle, and every prompt's context ends on a
token boundary (``context_len``) with the question after it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from vllm_kvcompress.eval.tasks import (
    DEPTH_TASKS,
    TASKS,
    build_samples,
    limit_samples,
    score_answer,
    turn2_input_ids,
)
from vllm_kvcompress.eval.tasks.cwe import CWE_INSTRUCTION, make_cwe
from vllm_kvcompress.eval.tasks.needles import TYPED_NEEDLE_TASKS, needle_task
from vllm_kvcompress.eval.tasks.prompts import PromptBuilder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_samples_have_their_size_class_and_contain_the_answers(tokenizer: Any) -> None:
    # cwe's 60 list entries (RULER's 10 words x 6 below 4k) take more than 768 tokens of the
    # tiny model's tokenizer (about 8 an entry, Qwen2.5's 5): its shortest class here is 1536.
    tasks = [t for t in TASKS if t != "cwe"]
    samples = build_samples(tokenizer, tasks, [768, 1536], [0.0, 0.5, 1.0], 1, seed=3)
    samples += build_samples(tokenizer, ["cwe"], [1536], [0.0], 1, seed=3)
    assert {s.task for s in samples} == set(TASKS)
    others = len(TASKS) - len(DEPTH_TASKS) - 1  # variable_tracking, qa_squad (+ cwe once)
    assert len(samples) == len(DEPTH_TASKS) * 2 * 3 + others * 2 + 1  # needles over depths
    assert len({s.id for s in samples}) == len(samples)
    for sample in samples:
        room = sample.length - sample.max_tokens
        if sample.followup is not None:  # the length class holds both turns
            room -= len(sample.followup.suffix_ids) + sample.followup.max_tokens
        assert 0.93 * room <= len(sample.input_ids) <= room, sample.id
        text = tokenizer.decode(sample.input_ids)
        user_turn = text[:text.rindex("<|im_start|>assistant")]
        if sample.match == "all":  # every value / variable must be findable
            assert all(a in user_turn for a in sample.answers), sample.id
        else:
            assert any(a in user_turn for a in sample.answers), sample.id
        if sample.followup is not None:
            assert all(a in user_turn for a in sample.followup.answers), sample.id
        if sample.task.startswith("niah"):  # the offsets point at the needles' values
            assert len(sample.needle_offsets) >= 1, sample.id
            value = sample.answers[0]
            start = sample.needle_offsets[0]
            assert value in tokenizer.decode(sample.input_ids[start:start + len(value) + 2])


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_single_needle_sits_at_its_depth(tokenizer: Any, depth: float) -> None:
    # The jitter moves a needle by up to 2 sentences (of about 70 here): within 0.1 of depth.
    (sample,) = build_samples(tokenizer, ["niah_single"], [2048], [depth], 1, seed=0)
    text = tokenizer.decode(sample.input_ids)
    context = text[:text.rindex("What is the special magic number")]
    start = context.index("\n", context.index("afterwards."))
    position = (context.index(sample.answers[0]) - start) / (len(context) - start)
    assert abs(position - depth) < 0.1, position


def test_depth0_needles_start_at_different_offsets(tokenizer: Any) -> None:
    """Jitter: the samples of one depth-0 cell put their needle at different token offsets, so
    no fixed chunk grid keeps (or splits) all of them."""
    for task in ("niah_single", "niah_multikey", "niah_multiturn"):
        samples = build_samples(tokenizer, [task], [1024], [0.0], 4, seed=0)
        offsets = [s.needle_offsets[0] for s in samples]
        assert len(set(offsets)) == 4, (task, offsets)
        # Not one chunk phase either (chunks of 10 from token 0 and from token 4).
        assert len({o % 10 for o in offsets}) > 1, (task, offsets)


VALUE_PATTERNS = {"number": r"\d{7}", "word": r"[a-z]+-[a-z]+",
                  "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}


def _user_turn(tokenizer: Any, input_ids: list[int]) -> str:
    text = tokenizer.decode(input_ids)
    return text[:text.rindex("<|im_start|>assistant")]


@pytest.mark.parametrize("task", TYPED_NEEDLE_TASKS)
def test_typed_needles_have_their_values_in_the_prompt(tokenizer: Any, task: str) -> None:
    """RULER's type_needle_v: the suffix picks UUIDs or words; every needle of the prompt (the
    distractors too) has a value of that type, the question names it, the offsets point at the
    asked value, and depth-0 samples put it at different token offsets."""
    base, kind = needle_task(task)
    assert base in ("niah_single", "niah_multikey", "niah_multivalue") and kind in ("uuid", "word")
    samples = build_samples(tokenizer, [task], [1024], [0.0, 1.0], 3, seed=0)
    assert len(samples) == 6 and len({s.id for s in samples}) == 6
    noun = {"uuid": "UUID", "word": "word"}[kind]
    for sample in samples:
        assert sample.task == task and sample.max_tokens >= (32 if kind == "uuid" else 8)
        assert len(sample.input_ids) <= sample.length - sample.max_tokens
        user = _user_turn(tokenizer, sample.input_ids)
        assert f"special magic {noun}" in user.rsplit("\n\n", 1)[1], sample.id  # the question
        needles = re.findall(rf"special magic {noun}s for (\w+) is: ({VALUE_PATTERNS[kind]})\.",
                             user)
        expected = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4}[base]
        assert len(needles) == expected, (sample.id, needles)
        assert len({v for _, v in needles}) == expected  # distinct values
        assert all(a in user for a in sample.answers)
        if base == "niah_multikey":  # one asked key; the distractors' keys and values differ
            asked = [v for _, v in needles if v in sample.answers]
            assert asked == sample.answers and len({k for k, _ in needles}) == 4
        start = sample.needle_offsets[0]
        window = tokenizer.decode(sample.input_ids[start:start + len(sample.answers[0]) + 2])
        assert sample.answers[0] in window, (sample.id, window)
    depth0 = [s.needle_offsets[0] for s in samples if s.depth == 0.0]
    assert len(set(depth0)) == 3, depth0
    # Grading: the value anywhere in the answer, case-insensitive; a near miss scores 0.
    sample = samples[0]
    right = " ".join(sample.answers).upper()
    assert score_answer(f" {right}.", sample.answers, sample.match) == 1.0
    assert score_answer(f" {sample.answers[0][:-1]}", sample.answers, sample.match) == 0.0


def test_needle_task_names() -> None:
    assert needle_task("niah_multikey_uuid") == ("niah_multikey", "uuid")
    assert needle_task("niah_single") == ("niah_single", "number")
    assert needle_task("niah_multiturn") == ("niah_multiturn", "number")  # numbers only
    assert set(TYPED_NEEDLE_TASKS) <= set(TASKS) and set(TYPED_NEEDLE_TASKS) <= set(DEPTH_TASKS)


def _cwe_list(tokenizer: Any, input_ids: list[int]) -> list[str]:
    """The words of the asked list (after the worked example), in order."""
    user = _user_turn(tokenizer, input_ids)
    listed = user.rsplit(CWE_INSTRUCTION, 1)[1].split("Question:")[0]
    entries = re.findall(r"(\d+)\. ([a-z]+)", listed)
    assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
    return [w for _, w in entries]


@pytest.mark.parametrize(("length", "freq"), [(2048, (6, 1)), (4096, (30, 3))])
def test_cwe_asks_for_the_words_that_appear_most(tokenizer: Any, length: int,
                                                  freq: tuple[int, int]) -> None:
    """RULER's frequencies (6/1 below 4k, 30/3 from 4k): the answers are exactly the words
    listed most often, every other word less often; no word contains another (substring
    grading); the list fills its size class, and samples differ in words and order."""
    samples = build_samples(tokenizer, ["cwe"], [length], [0.5], 3, seed=0)
    assert len(samples) == 3 and {s.match for s in samples} == {"all"}
    firsts = []
    for sample in samples:
        assert 0.97 * (length - sample.max_tokens) <= len(sample.input_ids)
        assert len(sample.input_ids) <= length - sample.max_tokens
        words = _cwe_list(tokenizer, sample.input_ids)
        counts = {w: words.count(w) for w in words}
        assert len(sample.answers) == 10
        assert {counts[a] for a in sample.answers} == {freq[0]}, sample.id
        assert {n for w, n in counts.items() if w not in sample.answers} == {freq[1]}
        assert not any(a != b and a in b for a in counts for b in counts), sample.id
        firsts.append(words.index(sample.answers[0]))
    assert len({tuple(s.answers) for s in samples}) == 3 and len(set(firsts)) > 1


def test_cwe_scores_the_fraction_of_words_recovered(tokenizer: Any) -> None:
    sample = make_cwe(PromptBuilder(tokenizer), 1024, 0, 64, seed=1, common=4, freq=(5, 1))
    assert len(sample.answers) == 4 and "4 most common words" in tokenizer.decode(
        sample.input_ids)
    words = _cwe_list(tokenizer, sample.input_ids)
    assert all(words.count(a) == 5 for a in sample.answers)
    other = next(w for w in words if w not in sample.answers)
    answer = f" 1. {sample.answers[2]} 2. {other} 3. {sample.answers[0].upper()}"
    assert score_answer(answer, sample.answers, sample.match) == 0.5
    assert score_answer(" ".join(sample.answers), sample.answers, sample.match) == 1.0


def test_samples_per_cell_have_their_own_needles(tokenizer: Any) -> None:
    samples = build_samples(tokenizer, ["niah_single", "niah_multiturn", "qa_squad"], [768],
                            [0.5], 4, seed=0)
    for task in ("niah_single", "niah_multiturn", "qa_squad"):
        mine = [s for s in samples if s.task == task]
        assert len(mine) == 4 and len({s.id for s in mine}) == 4
        assert len({tuple(s.answers) for s in mine}) == 4, task
        assert len({tuple(s.input_ids) for s in mine}) == 4, task


def test_multiturn_turn2_carries_turn1_answer_and_asks_the_other_needle(tokenizer: Any) -> None:
    (sample,) = build_samples(tokenizer, ["niah_multiturn"], [1024], [0.25], 1, seed=5)
    followup = sample.followup
    assert followup is not None and followup.answers != sample.answers
    assert len(sample.needle_offsets) == 2 and len(set(sample.needle_offsets)) == 2
    first_key = tokenizer.decode(sample.input_ids).rsplit("number for ", 1)[1].split()[0]
    second_key = followup.question.split("number for ", 1)[1].split()[0]
    assert first_key != second_key
    # A turn-1 answer as a model would generate it: any text, then the end-of-turn token.
    answer = tokenizer(" 1234567, I think", add_special_tokens=False)["input_ids"]
    ids = turn2_input_ids(sample.input_ids, [*answer, tokenizer.eos_token_id],
                          followup.suffix_ids, followup.stop_ids)
    # Turn 1's prompt, then its answer token for token, then the template's turn 2.
    assert ids[:len(sample.input_ids)] == sample.input_ids
    assert ids[len(sample.input_ids):len(sample.input_ids) + len(answer)] == answer
    # The same as the chat template rendering the whole conversation.
    text = tokenizer.decode(sample.input_ids, skip_special_tokens=False)
    context, question = text.split("<|im_start|>user\n", 1)[1].split(
        "<|im_end|>")[0].rsplit("\n\n", 1)
    prefix = text.rsplit("<|im_start|>assistant\n", 1)[1]
    builder = PromptBuilder(tokenizer)
    conversation = [{"role": "user", "content": f"{context}\n\n{question}"},
                    {"role": "assistant", "content": prefix + " 1234567, I think"},
                    {"role": "user", "content": followup.question},
                    {"role": "assistant", "content": prefix.replace(first_key, second_key)}]
    expected = tokenizer(builder.render(conversation), add_special_tokens=False)["input_ids"]
    assert ids == expected
    # Grading: turn 2 is right with the second needle's value only.
    assert score_answer(f" {followup.answers[0]}.", followup.answers, followup.match) == 1.0
    assert score_answer(f" {sample.answers[0]}.", followup.answers, followup.match) == 0.0


def test_seed_fixes_the_prompts(tokenizer: Any) -> None:
    first = build_samples(tokenizer, ["niah_multikey", "qa_squad"], [1024], [0.5], 1, seed=7)
    again = build_samples(tokenizer, ["niah_multikey", "qa_squad"], [1024], [0.5], 1, seed=7)
    other = build_samples(tokenizer, ["niah_multikey", "qa_squad"], [1024], [0.5], 1, seed=8)
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    assert [s.answers for s in first] != [s.answers for s in other]


def test_bad_task_or_depth_names_it(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"unknown task.*niah_triple"):
        build_samples(tokenizer, ["niah_triple"], [1024], [0.5], 1, seed=0)
    with pytest.raises(ValueError, match="depths must be in"):
        build_samples(tokenizer, ["niah_single"], [1024], [1.5], 1, seed=0)


def test_grading_follows_ruler() -> None:
    assert score_answer(" It is 1234567.", ["1234567"], "any") == 1.0
    assert score_answer(" It is 123456.", ["1234567"], "any") == 0.0
    assert score_answer("xa, B, c", ["A", "b", "C", "z"], "all") == 0.75
    assert score_answer("Paris", ["paris", "Lyon"], "any") == 1.0
    with pytest.raises(ValueError, match="match"):
        score_answer("x", ["x"], "some")

def test_limit_spreads_over_the_grid(tokenizer: Any) -> None:
    samples = build_samples(tokenizer, ["niah_single", "variable_tracking"], [512, 1024],
                            [0.0, 0.5, 1.0], 1, seed=0)
    chosen = limit_samples(samples, 2)
    single = [s for s in chosen if s.task == "niah_single"]
    assert len(single) == 2 and {s.length for s in single} == {512, 1024}
    assert len([s for s in chosen if s.task == "variable_tracking"]) == 2
    # One prompt set with the same n per task: 5 depths x 4 per cell limited to 4 covers four
    # depths (not four samples of depth 0), the other tasks keep their 4.
    samples = build_samples(tokenizer, ["niah_single", "variable_tracking"], [512],
                            [0.0, 0.25, 0.5, 0.75, 1.0], 4, seed=0)
    chosen = limit_samples(samples, 4)
    single = [s for s in chosen if s.task == "niah_single"]
    assert sorted(s.depth for s in single) == [0.0, 0.25, 0.5, 0.75]
    assert len([s for s in chosen if s.task == "variable_tracking"]) == 4
    eight = [s for s in limit_samples(samples, 8) if s.task == "niah_single"]
    assert sorted(s.depth for s in eight) == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 1.0]


def test_raising_the_limit_keeps_the_earlier_prompts(tokenizer: Any) -> None:
    """A results store extends: the prompts of a smaller study are the first of a larger one,
    the same token ids (same prompt keys), so their predictions still count."""
    tasks = ["niah_single", "variable_tracking"]
    small = limit_samples(build_samples(tokenizer, tasks, [512], [0.0, 0.5, 1.0], 2, 0), 2)
    large = limit_samples(build_samples(tokenizer, tasks, [512], [0.0, 0.5, 1.0], 4, 0), 5)
    keys = {s.id: s.prompt_key for s in large}
    assert len(large) == 5 + 4 and len(small) == 2 + 2  # variable tracking: 4 per cell
    assert all(keys[s.id] == s.prompt_key for s in small)


def _boundary_tokenizers(tokenizer: Any) -> list[Any]:
    """The tiny model's tokenizer, and SmolLM2's and Qwen2.5's where `make models` made them
    (their tokenizers cut the context differently: SmolLM2 before the blank line, Qwen2.5
    after it, where ``.`` and ``\\n\\n`` merge)."""
    from transformers import AutoTokenizer

    found = [tokenizer]
    for name in ("smollm2", "qwen2.5-0.5b-instruct"):
        if (REPO / "models" / name / "tokenizer_config.json").is_file():
            found.append(AutoTokenizer.from_pretrained(REPO / "models" / name))
    return found


def test_context_ends_on_a_token_boundary_before_the_question(tokenizer: Any) -> None:
    """``context_len``: the context alone, tokenized by itself, is exactly the first ids of the
    whole prompt, and everything after it starts with the question (every task family)."""
    tasks = ["niah_single", "niah_multivalue_uuid", "niah_multiturn", "variable_tracking",
             "qa_squad", "cwe"]
    for tok in _boundary_tokenizers(tokenizer):
        for sample in build_samples(tok, tasks, [1536], [0.0, 1.0], 1, seed=3):
            ids, n = sample.input_ids, sample.context_len
            assert n is not None and 0 < n < len(ids), sample.id
            head = tok.decode(ids[:n])
            rest = tok.decode(ids[n:])
            # The context alone tokenizes to the prompt's first ids (a clean boundary) ...
            assert list(tok(head, add_special_tokens=False)["input_ids"]) == ids[:n], sample.id
            # ... and the rest is the question (at most the blank line before it), the template
            # and the answer prefix: no character of the context.
            assert re.match(r"\s*(What|Find|Answer|Question)", rest), (sample.id, rest[:40])
            assert sample.to_json()["context_len"] == n


def test_multiturn_lengths(tokenizer: Any) -> None:
    samples = build_samples(tokenizer, ["niah_single", "niah_multiturn"], [1536], [0.0], 1, 0,
                            multiturn_lengths=[768])
    assert {(s.task, s.length) for s in samples} == {("niah_single", 1536),
                                                     ("niah_multiturn", 768)}
