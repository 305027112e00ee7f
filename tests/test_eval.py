"""`kvcompress eval`: task generators, grading, options, and the engine backend end to end.

The generators are checked on what makes a long-context task valid: the prompt has the size
class asked for, every answer is really in the context, needles sit at their depth, a seed gives
the same prompts. The engine backend runs the tiny Llama: prefix reuse (baseline pass, then the
compressed pass hitting the cached prompt) gives the same tokens as prefilling every request,
a rerun resumes instead of repeating, and the report writes its files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from vllm_kvcompress.eval import run as eval_run
from vllm_kvcompress.eval.tasks import TASKS, build_samples, score_answer


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_samples_have_their_size_class_and_contain_the_answers(tokenizer: Any) -> None:
    samples = build_samples(tokenizer, list(TASKS), [768, 1536], [0.0, 0.5, 1.0], 1, seed=3)
    assert {s.task for s in samples} == set(TASKS)
    assert len(samples) == 3 * 2 * 3 + 2 + 2  # needle tasks over depths, the others not
    assert len({s.id for s in samples}) == len(samples)
    for sample in samples:
        room = sample.length - sample.max_tokens
        assert 0.93 * room <= len(sample.input_ids) <= room, sample.id
        text = tokenizer.decode(sample.input_ids)
        user_turn = text[:text.rindex("<|im_start|>assistant")]
        if sample.match == "all":  # every value / variable must be findable
            assert all(a in user_turn for a in sample.answers), sample.id
        else:
            assert any(a in user_turn for a in sample.answers), sample.id


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_single_needle_sits_at_its_depth(tokenizer: Any, depth: float) -> None:
    (sample,) = build_samples(tokenizer, ["niah_single"], [2048], [depth], 1, seed=0)
    text = tokenizer.decode(sample.input_ids)
    context = text[:text.rindex("What is the special magic number")]
    start = context.index("\n", context.index("afterwards."))
    position = (context.index(sample.answers[0]) - start) / (len(context) - start)
    assert abs(position - depth) < 0.05, position


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
])
def test_options_are_checked_before_work(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        eval_run.validate(_args(**{field: value}))


def test_limit_spreads_over_the_grid(tokenizer: Any) -> None:
    samples = build_samples(tokenizer, ["niah_single", "variable_tracking"], [512, 1024],
                            [0.0, 0.5, 1.0], 1, seed=0)
    chosen = eval_run.limit_samples(samples, 2)
    single = [s for s in chosen if s.task == "niah_single"]
    assert len(single) == 2 and {s.length for s in single} == {512, 1024}
    assert len([s for s in chosen if s.task == "variable_tracking"]) == 2
    assert eval_run.configurations(["snapkv"], [1.0, 0.5]) == [("none", 1.0), ("snapkv", 0.5)]


@pytest.mark.engine
def test_engine_backend_prefix_reuse_is_exact_and_resumable(tiny_model: Path, tokenizer: Any,
                                                            tmp_path: Path) -> None:
    from vllm_kvcompress.eval import engine_backend

    samples = build_samples(tokenizer, ["niah_single", "qa_squad"], [768], [0.0, 1.0], 1, 0)
    configs = [("snapkv", 0.25), ("chunkkv", 0.25), ("streamingllm", 0.1)]
    params = {"window": 16, "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4}

    def outputs(path: Path) -> dict[tuple[str, str, float], list[int]]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {(r["id"], r["policy"], r["ratio"]): r["output_ids"] for r in rows}

    reused = engine_backend.run(samples, configs, params, str(tiny_model),
                                tmp_path / "reused.jsonl", group_tokens=1600)
    fresh = engine_backend.run(samples, configs, params, str(tiny_model),
                               tmp_path / "fresh.jsonl", prefix_reuse=False)
    assert len(outputs(reused)) == len(samples) * 4  # + the `none` baseline
    assert outputs(reused) == outputs(fresh)
    rows = [json.loads(line) for line in reused.read_text().splitlines()]
    kept = {(r["policy"], r["ratio"]): r["kept_tokens"] / r["prompt_tokens"] for r in rows}
    assert kept[("none", 1.0)] == 1.0 and abs(kept[("snapkv", 0.25)] - 0.25) < 0.01
    before = reused.read_text()
    engine_backend.run(samples, configs, params, str(tiny_model), reused)  # nothing left to do
    assert reused.read_text() == before


def test_report_grades_every_backend_and_writes_plots(tmp_path: Path) -> None:
    samples = [{"id": f"niah_single-1024-d{d:g}-0", "task": "niah_single", "length": 1024,
                "depth": d, "answers": ["1234567"], "match": "any", "max_tokens": 16}
               for d in (0.0, 1.0)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    for backend, right in (("vllm", {"none", "chunkkv"}), ("kvpress", {"none"})):
        lines = []
        for sample in samples:
            for policy, ratio in (("none", 1.0), ("chunkkv", 0.25)):
                text = " 1234567." if policy in right else " 12."
                lines.append({"id": sample["id"], "policy": policy, "ratio": ratio,
                              "text": text, "prompt_tokens": 1000, "kept_tokens": 250})
        (tmp_path / f"predictions-{backend}.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines))
    result = eval_run.report(tmp_path)
    table = {(s["backend"], s["policy"], s["ratio"]): s["accuracy"] for s in result["summary"]}
    assert table == {("vllm", "none", 1.0): 1.0, ("vllm", "chunkkv", 0.25): 1.0,
                     ("kvpress", "none", 1.0): 1.0, ("kvpress", "chunkkv", 0.25): 0.0}
    (chunkkv_target,) = [t for t in result["targets"] if t["target"].startswith("chunkkv")]
    assert chunkkv_target["met"] and chunkkv_target["value"] == 1.0
    for name in ("results.json", "results.csv", "accuracy_vs_ratio.png", "heatmap_vllm.png",
                 "heatmap_kvpress.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_results_page_has_tables_targets_and_images(tmp_path: Path) -> None:
    """`make results`: docs/results.md from runs/, missing inputs named, images copied."""
    from vllm_kvcompress.bench.results import build

    runs = tmp_path / "runs"
    (runs / "eval-peer").mkdir(parents=True)
    test_report_grades_every_backend_and_writes_plots(runs / "eval-peer")
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
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    text = build(runs, out)
    assert "runs/eval/results.json is missing: run `make bench-eval`" in text
    assert "| chunkkv | 0.25 | 1.00 | 0.00 | 1.000 |" in text  # ours vs kvpress row
    assert "| tok/s >= 3x none at 0.25 kept (chunkkv, 16 out) | 2.50x | **no** |" in text
    assert "13 vs goal 14.4 | **no**" in text
    assert "Throughput, 16 output tokens: best chunkkv 0.25 at 2.50x" in text
    assert (out.parent / "img" / "results" / "peer_heatmap_kvpress.png").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--policies", "snapkv", "magic"], "--policies: unknown"),
    (["--ratios", "0.25", "1.0"], "--ratios"),
    (["--block-size", "16"], "--block-size"),
])
def test_throughput_options_are_checked_before_the_engine(argv: list[str], message: str) -> None:
    from vllm_kvcompress.bench import throughput

    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        throughput.validate(parser.parse_args(argv))
    assert throughput.configurations(["snapkv"], [0.5, 0.1]) == [
        ("none", 1.0), ("snapkv", 0.5), ("snapkv", 0.1)]
