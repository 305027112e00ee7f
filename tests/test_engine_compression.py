"""Compression inside the real engine (in process, tiny Llama, fp32, CPU_ATTN).

* eviction: greedy output equals a plain-transformers reference that attends only to the engine's
  kept tokens at their original positions, per policy, in one mixed batch, through chunked
  prefill (window queries carried across chunks);
* no eviction (`none`, ratio 1.0, budget >= prompt): token-identical to vLLM with the plugin off;
* memory: blocks really return to the pool after prefill; the prefix cache keeps the original,
  uncompressed blocks for a follow-up turn; a pool sized for N full prompts runs ~N/ratio
  compressed ones at once;
* lifecycle: preemption, abort and finish leave the pool's free count where it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kv_reference import ReferenceModel

pytestmark = pytest.mark.engine

BLOCK = 32
MAX_TOKENS = 20  # >= 16 decode steps after the first token
ENGINE = {"max_model_len": 1024, "block_size": BLOCK, "enforce_eager": True, "dtype": "float32",
          "seed": 0, "max_num_batched_tokens": 128, "max_num_seqs": 16}


def prompt_ids(seed: int, length: int) -> list[int]:
    """Token ids of a random sentence from the tiny tokenizer's own vocabulary (>= 1 <=> bos)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(4, 1000) for _ in range(length)]


def engine_internals(llm: Any) -> tuple[Any, Any, Any]:
    """(scheduler, block pool, model runner) of an in-process engine."""
    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    runner = core.model_executor.driver_worker.worker.model_runner
    return scheduler, scheduler.kv_cache_manager.block_pool, runner


def kept_log(runner: Any, request_id: str) -> dict[int, list[list[int]]]:
    """The engine's kept indices per layer and KV head for a request (internal ids carry a
    suffix)."""
    log = runner._kvcompress.kept_log
    matches = [key for key in log if key.rsplit("-", 1)[0] == request_id]
    assert len(matches) == 1, (request_id, list(log))
    return log[matches[0]]


@pytest.fixture(scope="module")
def llm(tiny_model: Path, tiny_qfilters: Path) -> Iterator[Any]:
    # The operator allows requests to name the Q-Filters file's folder.
    engine = recording_llm(tiny_model, num_blocks=512, additional_config={
        "kvcompress": {"allowed_file_dir": str(tiny_qfilters.parent)}})
    yield engine
    del engine


def recording_llm(model: Path, num_blocks: int, **overrides: Any) -> Any:
    """An in-process engine over ``model`` with ``ENGINE``'s settings and a pool of
    ``num_blocks`` blocks, whose workers record every compaction's kept indices."""
    from vllm import LLM

    os.environ["VLLM_KVCOMPRESS_RECORD_KEPT"] = "1"
    return LLM(model=str(model), num_gpu_blocks_override=num_blocks, **{**ENGINE, **overrides})


