"""Compression while prefilling (``prefill_budget``) inside the real engine (in process, tiny
Llama, fp32, CPU_ATTN, chunked prefill of 64 tokens).

* exactness: greedy output and every compaction's kept tokens (per layer and KV head) equal a
  plain-transformers reference that prefills in the same chunks and cuts its OWN cache to the
  budget after each chunk that leaves more (its own queries, keys and values; logical RoPE
  positions); alone, the reference derives the chunk ends itself; in a mixed batch (chunks
  shared with neighbours) it cuts where the engine did and checks the rule's condition there;
* memory: a request never holds more than ``prefill_budget`` + one chunk, checked on every
  engine step, and the pool's free count returns to where it started;
* prefix caching on: a repeated prompt takes only its budget's whole chunks from the cache and
  keeps exactly what it kept on a cold cache.
TP=2 keeps TP=1's cuts (tests/test_tensor_parallel.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from kv_reference import CompressedGeneration, ReferenceModel, assert_same_compactions
from test_engine_compression import BLOCK, engine_internals, prompt_ids, recording_llm, request_spec

pytestmark = pytest.mark.engine

CHUNK = 64
MAX_TOKENS = 12


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Iterator[Any]:
    import gc

    # An earlier module's engine, collected late, would tear down the process-wide
    # distributed state this engine uses: finish it first.
    gc.collect()
    engine = recording_llm(tiny_model, num_blocks=256, max_num_batched_tokens=CHUNK)
    yield engine
    del engine
    gc.collect()


#: (vllm_xargs, prompt length): budgets well under the prompt, so each request is cut 2-4 times
#: while prefilling, then at the prompt's end.
CASES = [
    ({"kv_policy": "snapkv", "kv_prefill_budget": 80, "kv_window": 16}, 300),
    ({"kv_policy": "snapkv", "kv_prefill_budget": 80, "kv_window": 16,
      "kv_head_select": "per_head"}, 260),
    ({"kv_policy": "chunkkv", "kv_prefill_budget": 100, "kv_window": 16, "kv_chunk_size": 8,
      "kv_ratio": 0.2}, 300),
    ({"kv_policy": "knorm", "kv_prefill_budget": 70, "kv_window": 16}, 250),  # keys only
    ({"kv_policy": "tova", "kv_prefill_budget": 90, "kv_window": 16,
      "kv_head_select": "per_head"}, 280),
    ({"kv_policy": "expected_attention", "kv_prefill_budget": 90, "kv_window": 16,
      "kv_future_positions": 32}, 300),  # RoPE of logical positions after evictions
    ({"kv_policy": "streamingllm", "kv_prefill_budget": 64, "kv_window": 16}, 230),
    # Then decode-time compression of the rest.
    ({"kv_policy": "snapkv", "kv_prefill_budget": 80, "kv_window": 16, "kv_decode_budget": 96,
      "kv_decode_interval": 16}, 240),
]


def check_against_reference(reference: ReferenceModel, xargs: dict[str, Any], ids: list[int],
                            got: list[int], engine_log: list[dict[str, Any]],
                            chunk: int | None) -> list[Any]:
    spec = request_spec(xargs)
    ref = CompressedGeneration(reference, spec, engine_log)
    want = ref.generate(ids, MAX_TOKENS, chunk=chunk)
    assert_same_compactions(engine_log, ref.compactions, xargs)
    assert got == want, f"{xargs}: engine {got} != reference {want}"
    return ref.compactions


def peak_blocks(llm: Any, requests: list[tuple[str, list[int], dict[str, Any] | None]],
                cached: dict[str, int] | None = None
                ) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Runs the requests step by step; returns outputs and the most blocks each held while
    prefilling (checked against budget + one chunk); ``cached`` gets each request's prompt
    tokens taken from the prefix cache."""
    scheduler, _, _ = engine_internals(llm)
    manager = scheduler._kvcompress.manager
    from vllm import SamplingParams

    budgets = {req_id: xargs["kv_prefill_budget"] for req_id, _, xargs in requests
               if xargs and "kv_prefill_budget" in xargs}
    for req_id, ids, xargs in requests:
        llm.llm_engine.add_request(req_id, {"prompt_token_ids": ids}, SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, extra_args=xargs))
    outputs: dict[str, list[int]] = {}
    most: dict[str, int] = {}
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
                if cached is not None:
                    cached[out.request_id] = out.num_cached_tokens
        for internal, blocks in manager.req_to_blocks.items():
            outer = internal.rsplit("-", 1)[0]
            if outer in budgets:
                most[outer] = max(most.get(outer, 0), len(blocks))
                request = scheduler.requests[internal]
                if request.num_computed_tokens < request.num_prompt_tokens:
                    held = request.num_computed_tokens - manager.kvc.evicted.get(internal, 0)
                    assert held <= budgets[outer] + CHUNK, (outer, held)
    for req_id, budget in budgets.items():
        assert most[req_id] <= cdiv(budget + CHUNK, BLOCK) + 1, (req_id, most[req_id])
    return outputs, most


