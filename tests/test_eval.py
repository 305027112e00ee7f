"""`kvcompress eval`: task generators, grading, options, and the engine backend end to end.

The generators are checked on what makes a long-context task valid: the prompt has the size
class asked for, every answer is really in the context, needles sit at their depth (jittered, so
depth-0 needles do not all start at one token offset), a seed gives the same prompts, a cell has
its own needles per sample, and a multi-turn sample's turn 2 carries turn 1's answer token for
token through the chat template and asks about the other needle. The bootstrap intervals are
checked against hand-computed cases. The engine backend runs the tiny Llama: prefix reuse
(baseline pass, then the compressed pass hitting the cached prompt, then turn 2) gives the same
tokens as prefilling every request, a rerun resumes instead of repeating, and the report writes
its files with intervals, paired differences and held ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from vllm_kvcompress.eval import run as eval_run
from vllm_kvcompress.eval.stats import bootstrap_ci, paired_bootstrap_ci
from vllm_kvcompress.eval.tasks import (
    CWE_INSTRUCTION,
    DEPTH_TASKS,
    TASKS,
    TYPED_NEEDLE_TASKS,
    PromptBuilder,
    build_samples,
    make_cwe,
    needle_task,
    score_answer,
    turn2_input_ids,
)


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


def _args(**overrides: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_run.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(("field", "value", "message"), [
    ("policies", ["snapkv", "magic"], "--policies: unknown policy 'magic'"),
    ("ratios", [0.25, 1.5], "--ratios: 1.5"),
    ("lengths", [100], "--lengths: 100"),
    ("limit", 0, "--limit"),
    ("samples_per_cell", 0, "--samples-per-cell"),
    ("head_select", ["shared", "shared"], "--head-select"),
    ("multiturn_lengths", [128], "--multiturn-lengths: 128"),
    ("chunk_grid_ablation", True, "--chunk-grid-ablation needs chunkkv"),
])
def test_options_are_checked_before_work(field: str, value: Any, message: str) -> None:
    overrides = {field: value}
    if field == "chunk_grid_ablation":
        overrides["policies"] = ["snapkv"]
    with pytest.raises(ValueError, match=message):
        eval_run.validate(_args(**overrides))
    with pytest.raises(ValueError, match="--chunk-grid: kvpress"):
        eval_run.validate(_args(backend="kvpress", chunk_grid="from_zero"))


def test_grid_variants_override_only_their_configuration() -> None:
    from vllm_kvcompress.eval import engine_backend as eb

    params = {"window": 32, "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4}
    grid0 = eb.request_args(eb.RunConfig("chunkkv", 0.25, "shared", "grid0"), params)
    assert grid0["kv_chunk_grid"] == "from_zero" and grid0["kv_sink_tokens"] == 4
    sink0 = eb.request_args(eb.RunConfig("chunkkv", 0.25, "shared", "sink0"), params)
    assert sink0["kv_sink_tokens"] == 0 and "kv_chunk_grid" not in sink0
    plain = eb.request_args(eb.RunConfig("chunkkv", 0.25), params)
    assert "kv_chunk_grid" not in plain and plain["kv_sink_tokens"] == 4
    assert params["sink_tokens"] == 4  # the run's parameters are left alone
    assert eb.config_label("chunkkv", "per_head", "grid0") == "chunkkv[per_head](grid0)"
    assert eb.config_label("none", "shared") == "none"
    with pytest.raises(ValueError, match="unknown variant"):
        eb.config_key("chunkkv", 0.25, "shared", "grid1")


def test_multiturn_lengths_and_one_prompt_set_per_folder(tokenizer: Any, tmp_path: Path) -> None:
    samples = build_samples(tokenizer, ["niah_single", "niah_multiturn"], [1536], [0.0], 1, 0,
                            multiturn_lengths=[768])
    assert {(s.task, s.length) for s in samples} == {("niah_single", 1536),
                                                     ("niah_multiturn", 768)}
    # Backends sharing a folder must share its prompts (samples.jsonl), or pairs are wrong.
    settings = {k: None for k in eval_run.PROMPT_KEYS} | {"lengths": [1024]}
    (tmp_path / "settings-kvpress.json").write_text(json.dumps(settings))
    (tmp_path / "predictions-kvpress.jsonl").write_text("")
    eval_run._check_same_prompts(tmp_path, "vllm", settings)
    with pytest.raises(ValueError, match=r"kvpress predictions on other prompts \(lengths"):
        eval_run._check_same_prompts(tmp_path, "vllm", {**settings, "lengths": [2048]})
    eval_run._check_same_prompts(tmp_path, "kvpress", {**settings, "lengths": [2048]})


def test_new_options_parse() -> None:
    parser = argparse.ArgumentParser()
    eval_run.add_arguments(parser)
    args = parser.parse_args([])
    assert args.samples_per_cell == 4 and args.head_select == ["shared"]
    assert args.bootstrap == 1000 and "niah_multiturn" in args.tasks
    args = parser.parse_args(["--samples-per-cell", "6", "--head-select", "shared", "per_head"])
    assert args.samples_per_cell == 6 and args.head_select == ["shared", "per_head"]
    assert parser.parse_args(["--per-cell", "2"]).samples_per_cell == 2  # the old spelling
    with pytest.raises(SystemExit):
        parser.parse_args(["--head-select", "per_token"])


def test_per_head_is_refused_until_the_policy_layer_has_it() -> None:
    from vllm_kvcompress.eval import engine_backend

    args = _args(head_select=["shared", "per_head"])
    if engine_backend.head_select_supported():
        eval_run.validate(args)
        xargs = engine_backend.request_args(engine_backend.RunConfig("snapkv", 0.5, "per_head"),
                                            {"window": 32})
        assert xargs["kv_head_select"] == "per_head"
    else:
        with pytest.raises(ValueError, match="--head-select per_head"):
            eval_run.validate(args)
        xargs = engine_backend.request_args(engine_backend.RunConfig("snapkv", 0.5), {})
        assert "kv_head_select" not in xargs  # `shared` is today's only behaviour
    assert engine_backend.request_args(engine_backend.RunConfig("none", 1.0), {}) == {
        "kv_policy": "none"}


def test_limit_spreads_over_the_grid(tokenizer: Any) -> None:
    samples = build_samples(tokenizer, ["niah_single", "variable_tracking"], [512, 1024],
                            [0.0, 0.5, 1.0], 1, seed=0)
    chosen = eval_run.limit_samples(samples, 2)
    single = [s for s in chosen if s.task == "niah_single"]
    assert len(single) == 2 and {s.length for s in single} == {512, 1024}
    assert len([s for s in chosen if s.task == "variable_tracking"]) == 2
    # One prompt set with the same n per task: 5 depths x 4 per cell limited to 4 covers four
    # depths (not four samples of depth 0), the other tasks keep their 4.
    samples = build_samples(tokenizer, ["niah_single", "variable_tracking"], [512],
                            [0.0, 0.25, 0.5, 0.75, 1.0], 4, seed=0)
    chosen = eval_run.limit_samples(samples, 4)
    single = [s for s in chosen if s.task == "niah_single"]
    assert sorted(s.depth for s in single) == [0.0, 0.25, 0.5, 0.75]
    assert len([s for s in chosen if s.task == "variable_tracking"]) == 4
    eight = [s for s in eval_run.limit_samples(samples, 8) if s.task == "niah_single"]
    assert sorted(s.depth for s in eight) == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 1.0]
    assert eval_run.configurations(["snapkv"], [1.0, 0.5]) == [("none", 1.0, "shared", ""),
                                                                ("snapkv", 0.5, "shared", "")]
    assert eval_run.configurations(["snapkv"], [0.5, 0.1], ["shared", "per_head"]) == [
        ("none", 1.0, "shared", ""), ("snapkv", 0.5, "shared", ""),
        ("snapkv", 0.5, "per_head", ""), ("snapkv", 0.1, "shared", ""),
        ("snapkv", 0.1, "per_head", "")]
    assert eval_run.configurations(["chunkkv"], [0.5], chunk_grid_ablation=True) == [
        ("none", 1.0, "shared", ""), ("chunkkv", 0.5, "shared", ""),
        ("chunkkv", 0.5, "shared", "grid0"), ("chunkkv", 0.5, "shared", "sink0")]
    # default: each policy's registered mode, listed once even when also named.
    assert eval_run.configurations(["snapkv", "knorm"], [0.5], ["default", "per_head"]) == [
        ("none", 1.0, "shared", ""), ("snapkv", 0.5, "shared", ""),
        ("snapkv", 0.5, "per_head", ""), ("knorm", 0.5, "per_head", "")]


# --- bootstrap intervals ---


def test_bootstrap_ci_hand_computed_cases() -> None:
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0)
    assert bootstrap_ci([0.0] * 3) == (0.0, 0.0)
    assert bootstrap_ci([0.4]) == (0.4, 0.4)
    assert bootstrap_ci([]) is None
    # Two prompts: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5th percentile is 0 and the 97.5th is 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # [0, 0, 0, 1]: the mean of a resample is k/4, k ~ Binomial(4, 1/4): P(k <= 0) = 0.316,
    # P(k <= 2) = 0.949, P(k <= 3) = 0.996: percentiles 2.5 -> 0, 97.5 -> 0.75.
    assert bootstrap_ci([0.0, 0.0, 0.0, 1.0]) == (0.0, 0.75)
    # Fixed seed: the same interval every time; more prompts, a narrower interval.
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0]
    low, high = bootstrap_ci(scores)
    assert bootstrap_ci(scores) == (low, high) and low < sum(scores) / 8 < high
    wide, narrow = bootstrap_ci(scores), bootstrap_ci(scores * 8)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_paired_ci_sign_and_pairing() -> None:
    assert paired_bootstrap_ci([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) == (1.0, 1.0)
    assert paired_bootstrap_ci([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]) == (-1.0, -1.0)
    # Equal per prompt, however the scores vary: the difference is exactly 0.
    varied = [0.0, 1.0, 0.5, 1.0, 0.0, 0.25]
    assert paired_bootstrap_ci(varied, varied) == (0.0, 0.0)
    # One prompt worse out of eight: the interval reaches 0 (">=" holds) ...
    ours, peer = [1.0] * 7 + [0.0], [1.0] * 8
    assert paired_bootstrap_ci(ours, peer)[1] == 0.0
    # ... and four out of eight: it does not.
    assert paired_bootstrap_ci([1.0] * 4 + [0.0] * 4, peer)[1] < 0.0
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_ci([1.0], [1.0, 0.0])


def test_pyramidkv_holds_more_than_its_nominal_ratio() -> None:
    from vllm_kvcompress.config import CompressionSpec
    from vllm_kvcompress.eval.engine_backend import held_tokens

    prompt_len, layers = 4096, 30  # SmolLM2: 30 layers
    for ratio in (0.5, 0.25, 0.1):
        nominal = math.ceil(ratio * prompt_len)
        pyramid = held_tokens(CompressionSpec(policy="pyramidkv", ratio=ratio), prompt_len,
                              layers)
        assert nominal < pyramid <= prompt_len, (ratio, pyramid)
        for policy in ("snapkv", "chunkkv", "streamingllm"):  # one budget for every layer
            spec = CompressionSpec(policy=policy, ratio=ratio)
            assert held_tokens(spec, prompt_len, layers) == spec.kept_tokens(prompt_len)
    assert held_tokens(CompressionSpec(policy="none"), prompt_len, layers) == prompt_len


@pytest.mark.engine
def test_engine_backend_prefix_reuse_is_exact_and_resumable(tiny_model: Path, tokenizer: Any,
                                                            tmp_path: Path) -> None:
    from vllm_kvcompress.eval import engine_backend

    samples = build_samples(tokenizer, ["niah_single", "qa_squad"], [768], [0.0, 1.0], 1, 0)
    samples += build_samples(tokenizer, ["niah_multiturn"], [768], [0.5], 1, 0)
    configs = [("snapkv", 0.25), ("chunkkv", 0.25), ("streamingllm", 0.1), ("pyramidkv", 0.25)]
    params = {"window": 16, "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4}

    def rows_of(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    def outputs(path: Path) -> dict[tuple[str, str, float, int], list[int]]:
        return {(r["id"], r["policy"], r["ratio"], r["turn"]): r["output_ids"]
                for r in rows_of(path)}

    reused = engine_backend.run(samples, configs, params, str(tiny_model),
                                tmp_path / "reused.jsonl", group_tokens=1600)
    fresh = engine_backend.run(samples, configs, params, str(tiny_model),
                               tmp_path / "fresh.jsonl", prefix_reuse=False)
    # Every sample x (4 configs + the `none` baseline), plus turn 2 of the multi-turn one.
    assert len(outputs(reused)) == (len(samples) + 1) * 5
    assert outputs(reused) == outputs(fresh)
    rows = rows_of(reused)
    kept = {(r["policy"], r["ratio"]): r["kept_tokens"] / r["prompt_tokens"] for r in rows}
    assert kept[("none", 1.0)] == 1.0 and abs(kept[("snapkv", 0.25)] - 0.25) < 0.01
    for r in rows:  # memory held: the kept budget, but PyramidKV's largest layer budget
        assert r["head_select"] == "shared" and r["variant"] == ""
        if r["policy"] in ("snapkv", "chunkkv", "streamingllm"):
            assert r["held_tokens"] == r["kept_tokens"]
        elif r["policy"] == "pyramidkv":
            assert r["kept_tokens"] < r["held_tokens"] <= r["prompt_tokens"]
    # Turn 2: turn 1's prompt + its answer as generated (EOS dropped) + the template's turn 2.
    (multi,) = [s for s in samples if s.followup is not None]
    first = {r["policy"]: r for r in rows if r["id"] == multi.id and r["turn"] == 1}
    second = {r["policy"]: r for r in rows if r["id"] == multi.id and r["turn"] == 2}
    assert set(first) == set(second) == {"none", "snapkv", "chunkkv", "streamingllm",
                                         "pyramidkv"}
    for policy, row in second.items():
        answer = turn2_input_ids([], first[policy]["output_ids"], [], multi.followup.stop_ids)
        assert row["prompt_tokens"] == (len(multi.input_ids) + len(answer)
                                        + len(multi.followup.suffix_ids)), policy
    before = reused.read_text()
    engine_backend.run(samples, configs, params, str(tiny_model), reused)  # nothing left to do
    assert reused.read_text() == before
    # A crash lost the last turn-2 rows: only they are redone, from turn 1's recorded answers.
    lines = before.splitlines(keepends=True)
    reused.write_text("".join(line for line in lines if '"turn": 2' not in line))
    engine_backend.run(samples, configs, params, str(tiny_model), reused)
    assert outputs(reused) == outputs(fresh)


def _fake_run(folder: Path, n: int = 4) -> None:
    """Hand-made predictions: ``n`` single-needle prompts and ``n`` multi-turn ones, ours
    (shared and per_head) and kvpress's (PyramidKV also at our held ratio)."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = [{"id": f"niah_single-4096-d{d:g}-{i}", "task": "niah_single", "length": 4096,
                "depth": d, "answers": ["1234567"], "match": "any", "max_tokens": 16,
                "needle_offsets": [60 + i]} for i in range(n) for d in (0.0, 1.0)]
    samples += [{"id": f"niah_multiturn-4096-d0-{i}", "task": "niah_multiturn", "length": 4096,
                 "depth": 0.0, "answers": ["1111111"], "match": "any", "max_tokens": 16,
                 "needle_offsets": [70 + i, 900], "followup": {
                     "question": "q", "suffix_ids": [3, 4], "stop_ids": [3],
                     "answers": ["2222222"], "match": "any", "max_tokens": 16}}
                for i in range(n)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    right = {"vllm": {("none", "shared"), ("chunkkv", "shared"), ("pyramidkv", "shared")},
             "kvpress": {("none", None)}}
    configs = {"vllm": [("none", 1.0, "shared", ""), ("chunkkv", 0.25, "shared", ""),
                        ("chunkkv", 0.25, "per_head", ""), ("pyramidkv", 0.25, "shared", ""),
                        ("chunkkv", 0.25, "shared", "grid0"), ("chunkkv", 0.25, "shared", "sink0")],
               "kvpress": [("none", 1.0, None, ""), ("chunkkv", 0.25, None, ""),
                           ("pyramidkv", 0.25, None, ""), ("pyramidkv", 0.4, None, "")]}
    for backend, mine in configs.items():
        lines = []
        for n, sample in enumerate(samples):
            for policy, ratio, mode, variant in mine:
                good = (policy, mode) in right[backend]
                if variant == "sink0":  # no sinks: right on the first half of the prompts only
                    good = n < len(samples) // 2
                held = 400 if policy == "pyramidkv" and backend == "vllm" else ratio * 1000
                line = {"id": sample["id"], "policy": policy, "ratio": ratio,
                        "text": " 1234567." if good else " 12.", "prompt_tokens": 1000,
                        "kept_tokens": int(ratio * 1000)}
                if backend == "vllm":
                    line.update(head_select=mode, held_tokens=held, variant=variant)
                else:
                    line["kept_tokens_per_layer"] = [held + 50, held - 50]
                if sample["task"] == "niah_multiturn":
                    line["text"] = " 1111111." if good else " 12."
                    # Turn 2: full KV right, every compressed config wrong.
                    lines.append({**line, "turn": 2, "text": " 2222222." if policy == "none"
                                  else " 1111111.", "prompt_tokens": 1030})
                lines.append(line)
        (folder / f"predictions-{backend}.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines))


def test_report_grades_every_backend_and_writes_plots(tmp_path: Path) -> None:
    _fake_run(tmp_path)
    result = eval_run.report(tmp_path)
    table = {(s["backend"], s["label"], s["ratio"]): s for s in result["summary"]}
    accuracy = {key: s["accuracy"] for key, s in table.items()}
    assert accuracy == {
        ("vllm", "none", 1.0): 1.0, ("vllm", "chunkkv", 0.25): 1.0,
        ("vllm", "chunkkv[per_head]", 0.25): 0.0, ("vllm", "pyramidkv", 0.25): 1.0,
        ("vllm", "chunkkv(grid0)", 0.25): 1.0, ("vllm", "chunkkv(sink0)", 0.25): 0.5,
        ("kvpress", "none", 1.0): 1.0, ("kvpress", "chunkkv", 0.25): 0.0,
        ("kvpress", "pyramidkv[per_head]", 0.25): 0.0,
        ("kvpress", "pyramidkv[per_head]", 0.4): 0.0}
    none = table[("vllm", "none", 1.0)]
    assert none["samples"] == 12 and none["accuracy_ci"] == [1.0, 1.0]
    # Multi-turn: turn 1 and turn 2 side by side, full KV included.
    assert none["niah_multiturn"] == 1.0 and none["turn2"] == 1.0 and none["turn2_samples"] == 4
    assert table[("vllm", "chunkkv", 0.25)]["turn2"] == 0.0
    assert table[("vllm", "chunkkv", 0.25)]["turn2_ci"] == [0.0, 0.0]
    # Held memory: ours PyramidKV 0.4 at nominal 0.25; kvpress's per-layer mean.
    assert table[("vllm", "pyramidkv", 0.25)]["held_ratio"] == pytest.approx(0.4)
    assert table[("kvpress", "pyramidkv[per_head]", 0.4)]["held_ratio"] == pytest.approx(0.4)
    assert table[("vllm", "chunkkv", 0.25)]["held_ratio"] == pytest.approx(0.25)
    # kvpress's selection mode per press.
    assert table[("kvpress", "chunkkv", 0.25)]["head_select"] == "shared"
    # Ours - kvpress, paired: nominal pairs (the grid variants are the ablation's), and PyramidKV
    # also at the same held memory.
    pairs = {(c["label"], c["ratio"], c["match"]): c for c in result["comparison"]}
    assert set(pairs) == {("none", 1.0, "nominal"), ("chunkkv", 0.25, "nominal"),
                          ("chunkkv[per_head]", 0.25, "nominal"),
                          ("pyramidkv", 0.25, "nominal"), ("pyramidkv", 0.25, "held")}
    assert pairs[("chunkkv", 0.25, "nominal")]["diff_ci"] == [1.0, 1.0]
    assert pairs[("chunkkv", 0.25, "nominal")]["ge"]
    assert pairs[("chunkkv[per_head]", 0.25, "nominal")]["diff"] == 0.0
    assert pairs[("chunkkv[per_head]", 0.25, "nominal")]["ge"]  # [0, 0] reaches 0
    assert pairs[("pyramidkv", 0.25, "held")]["kvpress_ratio"] == 0.4
    assert pairs[("pyramidkv", 0.25, "held")]["kvpress_mode"] == "per_head"
    assert pairs[("none", 1.0, "nominal")]["diff_ci"] == [0.0, 0.0]
    targets = {t["target"].split(":")[0]: t for t in result["targets"]}
    assert targets["chunkkv"]["met"] and targets["chunkkv"]["misses"] == []
    assert "same held memory" in targets["pyramidkv"]["target"]
    assert targets["chunkkv 0.25 kept"]["met"] and targets["chunkkv[per_head] 0.25 kept"][
        "raw"] == [0.0, 1.0]
    assert targets["chunkkv(sink0) 0.25 kept"]["raw"] == [0.75, 1.0]  # 6 of the 8 needles
    turn2 = targets["chunkkv 0.25 kept, multi-turn"]
    assert turn2["raw"] == [0.0, 1.0] and not turn2["met"]
    for name in ("results.json", "results.csv", "accuracy_vs_ratio.png", "heatmap_vllm.png",
                 "heatmap_kvpress.png"):
        assert (tmp_path / name).stat().st_size > 0
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    for column in ("turn", "head_select", "variant", "held_tokens", "held_ratio",
                   "needle_offset"):
        assert column in header


def test_report_names_the_cells_where_ours_misses(tmp_path: Path) -> None:
    _fake_run(tmp_path)
    # kvpress right everywhere for chunkkv: ours shared equal (>= holds), per_head worse.
    path = tmp_path / "predictions-kvpress.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        if line["policy"] == "chunkkv" and line.get("turn", 1) == 1:
            line["text"] = " 1234567. 1111111."
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = eval_run.report(tmp_path)
    targets = {t["target"].split(":")[0]: t for t in result["targets"]}
    assert targets["chunkkv"]["met"]
    assert not targets["chunkkv[per_head]"]["met"]
    assert targets["chunkkv[per_head]"]["misses"] == ["0.25"]


def test_results_page_has_tables_targets_and_images(tmp_path: Path) -> None:
    """`make results`: docs/results.md from runs/, missing inputs named, images copied, every
    accuracy table with intervals, the ablation with both grids."""
    from vllm_kvcompress.bench.results import build

    runs = tmp_path / "runs"
    _fake_run(runs / "eval")  # ours and kvpress on the same prompts, with the grid variants
    eval_run.report(runs / "eval")
    row = {"policy": "none", "ratio": 1.0, "max_tokens": 16, "requests_per_s": 1.0,
           "output_tokens_per_s": 10.0, "output_tokens_per_s_vs_none": 1.0, "peak_running": 4,
           "peak_running_vs_none": 1.0, "peak_goal": 3.6, "peak_goal_met": True,
           "preemptions": 0, "ttft_p50_s": 1.0, "ttft_p99_s": 2.0, "tpot_p50_s": 0.1,
           "tpot_p99_s": 0.2}
    compressed = {**row, "policy": "chunkkv", "ratio": 0.25, "output_tokens_per_s": 25.0,
                  "output_tokens_per_s_vs_none": 2.5, "peak_running": 13,
                  "peak_running_vs_none": 3.25, "peak_goal": 14.4, "peak_goal_met": False}
    (runs / "bench-throughput").mkdir(parents=True)
    (runs / "bench-throughput" / "throughput.json").write_text(json.dumps({
        "machine": {"cpu": "cpu", "cores": 2, "date": "today"}, "command": "kvcompress bench",
        "workload": {"requests": 24, "prompt_len": 1024, "pool_holds_full_requests": 4,
                     "block_size": 32}, "rows": [row, compressed]}))
    (runs / "bench-overhead").mkdir(parents=True)
    (runs / "bench-overhead" / "overhead.json").write_text(json.dumps({
        "machine": {"cpu": "cpu", "cores": 2, "date": "today"}, "command": "kvcompress bench "
        "overhead", "dtype": "float32", "throughput": None,
        "ttft": {"prompt_len": 4096, "kv_ratio": 0.25, "per_policy": {
            "none": {"median_ttft_s": 10.0, "median_compaction_s": 0.0, "ttft_vs_none": 1.0,
                     "compaction_share_of_ttft": 0.0},
            "knorm[per_head]": {"median_ttft_s": 10.4, "median_compaction_s": 0.6,
                                "ttft_vs_none": 1.04, "compaction_share_of_ttft": 0.0577}}}}))
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    text = build(runs, out)
    assert "| knorm[per_head] | 10.40 | 1.040 | 0.600 | 5.8% | **no** |" in text
    assert "| none | 10.00 | 1.000 | 0.000 | 0.0% | yes |" in text
    # Our table: held ratio, n, all tasks with its interval, needles at 4k, both turns.
    assert ("| none | 1 | 1.00 | 12 | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] | "
            "1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] |") in text
    assert "| pyramidkv | 0.25 | 0.40 | 12 | 1.00 [1.00, 1.00] |" in text
    assert "| chunkkv[per_head] | 0.25 | 0.25 | 12 | 0.00 [0.00, 0.00] |" in text
    # Ours vs kvpress: paired interval and the ">=" column; PyramidKV at the same memory.
    assert ("| chunkkv | 0.25 | nominal | 0.25 | shared | 0.25 | 0.25 | 12 | 1.00 [1.00, 1.00] | "
            "0.00 [0.00, 0.00] | 1.000 [1.000, 1.000] | yes |") in text
    assert "| pyramidkv | 0.25 | held | 0.4 | per_head | 0.40 | 0.40 | 12 |" in text
    assert "| ours >= kvpress |" in text and "misses: none." in text
    assert "| kvpress | none | 1 | 1.00 | 4 | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] |" in text
    # The ablation: the grids with intervals and their paired differences to the default.
    ablation = text[text.index("## Ablation"):]
    assert ("| 0.25 | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] | 0.000 [0.000, 0.000] | "
            "0.50 [0.25, 0.75] | -0.500 [-0.750, -0.250] | 0.00 [0.00, 0.00] |") in ablation
    assert "`kv_chunk_grid=from_zero`" in ablation and "`kv_sink_tokens=0`" in ablation
    assert "| chunkkv(sink0) | 0.25 | 0.25 | 12 | 0.50 [" in text  # in our table too
    assert "| tok/s >= 3x none at 0.25 kept (chunkkv, 16 out) | 2.50x | **no** |" in text
    assert "13 vs goal 14.4 | **no**" in text
    assert "Throughput, 16 output tokens: best chunkkv 0.25 at 2.50x" in text
    assert "chunkkv[per_head], ours - kvpress (paired, same prompts): 0.25: 0.00 [0.00, 0.00]" \
        in text
    assert (out.parent / "img" / "results" / "peer_heatmap_kvpress.png").exists()
    # Every method x ratio side by side, a plot per family, the best method at 0.1 named.
    methods = text[text.index("## Every method"):]
    assert ("| window attention | chunkkv | 0.25 | 1.00 [1.00, 1.00] | 0.00 [0.00, 0.00] |"
            in methods)
    assert "| window attention | pyramidkv | 0.25 |" in methods
    assert "Best at kept ratio 0.1" in methods or "No paired needle prompts" in methods
    assert (out.parent / "img" / "results" / "methods_window_attention.png").exists()
    missing = build(tmp_path / "nowhere", tmp_path / "docs" / "empty.md")
    assert "runs/eval/results.json is missing: run `make bench-eval`" in missing.replace(
        str(tmp_path / "nowhere"), "runs")
    assert "run `make bench-peer`" in missing


@pytest.mark.parametrize(("argv", "message"), [
    (["--policies", "snapkv", "magic"], "--policies: unknown"),
    (["--ratios", "0.25", "1.0"], "--ratios"),
    (["--block-size", "16"], "--block-size"),
    (["--workload", "long-output", "--decode-policy", "magic"], "--decode-policy"),
    (["--workload", "long-output", "--decode-budgets", "512", "100"], "--decode-budgets"),
])
def test_throughput_options_are_checked_before_the_engine(argv: list[str], message: str) -> None:
    from vllm_kvcompress.bench import throughput

    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        throughput.validate(parser.parse_args(argv))
    assert throughput.configurations(["snapkv"], [0.5, 0.1]) == [
        ("none", 1.0), ("snapkv", 0.5), ("snapkv", 0.1)]


def test_merge_variant_pairs_with_kvpress_merging_press(tmp_path: Path) -> None:
    """`--merge`: our snapkv(merge) rows pair with kvpress's `snapkv+merge` (MergingPress) rows,
    not with its plain SnapKV; the results page shows merge vs drop for both, paired."""
    from vllm_kvcompress.bench.results import build
    from vllm_kvcompress.eval import kvpress_runner as runner
    from vllm_kvcompress.eval.engine_backend import RunConfig

    assert eval_run.configurations(["snapkv", "chunkkv"], [0.25], merge=True)[-2:] == [
        ("snapkv", 0.25, "shared", "merge"), ("chunkkv", 0.25, "shared", "merge")]
    assert eval_run.kvpress_policy(RunConfig("snapkv", 0.25, "shared", "merge")) == \
        "snapkv+merge"
    assert eval_run.kvpress_policy(RunConfig("chunkkv", 0.25, "shared", "merge")) is None
    assert eval_run.kvpress_policy(RunConfig("sagekv", 0.25, "per_head", "")) is None
    assert runner.press_spec("snapkv+merge", 0.25, {})[0] == "MergingPress"
    with pytest.raises(runner.InputError, match="ScorerPress"):
        runner.press_spec("chunkkv+merge", 0.25, {})

    run = tmp_path / "runs" / "eval"
    run.mkdir(parents=True)
    samples = [{"id": f"niah_single-4096-d0-{i}", "task": "niah_single", "length": 4096,
                "depth": 0.0, "answers": ["1234567"], "match": "any", "max_tokens": 16,
                "needle_offsets": [60 + i]} for i in range(6)]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    # ours: merge right on every prompt, drop on none; kvpress: both right on half.
    ours, peer = [], []
    for i, sample in enumerate(samples):
        base = {"id": sample["id"], "ratio": 0.25, "prompt_tokens": 1000, "kept_tokens": 250}
        ours += [{**base, "policy": "none", "ratio": 1.0, "text": " 1234567",
                  "head_select": "shared", "variant": "", "held_tokens": 1000},
                 {**base, "policy": "snapkv", "text": " 12", "head_select": "shared",
                  "variant": "", "held_tokens": 250},
                 {**base, "policy": "snapkv", "text": " 1234567", "head_select": "shared",
                  "variant": "merge", "held_tokens": 250}]
        good = " 1234567" if i % 2 else " 12"
        peer += [{**base, "policy": "none", "ratio": 1.0, "text": " 1234567",
                  "kept_tokens_per_layer": [1000]},
                 {**base, "policy": "snapkv", "text": good, "kept_tokens_per_layer": [250],
                  "kvpress_mode": "per_head"},
                 {**base, "policy": "snapkv+merge", "text": good,
                  "kept_tokens_per_layer": [250], "kvpress_mode": "per_head"}]
    for backend, lines in (("vllm", ours), ("kvpress", peer)):
        (run / f"predictions-{backend}.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines))
    result = eval_run.report(run)
    keys = {(s["backend"], s["policy"], s["head_select"], s["variant"]) for s in result["summary"]}
    assert ("kvpress", "snapkv", "per_head", "merge") in keys
    pairs = {(c["policy"], c["variant"]): c for c in result["comparison"]}
    assert pairs[("snapkv", "merge")]["kvpress_mode"] == "per_head"
    assert pairs[("snapkv", "merge")]["diff"] == pytest.approx(0.5)
    assert pairs[("snapkv", "")]["diff"] == pytest.approx(-0.5)
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    text = build(tmp_path / "runs", out)
    merge = text[text.index("## Merging evicted tokens"):]
    assert ("| snapkv | 0.25 | 0.00 [0.00, 0.00] | 1.00 [1.00, 1.00] | 1.000 [1.000, 1.000] | "
            "0.50 [") in merge
    assert "| 0.000 [0.000, 0.000] | 0.500 [" in merge


def test_overhead_ab_only_replaces_the_ab_and_keeps_the_ttft_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench overhead --ab-only``: only the none-vs-disabled processes run (alternating), their
    medians replace the report's A/B, the TTFT table stays; refused without a report."""
    import argparse

    from vllm_kvcompress.bench import overhead

    ran: list[bool] = []

    def fake_worker(config: dict[str, object], disabled: bool) -> dict[str, object]:
        assert config["mode"] == "throughput"  # never the TTFT worker
        ran.append(disabled)
        return {"output_tokens_per_s": [10.0, 12.0] if disabled else [9.9, 11.7]}

    monkeypatch.setattr(overhead, "_run_worker", fake_worker)
    cli = argparse.ArgumentParser()
    overhead.add_arguments(cli)
    args = cli.parse_args(["--out", str(tmp_path), "--ab-only", "--ab-cycles", "2"])
    with pytest.raises(SystemExit, match="does not exist"):
        overhead.run(args)
    ttft = {"prompt_len": 4096, "kv_ratio": 0.25, "per_policy": {
        "none": {"median_ttft_s": 10.0, "median_compaction_s": 0.0, "ttft_vs_none": 1.0,
                 "compaction_share_of_ttft": 0.0}}, "raw": []}
    (tmp_path / "overhead.json").write_text(json.dumps({
        "machine": {"cpu": "cpu", "cores": 2, "date": "before"}, "command": "first",
        "dtype": "float32", "throughput": None, "ttft": ttft}))
    report = overhead.run(args)
    assert ran == [True, False, True, False]
    tp = report["throughput"]
    assert tp["median_disabled"] == 11.0 and tp["median_none"] == 10.8
    assert tp["ratio_none_vs_disabled"] == pytest.approx(10.8 / 11.0)
    assert tp["command"] and tp["machine"]["cores"] >= 1
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved["ttft"] == ttft and saved["command"] == "first"
    assert (tmp_path / "overhead.png").is_file() and (tmp_path / "overhead.csv").is_file()


def test_resumed_eval_records_the_runs_whose_rows_it_keeps(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run resumed in a folder (same prompts and parameters, new ratios) keeps the earlier
    rows and records which runs made them; the results page names them. ``--fresh`` clears the
    record with the rows."""
    from vllm_kvcompress.bench.results import _settings_line
    from vllm_kvcompress.eval import engine_backend

    def fake_engine(samples: list, configs: list, params: dict, model: str, out: Path,
                    **kwargs: Any) -> None:
        with out.open("a") as fh:  # one row per call, as a resumed run appends
            fh.write(json.dumps({"configs": len(configs)}) + "\n")

    monkeypatch.setattr(engine_backend, "run", fake_engine)
    monkeypatch.setattr(eval_run, "report", lambda out, resamples: {})
    common = dict(model=str(tiny_model), out=str(tmp_path), tasks=["niah_single"],
                  lengths=[1024], depths=[0.0], samples_per_cell=1, policies=["snapkv"])
    settings_path = tmp_path / "settings-vllm.json"
    eval_run.run(_args(**common, ratios=[1.0, 0.25]))
    first = json.loads(settings_path.read_text())
    assert "resumed_from" not in first
    eval_run.run(_args(**common, ratios=[1.0, 0.5, 0.25]))
    second = json.loads(settings_path.read_text())
    assert second["resumed_from"] == [{"command": first["command"],
                                       "date": first["machine"]["date"]}]
    assert len((tmp_path / "predictions-vllm.jsonl").read_text().splitlines()) == 2
    assert "; resumed, keeping the rows of `" in _settings_line(second)
    eval_run.run(_args(**common, ratios=[1.0, 0.5], fresh=True))
    assert "resumed_from" not in json.loads(settings_path.read_text())
    assert len((tmp_path / "predictions-vllm.jsonl").read_text().splitlines()) == 1
