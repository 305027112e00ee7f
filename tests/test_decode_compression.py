"""Decode-time compression inside the real engine (in process, tiny Llama, fp32, CPU_ATTN).

* exactness: greedy output equals a plain-transformers reference that compresses its OWN cache
  at the same steps (its own queries, keys and values; logical RoPE positions), across several
  decode-time compactions, shared and per-head, key-only and query-reading policies, prompt and
  decode compression combined, next to prompt-only and ``none`` neighbours in one batch;
* memory: a decode-compressed request never holds more than ``cdiv(decode_budget +
  decode_interval, block_size) + 1`` blocks, checked on every engine step;
* lifecycle: abort mid-generation, finish and preemption leave the pool's free count where it
  started; a preempted request is compacted back to its budget at the end of its re-prefill.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kv_reference import CompressedGeneration, ReferenceModel, assert_same_compactions
from test_engine_compression import (
    BLOCK,
    engine_internals,
    prompt_ids,
    recording_llm,
    request_spec,
)

pytestmark = pytest.mark.engine

MAX_TOKENS = 110


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Iterator[Any]:
    engine = recording_llm(tiny_model, num_blocks=256)
    yield engine
    del engine


def internal_id(log: dict[str, Any], request_id: str) -> str:
    matches = [key for key in log if key.rsplit("-", 1)[0] == request_id]
    assert len(matches) == 1, (request_id, list(log))
    return matches[0]


def run_steps(llm: Any, requests: list[tuple[str, list[int], dict[str, Any] | None]],
              max_tokens: int, abort: dict[str, int] | None = None
              ) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Runs requests step by step; after every step checks each generating decode-compressed
    request's blocks against its bound. Returns (outputs, most blocks seen per request).

    Args:
        abort: request id -> output length after which it is aborted.
    """
    from vllm import SamplingParams

    scheduler, _, _ = engine_internals(llm)
    manager = scheduler._kvcompress.manager
    bounds: dict[str, int] = {}
    for req_id, ids, xargs in requests:
        llm.llm_engine.add_request(req_id, {"prompt_token_ids": ids}, SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=xargs))
        spec = request_spec(xargs) if xargs else None
        if spec is not None and spec.decode_budget is not None:
            bounds[req_id] = cdiv(spec.decode_budget + spec.decode_interval, BLOCK) + 1
    outputs: dict[str, list[int]] = {}
    most: dict[str, int] = {}
    abort = dict(abort or {})
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
            elif out.request_id in abort and len(out.outputs[0].token_ids) >= abort[
                    out.request_id]:
                llm.llm_engine.abort_request([out.request_id])
                outputs[out.request_id] = list(out.outputs[0].token_ids)
                del abort[out.request_id]
        for internal, blocks in manager.req_to_blocks.items():
            outer = internal.rsplit("-", 1)[0]
            track = manager.kvc.decoding.get(internal)
            # While decoding: a (re-)prefill holds all its tokens until it completes.
            if outer in bounds and track is not None:
                most[outer] = max(most.get(outer, 0), len(blocks))
                request = scheduler.requests[internal]
                held = request.num_computed_tokens - manager.kvc.evicted.get(internal, 0)
                spec = track.spec
                assert held < spec.decode_budget + spec.decode_interval, (outer, held)
    for req_id, bound in bounds.items():
        assert most.get(req_id, 0) <= bound, (req_id, most.get(req_id), bound)
    return outputs, most


#: Decode-compressed requests (budget 100 + interval 24 on a 150..220-token prompt and 110 new
#: tokens: 4-6 compactions each), and neighbours that must be untouched.
DECODE = {"kv_decode_budget": 100, "kv_decode_interval": 24, "kv_window": 16}
CASES = [
    ({"kv_policy": "snapkv", **DECODE}, 150),
    ({"kv_policy": "snapkv", **DECODE, "kv_head_select": "per_head"}, 150),
    ({"kv_policy": "chunkkv", **DECODE, "kv_chunk_size": 8}, 170),
    ({"kv_policy": "chunkkv", **DECODE, "kv_chunk_size": 8, "kv_head_select": "per_head",
      "kv_reuse_layers": 2}, 140),
    ({"kv_policy": "knorm", **DECODE}, 150),  # keys only: no query ring
    ({"kv_policy": "keydiff", **DECODE, "kv_head_select": "shared"}, 130),
    ({"kv_policy": "tova", **DECODE, "kv_head_select": "per_head"}, 150),
    ({"kv_policy": "streamingllm", **DECODE}, 120),
    # Logical RoPE positions after earlier evictions.
    ({"kv_policy": "expected_attention", **DECODE, "kv_future_positions": 32}, 150),
    # Prompt compression first (220 -> 110), then decode-time compaction of the rest.
    ({"kv_policy": "snapkv", "kv_ratio": 0.5, **DECODE}, 220),
    ({"kv_policy": "snapkv", **DECODE, "kv_merge": "on"}, 150),
    # Neighbours: prompt-only, none, no policy.
    ({"kv_policy": "snapkv", "kv_ratio": 0.3, "kv_window": 16}, 200),
    ({"kv_policy": "none"}, 150),
    (None, 120),
]