@pytest.mark.parametrize(("xargs", "length"), CASES, ids=[
    f"{x['kv_policy']}-{x.get('kv_head_select', 'default')}" + ("-decode" if
                                                                  "kv_decode_budget" in x else "")
    for x, _ in CASES])
def test_alone_matches_a_chunked_reference(llm: Any, reference: ReferenceModel,
                                           xargs: dict[str, Any], length: int) -> None:
    """A request alone gets chunks of 64: the reference derives the same chunk ends and cuts
    itself; the engine's compactions, kept tokens and output equal the reference's."""
    _, pool, runner = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    number = CASES.index((xargs, length))
    req_id = f"alone-{number}"
    ids = prompt_ids(900 + number, length)  # one prompt per case: no prefix-cache hits here
    outputs, _ = peak_blocks(llm, [(req_id, ids, xargs)])
    log = runner._kvcompress.compaction_log
    internal = next(key for key in log if key.rsplit("-", 1)[0] == req_id)
    compactions = check_against_reference(reference, xargs, ids, outputs[req_id],
                                          log[internal], chunk=CHUNK)
    prefill = [c for c in compactions if c.kind == "prefill"]
    assert len(prefill) >= 3, prefill  # cut while prefilling, and at the prompt's end
    assert max(c.source_len for c in prefill) <= xargs["kv_prefill_budget"] + CHUNK
    assert pool.get_num_free_blocks() == start_free


def test_mixed_batch_with_neighbours(llm: Any, reference: ReferenceModel) -> None:
    """Prefill-compressed requests beside prompt-only, ``none`` and plain ones in one batch
    (their chunks share each step's 64 tokens, so chunk ends are the scheduler's): the reference
    cuts where the engine did, checks the rule held there, and selects on its own."""
    _, pool, runner = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    cases = [CASES[0], CASES[2], CASES[3], CASES[7],
             ({"kv_policy": "snapkv", "kv_ratio": 0.3, "kv_window": 16}, 200),
             ({"kv_policy": "none"}, 150), (None, 120)]
    requests = [(f"mixed-{i}", prompt_ids(950 + i, n), xargs)
                for i, (xargs, n) in enumerate(cases)]
    outputs, _ = peak_blocks(llm, requests)
    log = runner._kvcompress.compaction_log
    cut_while_prefilling = 0
    for req_id, ids, xargs in requests:
        internal = [key for key in log if key.rsplit("-", 1)[0] == req_id]
        engine_log = log[internal[0]] if internal else []
        compactions = check_against_reference(reference, xargs or {}, ids, outputs[req_id],
                                              engine_log, chunk=None)
        if xargs and "kv_prefill_budget" in xargs:
            cut_while_prefilling += sum(c.kind == "prefill" and c.source_len < len(ids)
                                        for c in compactions[:-1])
    assert cut_while_prefilling >= 6, cut_while_prefilling
    assert pool.get_num_free_blocks() == start_free


