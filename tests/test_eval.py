"""`kvcompress eval`: options, configurations, the bootstrap intervals, and the engine backend end
to end (the benches' option checks live here too).

The bootstrap intervals are checked against hand-computed cases. The engine backend runs the
tiny Llama: prefix reuse (baseline pass, then the compressed pass hitting the cached prompt, then
turn 2) gives the same tokens as prefilling every request, and a rerun driven by its own file
resumes instead of repeating. Tasks: tests/test_eval_tasks.py; the results store:
tests/test_eval_store.py; the report and the results page: tests/test_eval_report.py.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from vllm_kvcompress.eval import run as eval_run
from vllm_kvcompress.eval.configs import configurations
from vllm_kvcompress.eval.stats import bootstrap_ci, paired_bootstrap_ci
from vllm_kvcompress.eval.tasks import build_samples, turn2_input_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


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
    ("max_num_batched_tokens", 16, "--max-num-batched-tokens: 16"),
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

def test_prefill_variant_ends_at_the_same_budget_chosen_while_prefilling() -> None:
    """``prefill``: the configuration's kept count of each prompt as ``kv_prefill_budget`` (so
    it ends holding what the plain configuration holds), only for policies that can compress
    while prefilling, only in the engine and the query-aware setting."""
    from vllm_kvcompress.eval import engine_backend as eb

    params = {"window": 32, "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4}
    for prompt in (4000, 3001):
        plain = eb.make_spec(eb.RunConfig("chunkkv", 0.25), params, prompt)
        xargs = eb.request_args(eb.RunConfig("chunkkv", 0.25, "shared", "prefill"), params, prompt)
        assert xargs["kv_prefill_budget"] == plain.kept_tokens(prompt) == math.ceil(prompt / 4)
        spec = eb.make_spec(eb.RunConfig("chunkkv", 0.25, "shared", "prefill"), params, prompt)
        assert spec.prompt_end_target(prompt, plain.kept_tokens(prompt)) == plain.kept_tokens(
            prompt)
    # A budget below sinks + window is raised to it (the smallest a request may set).
    tiny = eb.request_args(eb.RunConfig("snapkv", 0.1, "shared", "prefill"), params, 200)
    assert tiny["kv_prefill_budget"] == 36
    configs = configurations(["chunkkv", "pyramidkv"], [1.0, 0.25], prefill=True)
    assert [eb.config_label(c.policy, c.head_select, c.variant) for c in configs] == [
        "none", "chunkkv", "pyramidkv", "chunkkv(prefill)"]
    with pytest.raises(ValueError, match="--prefill-variant: kvpress"):
        eval_run.validate(_args(prefill_variant=True, backend="kvpress"))
    with pytest.raises(ValueError, match="--prefill-variant: runs with --setting query_aware"):
        eval_run.validate(_args(prefill_variant=True, setting=["query_agnostic"]))


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
    from vllm_kvcompress.eval.configs import head_select_supported

    args = _args(head_select=["shared", "per_head"])
    if head_select_supported():
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


def test_configurations_order_and_modes() -> None:
    assert configurations(["snapkv"], [1.0, 0.5]) == [("none", 1.0, "shared", ""),
                                                      ("snapkv", 0.5, "shared", "")]
    assert configurations(["snapkv"], [0.5, 0.1], ["shared", "per_head"]) == [
        ("none", 1.0, "shared", ""), ("snapkv", 0.5, "shared", ""),
        ("snapkv", 0.5, "per_head", ""), ("snapkv", 0.1, "shared", ""),
        ("snapkv", 0.1, "per_head", "")]
    assert configurations(["chunkkv"], [0.5], chunk_grid_ablation=True) == [
        ("none", 1.0, "shared", ""), ("chunkkv", 0.5, "shared", ""),
        ("chunkkv", 0.5, "shared", "grid0"), ("chunkkv", 0.5, "shared", "sink0")]
    # default: each policy's registered mode, listed once even when also named.
    assert configurations(["snapkv", "knorm"], [0.5], ["default", "per_head"]) == [
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
    from vllm_kvcompress.eval.configs import held_tokens

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




@pytest.mark.engine
def test_engine_backend_prefill_variant_cuts_while_prefilling(
        tiny_model: Path, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``prefill`` variant really compresses while prefilling (the engine counts prefill
    compactions, in chunks of 64 here) and ends holding what the plain configuration holds."""
    import gc

    import vllm

    from vllm_kvcompress.eval import engine_backend

    engines: list[Any] = []

    class Recorded(vllm.LLM):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(vllm, "LLM", Recorded)
    samples = build_samples(tokenizer, ["niah_single"], [768], [0.0, 1.0], 1, 0)
    configs = configurations(["snapkv"], [0.25], prefill=True)
    params = {"window": 16, "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4}
    gc.collect()
    out = engine_backend.run(samples, configs, params, str(tiny_model), tmp_path / "p.jsonl",
                             max_num_batched_tokens=64)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["id"], r["variant"]): r for r in rows if r["policy"] == "snapkv"}
    assert len(by) == 2 * len(samples)
    for sample in samples:
        plain, prefill = by[(sample.id, "")], by[(sample.id, "prefill")]
        assert prefill["kept_tokens"] == plain["kept_tokens"] == math.ceil(
            len(sample.input_ids) / 4)
    core = engines[0].llm_engine.engine_core.engine_core
    stats = core.scheduler._kvcompress.stats
    # Every prompt of ~700 tokens, budget ~175, chunks of 64: cut several times each.
    assert stats.prefill_compactions >= 5 * len(samples), stats
    del engines[:]
    gc.collect()