def test_decode_compression_matches_reference_in_one_mixed_batch(
        llm: Any, reference: ReferenceModel) -> None:
    """Every case at once (decode steps of one request interleave with prefill chunks of
    others); the engine applies exactly the reference's compactions (same steps, same lengths,
    the same kept tokens per layer and head) and generates the same tokens."""
    _, pool, runner = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    requests = [(f"dec-{i}", prompt_ids(700 + i, n), xargs) for i, (xargs, n) in
                enumerate(CASES)]
    outputs, most = run_steps(llm, requests, MAX_TOKENS)
    log = runner._kvcompress.compaction_log
    decode_compactions = tie_swaps = kept_tokens = 0
    for req_id, ids, xargs in requests:
        got = outputs[req_id]
        spec = request_spec(xargs) if xargs else request_spec({})
        internal = [key for key in log if key.rsplit("-", 1)[0] == req_id]
        engine_log = log[internal[0]] if internal else []
        ref = CompressedGeneration(reference, spec, engine_log)
        want = ref.generate(ids, MAX_TOKENS)
        tie_swaps += ref.tie_swaps
        kept_tokens += sum(c.kept for c in ref.compactions)
        assert_same_compactions(engine_log, ref.compactions, xargs)
        assert got == want, f"{xargs}: engine {got} != reference {want}"
        if xargs and "kv_decode_budget" in xargs:
            decode = sum(c.kind == "decode" for c in ref.compactions)
            assert decode >= 3, (xargs, decode)
            decode_compactions += decode
    assert decode_compactions >= 30
    # Rounding-broken ties (repeated tokens' equal key norms) are rare, never the rule.
    assert tie_swaps <= 0.001 * kept_tokens * 4 * 2, (tie_swaps, kept_tokens)
    assert pool.get_num_free_blocks() == start_free
    assert most["dec-0"] == cdiv(100 + 24, BLOCK)  # it really grew to the limit


def test_abort_mid_generation_and_finish_free_every_block(llm: Any) -> None:
    scheduler, pool, _ = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    before = scheduler._kvcompress.stats.decode_compactions
    requests = [(f"abort-{i}", prompt_ids(800 + i, 150), {"kv_policy": policy, **DECODE})
                for i, policy in enumerate(["snapkv", "knorm", "chunkkv", "snapkv"])]
    outputs, _ = run_steps(llm, requests, 90, abort={"abort-0": 40, "abort-2": 70})
    assert len(outputs["abort-0"]) < 90 and len(outputs["abort-2"]) < 90
    assert len(outputs["abort-1"]) == 90 and len(outputs["abort-3"]) == 90
    assert scheduler._kvcompress.stats.decode_compactions > before + 4
    assert pool.get_num_free_blocks() == start_free
    assert not scheduler._kvcompress.manager.kvc.decoding


@pytest.fixture(scope="module")
def tiny_pool_llm(tiny_model: Path, llm: Any) -> Iterator[Any]:
    """A pool of 40 blocks: 6 long generations of 150 + 300 tokens outgrow it unless bounded."""
    engine = recording_llm(tiny_model, num_blocks=40, max_num_batched_tokens=512)
    yield engine
    del engine


def test_preempted_request_is_recompressed_to_its_budget(tiny_pool_llm: Any) -> None:
    """Under a pool too small for the batch, requests are preempted before their first
    decode-time compaction; each re-prefill ends compacted to ``decode_budget`` (not its full
    KV), every request finishes, and the pool's free count returns to its start."""
    scheduler, pool, runner = engine_internals(tiny_pool_llm)
    start_free = pool.get_num_free_blocks()
    xargs = {"kv_policy": "snapkv", "kv_window": 16, "kv_decode_budget": 160,
             "kv_decode_interval": 64}
    requests = [(f"pre-{i}", prompt_ids(900 + i, 250), xargs) for i in range(6)]
    outputs, _ = run_steps(tiny_pool_llm, requests, 300)
    stats = scheduler._kvcompress.stats
    assert all(len(out) == 300 for out in outputs.values())
    assert stats.resumed_recompressed > 0, stats
    resumed = [c for log in runner._kvcompress.compaction_log.values() for c in log
               if c["kind"] == "resumed"]
    assert resumed and all(c["kept"] == 160 and c["source_len"] >= 224 for c in resumed)
    assert pool.get_num_free_blocks() == start_free