def test_a_repeated_prompt_keeps_what_it_kept_on_a_cold_cache(
        llm: Any, reference: ReferenceModel) -> None:
    """Prefix caching on: the second request with the same prompt takes from the first one's
    uncompressed prompt blocks only the whole chunks within its budget (its compacted blocks are
    never hashed), then prefills and cuts chunk by chunk as the first did: same chunk ends, same
    kept tokens, same output, both equal to the reference, never more than budget + one chunk."""
    _, pool, runner = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    xargs, length = CASES[0]
    ids = prompt_ids(990, length)
    log = runner._kvcompress.compaction_log
    got: dict[str, list[int]] = {}
    kept: dict[str, list[Any]] = {}
    cached: dict[str, int] = {}
    for turn in ("first", "second"):
        outputs, _ = peak_blocks(llm, [(f"repeat-{turn}", ids, xargs)], cached)
        got[turn] = outputs[f"repeat-{turn}"]
        internal = next(key for key in log if key.rsplit("-", 1)[0] == f"repeat-{turn}")
        compactions = check_against_reference(reference, xargs, ids, got[turn], log[internal],
                                               chunk=CHUNK)
        kept[turn] = [(c.kind, c.source_len, c.kept, c.layers) for c in compactions]
        assert compactions[-1].kept == xargs["kv_prefill_budget"]
    # 80-token budget, chunks of 64: one whole chunk (4 blocks of 16) from the cache.
    assert cached == {"repeat-first": 0,
                      "repeat-second": xargs["kv_prefill_budget"] // CHUNK * CHUNK}
    assert got["second"] == got["first"] and kept["second"] == kept["first"]
    assert pool.get_num_free_blocks() == start_free


def test_prefill_budget_is_admitted_and_refused_like_every_setting() -> None:
    from vllm_kvcompress.admission import Frontend, admit
    from vllm_kvcompress.config import CompressionConfigError, CompressionSpec

    front = Frontend(CompressionSpec(), None, None)
    spec = admit({"kv_policy": "snapkv", "kv_prefill_budget": 200}, front)
    assert spec.prefill_budget == 200 and spec.kept_tokens(1000) is None  # the budget bounds it
    with pytest.raises(CompressionConfigError, match=r"^kv_prefill_budget: must be an integer "
                                                     r">= sink_tokens \+ window"):
        admit({"kv_policy": "snapkv", "kv_prefill_budget": 20}, front)
    with pytest.raises(CompressionConfigError, match=r"^kv_prefill_budget: is not supported "
                                                     r"with policy 'pyramidkv'"):
        admit({"kv_policy": "pyramidkv", "kv_prefill_budget": 200}, front)


def test_prefill_memory_bench_writes_flat_peaks(tmp_path: Path) -> None:
    """`kvcompress bench prefill-memory` at small sizes (its own process and engine): the
    compressed request's peak stays at cdiv(budget + chunk, block) whatever the prompt length,
    `none`'s grows with it; JSON, CSV and PNG are written."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_kvcompress.cli", "bench", "prefill-memory", "--lengths",
         "768", "1536", "--budget", "128", "--chunk", "128", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "prefill_memory.json").read_text())["rows"]
    compressed = [r for r in rows if r["config"] != "none"]
    plain = [r for r in rows if r["config"] == "none"]
    assert [r["peak_blocks"] for r in compressed] == [cdiv(128 + 128, BLOCK)] * 2
    assert [r["peak_blocks"] for r in plain] == [cdiv(768, BLOCK), cdiv(1536, BLOCK)]
    assert all(r["cuts"] > 0 for r in compressed)
    assert (out / "prefill_memory.csv").is_file() and (out / "prefill_memory.png").stat().st_size


#: A pool of 23 usable blocks (736 tokens): six 300-token prompts cut to 80 tokens while
#: prefilling are admitted by their footprint (80 + 64 tokens = 5 blocks), then outgrow the pool
#: while decoding (80 + 100 tokens = 6 blocks each), so vLLM preempts.
SMALL_POOL_BLOCKS = 24
PREEMPT_XARGS = {"kv_policy": "snapkv", "kv_prefill_budget": 80, "kv_window": 16}
PREEMPT_TOKENS = 100


@pytest.fixture(scope="module")
def small_pool_llm(tiny_model: Path, llm: Any) -> Iterator[Any]:
    engine = recording_llm(tiny_model, num_blocks=SMALL_POOL_BLOCKS, max_num_batched_tokens=CHUNK,
                           max_model_len=512)
    yield engine
    del engine


def run_with_preemptions(llm: Any, requests: list[tuple[str, list[int]]]
                         ) -> tuple[dict[str, list[int]], dict[str, list[tuple[int, int]]]]:
    """Steps the requests to the end, checking the pool's accounting after every step: the
    distinct blocks the requests hold plus the free ones are exactly the usable pool (none
    leaked, none counted twice), and a request still prefilling holds at most budget + one
    chunk. Returns the outputs and, per request, its preemptions as ``(output tokens so far,
    engine compactions so far)``: where its attempts split."""
    from vllm import SamplingParams

    scheduler, pool, runner = engine_internals(llm)
    manager = scheduler._kvcompress.manager
    usable = pool.num_gpu_blocks - 1  # the null block is never lent
    budget = PREEMPT_XARGS["kv_prefill_budget"]
    for req_id, ids in requests:
        llm.llm_engine.add_request(req_id, {"prompt_token_ids": ids}, SamplingParams(
            max_tokens=PREEMPT_TOKENS, temperature=0.0, ignore_eos=True,
            extra_args=PREEMPT_XARGS))
    outputs: dict[str, list[int]] = {}
    splits: dict[str, list[tuple[int, int]]] = {req_id: [] for req_id, _ in requests}
    seen = dict.fromkeys(splits, 0)
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        log = runner._kvcompress.compaction_log  # the worker's state exists after a step
        held = {block.block_id for blocks in manager.req_to_blocks.values() for block in blocks}
        assert len(held) + pool.get_num_free_blocks() == usable
        for internal, request in scheduler.requests.items():
            outer = internal.rsplit("-", 1)[0]
            if request.num_preemptions > seen[outer]:  # preempted in this step's schedule()
                seen[outer] = request.num_preemptions
                splits[outer].append((request.num_output_tokens, len(log.get(internal, []))))
            if request.num_computed_tokens < request.num_tokens - 1:
                physical = request.num_computed_tokens - manager.kvc.evicted.get(internal, 0)
                assert physical <= budget + CHUNK, (internal, physical)
    return outputs, splits


def test_preempted_requests_resume_exactly_and_leak_nothing(small_pool_llm: Any,
                                                            reference: ReferenceModel) -> None:
    """vLLM's own preemption choice (the latest request) with requests admitted by their
    compressed footprint: preemptions happen (the pool cannot hold six decoding requests),
    every preempted request re-prefills chunk-wise under the same cuts, and each attempt equals
    the chunk-wise reference: before its preemption, the prompt and the tokens it had produced;
    after it, a reference that prefills prompt + those tokens with the engine's re-prefill
    cuts and produces the rest. Accounting holds after every step; the pool ends as it
    started."""
    _, pool, runner = engine_internals(small_pool_llm)
    start_free = pool.get_num_free_blocks()
    requests = [(f"preempt-{i}", prompt_ids(1100 + i, 300)) for i in range(6)]
    outputs, splits = run_with_preemptions(small_pool_llm, requests)
    log = runner._kvcompress.compaction_log
    assert sum(len(s) for s in splits.values()) >= 2, splits
    assert any(produced > 0 for s in splits.values() for produced, _ in s), splits
    resumed_exactly = 0
    for req_id, ids in requests:
        got = outputs[req_id]
        assert len(got) == PREEMPT_TOKENS
        internal = next(key for key in log if key.rsplit("-", 1)[0] == req_id)
        engine_log = log[internal]
        bounds = [(0, 0), *splits[req_id], (PREEMPT_TOKENS, len(engine_log))]
        for (start, first), (end, last) in pairwise(bounds):
            if end == start:
                continue  # preempted before producing a token: that attempt left nothing
            # The end of a re-prefill is logged as "resumed"; the reference names its cut by
            # the rule that set it (the budget).
            attempt = [{**c, "kind": "prefill" if c["kind"] == "resumed" else c["kind"]}
                       for c in engine_log[first:last]]
            ref = CompressedGeneration(reference, request_spec(PREEMPT_XARGS), attempt)
            want = ref.generate(ids + got[:start], end - start, chunk=None)
            assert_same_compactions(attempt, ref.compactions, (req_id, start))
            assert got[start:end] == want, (req_id, start, end)
            resumed_exactly += start > 0
    assert resumed_exactly >= 1
    assert pool.get_num_free_blocks() == start_free


def test_throughput_bench_admits_more_by_compressed_footprint(small_pool_llm: Any) -> None:
    """`kvcompress bench throughput --prefill-budgets`' loop on the small pool: requests that
    compress while prefilling are admitted by budget + chunk (5 blocks) instead of their whole
    prompt (10 blocks), so more run at once than with end-of-prefill compression at the same
    final kept count; the pool is never over-committed, the step-time split adds up, and no
    block is left behind."""
    from vllm_kvcompress.bench.throughput import all_configurations, run_config

    _, pool, _ = engine_internals(small_pool_llm)
    start_free = pool.get_num_free_blocks()
    prompts = [prompt_ids(1200 + i, 300) for i in range(8)]
    configs = all_configurations(["snapkv"], [80 / 300], [80], 300)
    assert [c.label for c in configs] == ["none", "snapkv", "snapkv@prefill_budget=80"]
    rows = {c.label: run_config(small_pool_llm, prompts, c.policy, c.ratio, 16, "bench",
                                c.prefill_budget) for c in configs}
    for row in rows.values():
        assert row["requests"] == 8 and 0 < row["peak_blocks"] <= SMALL_POOL_BLOCKS - 1
        assert 0 < row["prefill_step_seconds"] + row["decode_step_seconds"] <= row["seconds"]
        assert row["decode_steps"] > 0 and row["decode_batch_mean"] >= 1
    assert rows["snapkv@prefill_budget=80"]["prefill_budget"] == 80
    assert rows["snapkv"]["peak_running"] > rows["none"]["peak_running"]
    assert rows["snapkv@prefill_budget=80"]["peak_running"] > rows["snapkv"]["peak_running"]
    assert pool.get_num_free_blocks() == start_free


@pytest.mark.parametrize(("argv", "message"), [
    (["--prefill-budgets", "256"], "needs --chunk"),
    (["--prefill-budgets", "900", "--chunk", "256"], r"--prefill-budgets: \[900\]"),
    (["--prefill-budgets", "20", "--chunk", "256"], r"--prefill-budgets: \[20\]"),
    (["--prefill-budgets", "256", "--chunk", "256", "--policies", "pyramidkv"],
     "no policy of --policies"),
    (["--reps", "0"], "--reps"),
])
def test_throughput_bench_prefill_options_are_checked(argv: list[str], message: str) -> None:
    import argparse

    from vllm_kvcompress.bench import throughput

    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        throughput.validate(parser.parse_args(argv))