#: Placeholder for the tiny model's calibrated Q-Filters file (a session fixture).
QFILTERS = "<tiny_qfilters>"
EVICTING = [
    ({"kv_policy": "streamingllm", "kv_ratio": 0.3}, 300),
    ({"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16}, 300),
    ({"kv_policy": "snapkv", "kv_budget": 60, "kv_window": 16, "kv_pool_kernel": 1}, 100),
    ({"kv_policy": "chunkkv", "kv_ratio": 0.3, "kv_window": 48, "kv_chunk_size": 10}, 300),
    ({"kv_policy": "chunkkv", "kv_ratio": 0.2, "kv_window": 16, "kv_reuse_layers": 2}, 257),
    ({"kv_policy": "chunkkv", "kv_ratio": 0.25, "kv_window": 16, "kv_chunk_grid": "from_zero"},
     230),
    ({"kv_policy": "pyramidkv", "kv_ratio": 0.3, "kv_window": 16}, 300),
    ({"kv_policy": "tova", "kv_ratio": 0.3, "kv_window": 16}, 300),
    ({"kv_policy": "sagekv", "kv_ratio": 0.25, "kv_window": 48, "kv_sage_queries": 4}, 300),
    ({"kv_policy": "knorm", "kv_ratio": 0.3, "kv_window": 16}, 300),
    ({"kv_policy": "keydiff", "kv_ratio": 0.25, "kv_window": 16}, 230),
    ({"kv_policy": "expected_attention", "kv_ratio": 0.3, "kv_window": 48,
      "kv_future_positions": 64}, 300),
    ({"kv_policy": "qfilters", "kv_ratio": 0.3, "kv_window": 16,
      "kv_qfilters_path": QFILTERS}, 300),
    # ChunkKV around another token scorer (its model data included).
    ({"kv_policy": "chunkkv", "kv_ratio": 0.3, "kv_window": 16, "kv_chunk_scorer": "knorm"},
     300),
    ({"kv_policy": "chunkkv", "kv_ratio": 0.25, "kv_window": 16, "kv_chunk_scorer": "qfilters",
      "kv_qfilters_path": QFILTERS}, 257),
    # merge: the kept slots' values absorb the evicted tokens (per layer, also under reuse).
    ({"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16, "kv_merge": "on"}, 300),
    ({"kv_policy": "chunkkv", "kv_ratio": 0.2, "kv_window": 16, "kv_reuse_layers": 2,
      "kv_merge": "on"}, 257),
    ({"kv_policy": "knorm", "kv_ratio": 0.3, "kv_window": 16, "kv_merge": "on"}, 230),
]
#: Every policy in both selection modes.
EVICTING_BOTH_MODES = [({**xargs, "kv_head_select": mode}, n) for xargs, n in EVICTING
                       for mode in ("shared", "per_head")]


def request_spec(xargs: dict[str, Any]) -> Any:
    from vllm_kvcompress.config import CompressionSpec, resolve_request

    return resolve_request(CompressionSpec(), xargs)


def with_qfilters(xargs: dict[str, Any] | None, path: Path) -> dict[str, Any] | None:
    """``xargs`` with the Q-Filters placeholder replaced by the calibrated file."""
    if xargs is None:
        return None
    return {k: str(path) if v == QFILTERS else v for k, v in xargs.items()}


def test_eviction_matches_reference_in_one_mixed_batch(llm: Any, reference: ReferenceModel,
                                                        tiny_qfilters: Path) -> None:
    """Every policy in both selection modes, plus `none` neighbours, in one batch; 300-token
    prompts are chunked (128 + 128 + 44) and the 48-token window spans two chunks. The reference
    makes its OWN selection from its own prefill's q/k/v (per KV head): the engine must keep
    exactly those tokens in every layer and head, and its greedy output must equal the
    reference's decode over them."""
    from vllm import SamplingParams

    cases = [(with_qfilters(x, tiny_qfilters), n) for x, n in
             [*EVICTING_BOTH_MODES, ({"kv_policy": "none"}, 300), (None, 150)]]
    # Seeds of their own: no prefix-cache sharing with the other tests' prompts.
    prompts = [{"prompt_token_ids": prompt_ids(500 + i, n)} for i, (_, n) in enumerate(cases)]
    # ignore_eos: the reference decodes MAX_TOKENS regardless (token 3 is the tiny model's EOS).
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                             extra_args=x) for x, _ in cases]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    _, _, runner = engine_internals(llm)
    per_head_differs = 0
    for (xargs, length), prompt, out in zip(cases, prompts, outputs, strict=True):
        got = list(out.outputs[0].token_ids)
        ids = prompt["prompt_token_ids"]
        want_kept = reference.select(ids, request_spec(xargs)) if xargs else None
        merged = reference.merged if want_kept is not None else None
        if want_kept is not None:
            engine_kept = kept_log(runner, out.request_id)
            assert engine_kept == want_kept, f"{xargs}: engine kept other tokens"
            heads = engine_kept[0]
            assert len({len(row) for row in heads}) == 1 and len(heads[0]) < length
            if xargs.get("kv_head_select") == "per_head" and xargs["kv_policy"] != \
                    "streamingllm":
                per_head_differs += any(row != heads[0] for row in heads)
        else:
            assert xargs is None or xargs["kv_policy"] == "none"
        want = reference.greedy(ids, MAX_TOKENS, want_kept, merged)
        assert got == want, f"{xargs}: engine {got} != reference {want}"
    assert per_head_differs >= 5  # per-head mode really keeps different tokens per head


def test_triton_kernels_in_the_engine_match_reference(llm: Any, reference: ReferenceModel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine through the dispatcher's Triton path (interpreted on CPU): window scores read
    from CPU_ATTN's paged cache and ChunkKV's chunk ranking on the kernels; output still exact
    against the reference on the kept tokens the engine chose."""
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_KVCOMPRESS_KERNELS", "triton")
    cases = [{"kv_policy": "chunkkv", "kv_ratio": 0.3, "kv_window": 16},
             {"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16},
             {"kv_policy": "chunkkv", "kv_ratio": 0.3, "kv_window": 16,
              "kv_head_select": "per_head"},
             # Keys read from the paged cache on this path, RoPE, merged values written back.
             {"kv_policy": "knorm", "kv_ratio": 0.3, "kv_window": 16},
             {"kv_policy": "expected_attention", "kv_ratio": 0.3, "kv_window": 16},
             {"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16, "kv_merge": "on"}]
    prompts = [{"prompt_token_ids": prompt_ids(40 + i, 200)} for i in range(len(cases))]
    outputs = llm.generate(prompts, [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                    extra_args=x) for x in cases],
                           use_tqdm=False)
    _, _, runner = engine_internals(llm)
    for xargs, prompt, out in zip(cases, prompts, outputs, strict=True):
        kept = kept_log(runner, out.request_id)
        merged = None
        if xargs["kv_policy"] in ("knorm", "expected_attention") or "kv_merge" in xargs:
            # The reference's own selection (keys and values it computed itself).
            assert kept == reference.select(prompt["prompt_token_ids"], request_spec(xargs))
            merged = reference.merged
        want = reference.greedy(prompt["prompt_token_ids"], MAX_TOKENS, kept, merged)
        assert list(out.outputs[0].token_ids) == want, xargs


class ExplodingPolicy:
    """A third-party policy whose scoring raises at one layer, as a kernel bug would."""

    inputs = frozenset()
    head_select = "shared"

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int:
        return budget

    def selection_layer(self, layer_idx: int) -> int:
        return layer_idx

    def score(self, obs: Any) -> Any:
        if obs.layer_idx == 2:
            raise RuntimeError("simulated kernel failure")
        return torch.arange(obs.seq_len, dtype=torch.float32).expand(obs.num_kv_heads, -1)

    def select(self, obs: Any, scores: Any) -> Any:
        return torch.arange(obs.budget).expand(obs.num_kv_heads, -1)

    def keep_indices(self, obs: Any) -> Any:
        return self.select(obs, self.score(obs))


def test_a_failing_compaction_fails_its_request_alone(llm: Any, reference: ReferenceModel
                                                      ) -> None:
    from vllm import SamplingParams

    from vllm_kvcompress.policies import registry

    info = registry.PolicyInfo(name="exploding", build=lambda spec: ExplodingPolicy(),
                               paper="-", summary="raises at layer 2", parameters=())
    registry.register_policy(info)
    try:
        scheduler, pool, _ = engine_internals(llm)
        start_free = pool.get_num_free_blocks()
        failed_before = scheduler._kvcompress.stats.failed
        cases = [{"kv_policy": "exploding", "kv_ratio": 0.3}, {"kv_policy": "snapkv",
                                                             "kv_ratio": 0.3}, None]
        prompts = [{"prompt_token_ids": prompt_ids(60 + i, 200)} for i in range(3)]
        outputs = llm.generate(prompts, [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                        extra_args=x) for x in cases],
                               use_tqdm=False)
        assert outputs[0].outputs[0].finish_reason == "error"
        assert len(outputs[0].outputs[0].token_ids) <= 1
        _, _, runner = engine_internals(llm)
        for prompt, out, xargs in zip(prompts[1:], outputs[1:], cases[1:], strict=True):
            kept = kept_log(runner, out.request_id) if xargs else None
            assert list(out.outputs[0].token_ids) == reference.greedy(
                prompt["prompt_token_ids"], MAX_TOKENS, kept)
        assert scheduler._kvcompress.stats.failed == failed_before + 1
        assert pool.get_num_free_blocks() == start_free
        again = llm.generate([prompts[1]], SamplingParams(max_tokens=4), use_tqdm=False)
        assert len(again[0].outputs[0].token_ids) == 4  # the engine keeps serving
    finally:
        registry._REGISTRY.pop("exploding", None)


def assert_first_failed_alone(outputs: list[Any], prompts: list[dict[str, Any]],
                              cases: list[dict[str, Any] | None], runner: Any,
                              reference: ReferenceModel) -> None:
    """The first request finished with an error; its neighbours equal the reference."""
    assert outputs[0].outputs[0].finish_reason == "error"
    for prompt, out, xargs in zip(prompts[1:], outputs[1:], cases[1:], strict=True):
        kept = kept_log(runner, out.request_id) if xargs else None
        assert list(out.outputs[0].token_ids) == reference.greedy(
            prompt["prompt_token_ids"], MAX_TOKENS, kept)


def test_file_removed_after_admission_fails_its_request_alone(
        llm: Any, reference: ReferenceModel, tiny_qfilters: Path) -> None:
    """A request's Q-Filters file disappears between admission (front end) and its compaction
    (worker): that request finishes with an error, its neighbours are exact, no block leaks,
    and nothing is re-validated in the engine (before, this raised outside the per-request
    handling and took the engine down)."""
    import shutil

    from vllm import SamplingParams

    doomed = tiny_qfilters.parent / "doomed.safetensors"
    shutil.copy(tiny_qfilters, doomed)
    frontend = llm.llm_engine.input_processor._kvcompress_frontend
    frontend.rules.files.scan()  # the background scan, now rather than in 5 s
    _, pool, runner = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    cases = [{"kv_policy": "qfilters", "kv_qfilters_path": doomed.name, "kv_ratio": 0.3},
             {"kv_policy": "snapkv", "kv_ratio": 0.3}, None]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=x)
              for x in cases]  # admitted here, in the front end
    doomed.unlink()
    prompts = [{"prompt_token_ids": prompt_ids(90 + i, 200)} for i in range(3)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_first_failed_alone(outputs, prompts, cases, runner, reference)
    assert pool.get_num_free_blocks() == start_free
    frontend.rules.files.scan()


def test_a_query_ring_that_cannot_grow_fails_its_requests_alone(
        llm: Any, reference: ReferenceModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ring's allocation fails for one window size (memory): its requests finish with an
    error, a request of another window size and a plain one are exact, no block leaks."""
    from vllm import SamplingParams

    from vllm_kvcompress.engine.query_ring import QueryRing

    original = QueryRing._pool

    def failing(self: QueryRing, window: int, *args: Any) -> Any:
        if window == 24:
            raise RuntimeError("simulated out of memory")
        return original(self, window, *args)

    monkeypatch.setattr(QueryRing, "_pool", failing)
    _, pool, runner = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    cases = [{"kv_policy": "snapkv", "kv_ratio": 0.3, "kv_window": 24},
             {"kv_policy": "snapkv", "kv_ratio": 0.3, "kv_window": 16}, None]
    prompts = [{"prompt_token_ids": prompt_ids(95 + i, 200)} for i in range(3)]
    outputs = llm.generate(prompts, [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                    extra_args=x) for x in cases],
                           use_tqdm=False)
    assert_first_failed_alone(outputs, prompts, cases, runner, reference)
    assert pool.get_num_free_blocks() == start_free


@pytest.mark.parametrize("mode", ["shared", "per_head"])
def test_chunkkv_reuse_shares_selection_within_groups(llm: Any, mode: str) -> None:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, extra_args={
        "kv_policy": "chunkkv", "kv_ratio": 0.25, "kv_window": 16, "kv_reuse_layers": 2,
        "kv_head_select": mode})
    out = llm.generate([{"prompt_token_ids": prompt_ids(99, 200)}], params, use_tqdm=False)[0]
    kept = kept_log(engine_internals(llm)[2], out.request_id)
    assert kept[0] == kept[1] and kept[2] == kept[3]  # per head too: each head its own reuse
    assert kept[0] != kept[2]  # different groups score on their own
    assert (kept[0][0] == kept[0][1]) == (mode == "shared")


DISABLED_SCRIPT = """
import json, os, sys
from vllm import LLM, SamplingParams
cfg = json.loads(sys.argv[1])
llm = LLM(model=cfg["model"], **cfg["engine"])
outs = llm.generate([{"prompt_token_ids": p} for p in cfg["prompts"]],
                    SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0), use_tqdm=False)
print("TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def test_no_eviction_is_token_identical_to_plugin_disabled(llm: Any, tiny_model: Path) -> None:
    """`none`, ratio 1.0 and a budget >= prompt change nothing, in a batch of mixed lengths."""
    from vllm import SamplingParams

    lengths = [40, 130, 257, 300, 77]
    prompts = [prompt_ids(100 + i, n) for i, n in enumerate(lengths)]
    variants = [{"kv_policy": "none"}, {"kv_policy": "snapkv", "kv_ratio": 1.0},
                {"kv_policy": "chunkkv", "kv_budget": 400}, None, {"kv_policy": "snapkv"}]
    # The last prompt is too short to compress under the default window: a no-op too.
    variants[-1] = {"kv_policy": "snapkv", "kv_min_prompt_len": 1000}
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=x)
              for x in variants]
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    config = {"model": str(tiny_model), "engine": {**ENGINE, "num_gpu_blocks_override": 512},
              "prompts": prompts, "max_tokens": MAX_TOKENS}
    env = {**os.environ, "VLLM_KVCOMPRESS_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", DISABLED_SCRIPT, json.dumps(config)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(proc.stdout.split("TOKENS=")[1].splitlines()[0])
    assert ours == stock


def run_steps(llm: Any, on_step: Any = None) -> None:
    """Steps the engine until idle, calling ``on_step(step_index)`` after each step."""
    step = 0
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
        if on_step is not None:
            on_step(step)
        step += 1


def test_blocks_return_to_the_pool_after_prefill_and_cache_keeps_the_original(
        llm: Any, reference: ReferenceModel) -> None:
    from vllm import SamplingParams

    scheduler, pool, _ = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    length, ratio = 320, 0.25
    prompt = prompt_ids(7, length)
    kept = 80  # ceil(0.25 * 320)
    llm.llm_engine.add_request("freed", {"prompt_token_ids": prompt}, SamplingParams(
        max_tokens=4, temperature=0.0, extra_args={"kv_policy": "snapkv", "kv_ratio": ratio}))
    free_after: list[int] = []
    usage_after: list[float] = []

    def record(step: int) -> None:
        free_after.append(pool.get_num_free_blocks())
        usage_after.append(scheduler.kv_cache_manager.usage)

    run_steps(llm, record)
    # Prefill takes 3 chunks (128 + 128 + 64). After the second the request holds 8 blocks; the
    # third would take it to 10, but compression leaves cdiv(kept, 32) = 3 (the originals are
    # back in the pool, hashed and evictable) and vLLM's usage gauge drops.
    done = next(i for i in range(1, len(free_after)) if free_after[i] > free_after[i - 1])
    assert free_after[done - 1] == start_free - 8
    assert free_after[done] == start_free - (kept + BLOCK - 1) // BLOCK
    assert usage_after[done] < usage_after[done - 1]
    assert pool.get_num_free_blocks() == start_free
    assert scheduler._kvcompress.stats.blocks_freed >= 10 - 3

    # A follow-up on the same context without compression hits the full, uncompressed prefix
    # and is exact against a full-KV reference.
    follow = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, extra_args={"kv_policy": "none"}),
        use_tqdm=False)[0]
    assert follow.num_cached_tokens == (length - 1) // BLOCK * BLOCK
    assert list(follow.outputs[0].token_ids) == reference.greedy(prompt, MAX_TOKENS)


def test_abort_mid_decode_and_finish_leave_no_leak(llm: Any) -> None:
    from vllm import SamplingParams

    _, pool, runner = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    for i in range(4):
        llm.llm_engine.add_request(f"abort-{i}", {"prompt_token_ids": prompt_ids(200 + i, 260)},
                                   SamplingParams(max_tokens=50, temperature=0.0, extra_args={
                                       "kv_policy": "chunkkv", "kv_ratio": 0.25}))
    for _ in range(6):  # prefill (3 steps) and a few decode steps
        llm.llm_engine.step()
    rows = runner._kvcompress.evicted_rows
    assert rows.by_request and rows.any(4)  # compressed and decoding
    llm.llm_engine.abort_request(["abort-0", "abort-2"])
    run_steps(llm)
    assert pool.get_num_free_blocks() == start_free
    # Workers learn of finished requests with the next step; after one, nothing is left.
    llm.generate([{"prompt_token_ids": prompt_ids(1, 10)}], SamplingParams(max_tokens=2),
                 use_tqdm=False)
    assert not [r for r in rows.by_request if r.startswith("abort-")]
    assert not rows.any(len(rows.rows))  # every row's count went with its request
    assert not runner._kvcompress.pending


@pytest.fixture(scope="module")
def small_pool_llm(tiny_model: Path, llm: Any) -> Iterator[Any]:
    """An engine whose pool holds N = 8 full requests (480 + 32 tokens = 16 blocks each)."""
    from vllm import LLM

    engine = LLM(model=str(tiny_model), num_gpu_blocks_override=8 * 16 + 1,
                 **{**ENGINE, "max_num_batched_tokens": 512, "max_num_seqs": 64})
    yield engine
    del engine


def run_concurrent(llm: Any, n: int, xargs: dict[str, Any], max_tokens: int
                   ) -> tuple[int, int, list[list[int]]]:
    """Submits ``n`` 480-token requests at once; returns (peak running, preemptions, outputs)."""
    from vllm import SamplingParams

    scheduler, _, _ = engine_internals(llm)
    for i in range(n):
        llm.llm_engine.add_request(f"cap-{xargs['kv_policy']}-{i}",
                                   {"prompt_token_ids": prompt_ids(300 + i, 480)},
                                   SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                  ignore_eos=True,
                                                  extra_args=xargs))
    peak, preemptions = 0, {}
    outputs: dict[str, list[int]] = {}
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        peak = max(peak, len(scheduler.running))
        for req_id, request in scheduler.requests.items():
            preemptions[req_id] = request.num_preemptions
    return peak, sum(preemptions.values()), [outputs[k] for k in sorted(outputs)]


def test_capacity_about_n_over_ratio_without_preemption(small_pool_llm: Any) -> None:
    _, pool, _ = engine_internals(small_pool_llm)
    start_free = pool.get_num_free_blocks()
    full_peak, _, _ = run_concurrent(small_pool_llm, 32, {"kv_policy": "none"}, 32)
    peak, preemptions, outputs = run_concurrent(
        small_pool_llm, 32, {"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16}, 32)
    print(f"peak running: full KV {full_peak}, snapkv ratio 0.25 {peak}")
    assert full_peak == 8
    # N / ratio = 32 is the ideal. Block granularity (120 kept + 32 generated tokens = 5 blocks,
    # not 4) and admission (a new request holds its whole prompt's 15 blocks until its prefill
    # completes) cap it at (128 - 15) // 5 + 1 = 23.
    assert peak >= 0.65 * full_peak / 0.25 and preemptions == 0
    assert all(len(out) == 32 for out in outputs)
    assert pool.get_num_free_blocks() == start_free


def test_preemption_recompute_and_tiny_pool_leave_no_leak(small_pool_llm: Any) -> None:
    scheduler, pool, runner = engine_internals(small_pool_llm)
    start_free = pool.get_num_free_blocks()
    # Long generations outgrow the pool: the scheduler must preempt and recompute.
    _, preemptions, outputs = run_concurrent(
        small_pool_llm, 24, {"kv_policy": "chunkkv", "kv_ratio": 0.25, "kv_window": 16}, 400)
    assert preemptions > 0
    assert all(len(out) == 400 for out in outputs)
    assert pool.get_num_free_blocks() == start_free
    assert scheduler._kvcompress.stats.skipped_resumed > 0
    # Only the last finisher's count remains (dropped on the next step).
    assert len(runner._kvcompress.evicted_rows.by_request) <= 1


def test_edge_cases_with_compression(llm: Any, reference: ReferenceModel) -> None:
    """Defined behaviour at the edges, with no block leaked:
    * a prompt shorter than sinks + window is not compressed, and counted as such;
    * budget 0 or 1 keeps exactly sinks + window;
    * a prompt that is an exact multiple of the block size, and one at max_model_len;
    * n > 1, stop strings, logprobs, prompt_logprobs, structured output, and a generation after
      compression that crosses many new blocks."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    scheduler, pool, runner = engine_internals(llm)
    stats = scheduler._kvcompress.stats
    start_free = pool.get_num_free_blocks()

    short_before = stats.not_compressed_short
    out = llm.generate([{"prompt_token_ids": prompt_ids(70, 30)}], SamplingParams(
        max_tokens=3, extra_args={"kv_policy": "snapkv", "kv_window": 32}), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and stats.not_compressed_short == short_before + 1

    for budget in (0, 1):
        out = llm.generate([{"prompt_token_ids": prompt_ids(71, 200)}], SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.0, extra_args={
                "kv_policy": "snapkv", "kv_budget": budget, "kv_window": 16}),
            use_tqdm=False)[0]
        kept = kept_log(runner, out.request_id)
        assert all(len(row) == 4 + 16 for k in kept.values() for row in k)  # sinks + window
        assert list(out.outputs[0].token_ids) == reference.greedy(
            prompt_ids(71, 200), MAX_TOKENS, kept)

    compress = {"kv_policy": "chunkkv", "kv_ratio": 0.25, "kv_window": 16}
    cases = {
        "block multiple": ({"prompt_token_ids": prompt_ids(72, 8 * BLOCK)},
                           SamplingParams(max_tokens=8, extra_args=compress)),
        "at max_model_len": ({"prompt_token_ids": prompt_ids(73, 1023)},
                             SamplingParams(max_tokens=1, extra_args=compress)),
        # No seed: stock vLLM 0.32 on CPU fails seeded requests whose chunked-prefill sample is
        # discarded (it calls set_offset on a CPU torch.Generator), plugin or not.
        "n=3": ({"prompt_token_ids": prompt_ids(74, 300)},
                SamplingParams(n=3, max_tokens=8, temperature=0.8, extra_args=compress)),
        "stop": ({"prompt_token_ids": prompt_ids(75, 300)},
                 SamplingParams(max_tokens=40, stop=["e"], extra_args=compress)),
        "logprobs": ({"prompt_token_ids": prompt_ids(76, 300)},
                     SamplingParams(max_tokens=8, logprobs=3, extra_args=compress)),
        "prompt_logprobs": ({"prompt_token_ids": prompt_ids(77, 300)},
                            SamplingParams(max_tokens=4, prompt_logprobs=1, extra_args=compress)),
        "structured": ({"prompt_token_ids": prompt_ids(78, 300)},
                       SamplingParams(max_tokens=10, extra_args=compress,
                                      structured_outputs=StructuredOutputsParams(
                                          choice=["yes", "no"]))),
        "long": ({"prompt_token_ids": prompt_ids(79, 300)},
                 SamplingParams(max_tokens=600, ignore_eos=True, extra_args=compress)),
    }
    compressed_before = stats.requests_compressed
    results = {name: llm.generate([prompt], params, use_tqdm=False)[0]
               for name, (prompt, params) in cases.items()}
    assert stats.requests_compressed - compressed_before == len(cases) + 2  # n=3 -> 3 requests
    assert [len(o.token_ids) for o in results["n=3"].outputs] == [8, 8, 8]
    assert len(results["at max_model_len"].outputs[0].token_ids) == 1
    assert len(results["block multiple"].outputs[0].token_ids) == 8
    assert "e" not in results["stop"].outputs[0].text
    assert all(len(step) >= 3 for step in results["logprobs"].outputs[0].logprobs)
    assert len(results["prompt_logprobs"].prompt_logprobs) == 300
    assert results["structured"].outputs[0].text in ("yes", "no")
    assert len(results["long"].outputs[0].token_ids) == 600  # 600 tokens = 19 new blocks
    assert pool.get_num_free_blocks() == start_free


def test_throughput_benchmark_loop_reports_consistent_figures(small_pool_llm: Any) -> None:
    """`kvcompress bench throughput`'s measuring loop on the small pool: every request finishes,
    percentiles are ordered, and compression lets more requests run at once than `none`."""
    from vllm_kvcompress.bench.throughput import run_config

    _, pool, _ = engine_internals(small_pool_llm)
    start_free = pool.get_num_free_blocks()
    prompts = [prompt_ids(500 + i, 480) for i in range(24)]
    full = run_config(small_pool_llm, prompts, "none", 1.0, 32, "bench-test")
    compressed = run_config(small_pool_llm, prompts, "snapkv", 0.25, 32, "bench-test")
    for row in (full, compressed):
        assert row["requests"] == 24 and row["output_tokens_per_s"] > 0
        assert row["ttft_p50_s"] <= row["ttft_p99_s"] and row["tpot_p50_s"] <= row["tpot_p99_s"]
    assert full["peak_running"] == 8 and compressed["peak_running"] > 2 * full["peak_running"]
    assert pool.get_num_free_blocks() == start_free
