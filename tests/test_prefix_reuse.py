"""Compress once, reuse (``reuse_prefix: on``) in the real engine (in process, tiny Llama, fp32).

The client flow: request 1 sends a context alone (``max_tokens`` 1) with a policy and
``kv_reuse_prefix: on``; its compressed blocks are published to the prefix cache. Request 2
sends the same context followed by a question, with the same settings: it hits the compressed
prefix (``num_cached_tokens`` = the context), prefills only the question and keeps it whole.

* exactness: request 2's greedy output equals a plain-transformers reference that compresses the
  context ITSELF (its own selection from its own q/k/v of the context alone), then prefills the
  question attending to the kept keys at their original positions; request 1's kept tokens equal
  that selection, request 2 compacts nothing; a partial last block (copied on write) and a
  whole-block one;
* isolation: a request asking ``none``, another ratio, another policy, another window, no reuse,
  or a context differing in one token never reads the compressed prefix and gives exactly what a
  fresh engine gives;
* lifecycle: publication while request 1 still decodes into the shared last block, two readers at
  once, an abort, a failed compaction (never published), eviction of the compressed blocks by a
  request filling the pool (no hit afterwards, still exact), the pool's free count restored;
* tensor parallelism (TP=2 on this CPU machine): the same tokens and hits as TP=1.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kv_reference import ReferenceModel
from test_engine_compression import ENGINE, engine_internals, kept_log, prompt_ids, request_spec

pytestmark = pytest.mark.engine

ANSWER = 16
QUESTION = 23
#: (settings, context length): every kind of scorer, both selection modes, a whole-block kept
#: count (budget 64 = 2 blocks: no copy on write) and partial ones (ceil(0.25 * 301) = 76).
CASES: list[tuple[dict[str, Any], int]] = [
    ({"kv_policy": "knorm", "kv_ratio": 0.25, "kv_window": 16}, 301),
    ({"kv_policy": "knorm", "kv_budget": 64, "kv_window": 16, "kv_head_select": "shared"}, 280),
    ({"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16}, 301),
    ({"kv_policy": "snapkv", "kv_ratio": 0.3, "kv_window": 16, "kv_head_select": "per_head",
      "kv_merge": "on"}, 257),
    ({"kv_policy": "chunkkv", "kv_ratio": 0.3, "kv_window": 16, "kv_chunk_size": 10}, 300),
    ({"kv_policy": "streamingllm", "kv_ratio": 0.2}, 290),
    ({"kv_policy": "expected_attention", "kv_ratio": 0.3, "kv_window": 16}, 270),
    ({"kv_policy": "pyramidkv", "kv_ratio": 0.3, "kv_window": 16}, 300),
]
REUSE = {"kv_reuse_prefix": "on"}


def sampling(max_tokens: int, xargs: dict[str, Any] | None) -> Any:
    """Greedy sampling params with ``xargs`` as the request's ``vllm_xargs``."""
    from vllm import SamplingParams

    # ignore_eos: the reference decodes max_tokens regardless (token 3 is the tiny EOS).
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=xargs)


@contextlib.contextmanager
def tiny_llms(model: Path, *num_blocks: int) -> Iterator[list[Any]]:
    """In-process engines over the tiny model (``ENGINE``'s settings, prefix caching on, kept
    indices recorded), one per pool size, torn down together at the end: a torn-down engine
    takes vLLM's process-wide parallel state with it, so none outlives another's use."""
    from vllm import LLM

    os.environ["VLLM_KVCOMPRESS_RECORD_KEPT"] = "1"
    gc.collect()
    engines = [LLM(model=str(model), num_gpu_blocks_override=n, **ENGINE) for n in num_blocks]
    try:
        yield engines
    finally:
        del engines
        gc.collect()


def reuse_stats(llm: Any) -> tuple[int, int, int]:
    """(prefixes published, requests that reused one, context tokens they did not prefill)."""
    scheduler, _, _ = engine_internals(llm)
    stats = scheduler._kvcompress.stats
    return stats.prefixes_published, stats.prefix_reuse_hits, stats.prefix_reuse_tokens


def test_question_prefills_on_the_compressed_context_exactly(
        tiny_model: Path, reference: ReferenceModel) -> None:
    """Request 2 hits request 1's compressed context, prefills only its question, and its
    output equals the reference's (own selection on the context alone, question attending to
    the kept keys at their original positions); a `none` neighbour shares the batch."""
    with tiny_llms(tiny_model, 512) as (llm,):
        check_reuse_exact(llm, reference)


def check_reuse_exact(llm: Any, reference: ReferenceModel) -> None:
    _, pool, runner = engine_internals(llm)
    free = pool.get_num_free_blocks()
    published, hits, tokens = reuse_stats(llm)
    settings = [{**xargs, **REUSE} for xargs, _ in CASES]
    contexts = [prompt_ids(700 + i, n) for i, (_, n) in enumerate(CASES)]
    questions = [prompt_ids(800 + i, QUESTION) for i in range(len(CASES))]
    first = llm.generate([{"prompt_token_ids": c} for c in contexts],
                         [sampling(1, x) for x in settings], use_tqdm=False)
    assert reuse_stats(llm)[0] == published + len(CASES)
    neighbour = prompt_ids(899, 200)
    second = llm.generate([{"prompt_token_ids": c + q} for c, q in zip(contexts, questions,
                                                                        strict=True)]
                          + [{"prompt_token_ids": neighbour}],
                          [sampling(ANSWER, x) for x in settings] + [sampling(ANSWER, None)],
                          use_tqdm=False)
    assert reuse_stats(llm)[1:] == (hits + len(CASES), tokens + sum(map(len, contexts)))
    assert list(second[-1].outputs[0].token_ids) == reference.greedy(neighbour, ANSWER)
    differs_from_full = differs_from_query_aware = 0
    for xargs, context, question, one, two in zip(settings, contexts, questions, first,
                                                 second[:-1], strict=True):
        spec = request_spec(xargs)
        kept = reference.select(context, spec)
        merged = reference.merged
        assert kept_log(runner, one.request_id) == kept, xargs  # request 1's own selection
        assert not [k for k in runner._kvcompress.kept_log
                    if k.rsplit("-", 1)[0] == two.request_id], "request 2 was compacted"
        assert two.num_cached_tokens == len(context), xargs  # only the question prefilled
        got = list(two.outputs[0].token_ids)
        want = reference.greedy_on_compressed_prefix(context, kept, question, ANSWER, merged)
        assert got == want, f"{xargs}: engine {got} != reference {want}"
        differs_from_full += got != reference.greedy(context + question, ANSWER)
        whole = reference.select(context + question, spec)
        differs_from_query_aware += got != reference.greedy(context + question, ANSWER, whole,
                                                            reference.merged)
    # The comparison can fail: the answers depend on which KV the question saw.
    assert differs_from_full >= 2 and differs_from_query_aware >= 2
    assert pool.get_num_free_blocks() == free  # cached-but-free blocks count as free


def test_other_settings_never_read_a_compressed_context(tiny_model: Path) -> None:
    """With a context published under knorm at 0.25, the same context + question asking
    `none`, another ratio, another policy, another window or no reuse (and a context one token
    away asking the same settings) reuse nothing and give exactly a fresh engine's tokens."""
    published = {"kv_policy": "knorm", "kv_ratio": 0.25, "kv_window": 16, **REUSE}
    context = prompt_ids(601, 300)
    question = prompt_ids(602, QUESTION)
    altered = [*context[:-1], (context[-1] + 1) % 1000 + 4]
    others = [({"kv_policy": "none"}, context), (None, context),
              ({**published, "kv_ratio": 0.5}, context),
              ({**published, "kv_policy": "snapkv"}, context),
              ({**published, "kv_window": 8}, context),
              ({**published, "kv_reuse_prefix": "off"}, context),
              (published, altered)]
    prompts = [{"prompt_token_ids": ctx + question} for _, ctx in others]
    params = [sampling(ANSWER, x) for x, _ in others]
    with tiny_llms(tiny_model, 512, 512) as (fresh, llm):
        want = [list(o.outputs[0].token_ids)
                for o in fresh.generate(prompts, params, use_tqdm=False)]
        before = reuse_stats(llm)
        llm.generate([{"prompt_token_ids": context}], sampling(1, published), use_tqdm=False)
        assert reuse_stats(llm)[0] == before[0] + 1
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == want
        assert reuse_stats(llm)[1] == before[1]  # no request took the compressed context
        # Identical prompts share vLLM's own (block-aligned) hits; never the compressed one.
        assert all(o.num_cached_tokens != len(context) for o in outputs)


def test_lifecycle_sharing_abort_failure_eviction(tiny_model: Path,
                                                  reference: ReferenceModel) -> None:
    """A 34-block pool: request 1 publishes after its prompt step and keeps decoding into the
    shared partial last block while two readers take the context (each copies that block on
    write); an aborted reader and a publisher whose compaction fails leave the pool as it was;
    a request filling the pool evicts the compressed blocks, so the next reader misses (no hit)
    and is compressed whole, exactly; no block leaks."""
    with tiny_llms(tiny_model, 34) as (llm,):
        check_lifecycle(llm, reference)


def check_lifecycle(llm: Any, reference: ReferenceModel) -> None:
    from vllm_kvcompress.policies import registry

    scheduler, pool, _ = engine_internals(llm)
    engine = llm.llm_engine
    prefixes = scheduler._kvcompress.prefixes
    free = pool.get_num_free_blocks()
    xargs = {"kv_policy": "knorm", "kv_ratio": 0.25, "kv_window": 16, **REUSE}
    spec = request_spec(xargs)
    context = prompt_ids(611, 301)
    questions = [prompt_ids(612 + i, QUESTION) for i in range(4)]
    kept = reference.select(context, spec)

    def run(requests: dict[str, tuple[list[int], int]], until: str | None = None
            ) -> dict[str, Any]:
        for request_id, (ids, max_tokens) in requests.items():
            engine.add_request(request_id, {"prompt_token_ids": ids},
                               sampling(max_tokens, xargs))
        done: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if until is not None and out.request_id == until and out.outputs[0].token_ids:
                    return done
                if out.finished:
                    done[out.request_id] = out
        return done

    run({"publisher": (context, 24)}, until="publisher")
    assert len(prefixes) == 1  # published after the prompt step, the publisher decodes on
    done = run({"reader-0": (context + questions[0], ANSWER),
                "reader-1": (context + questions[1], ANSWER)})
    assert list(done["publisher"].outputs[0].token_ids) == reference.greedy(context, 24,
                                                                            kept)
    for i in range(2):
        reader = done[f"reader-{i}"]
        assert reader.num_cached_tokens == len(context)
        assert list(reader.outputs[0].token_ids) == reference.greedy_on_compressed_prefix(
            context, kept, questions[i], ANSWER)
    assert pool.get_num_free_blocks() == free

    # An aborted reader frees only its own references: the context stays published.
    engine.add_request("aborted", {"prompt_token_ids": context + questions[2]},
                       sampling(ANSWER, xargs))
    engine.step()
    engine.abort_request(["aborted"])
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.get_num_free_blocks() == free
    ((prefix, blocks),) = [(p, prefixes._cached_blocks(p)) for p in prefixes.entries.values()]
    assert blocks is not None and all(block.ref_cnt == 0 for block in blocks)
    assert prefix.kept == len(kept[0][0])

    # A publisher whose compaction raises is finished with an error and publishes nothing.
    registry.register_policy(registry.PolicyInfo(
        name="exploding-reuse", build=lambda s: _Exploding(), paper="-", summary="raises",
        parameters=()))
    try:
        bad = {**xargs, "kv_policy": "exploding-reuse"}
        out = llm.generate([{"prompt_token_ids": prompt_ids(613, 200)}], sampling(4, bad),
                           use_tqdm=False)
        assert out[0].outputs[0].finish_reason == "error"
        assert len(prefixes) == 1 and pool.get_num_free_blocks() == free
    finally:
        registry._REGISTRY.pop("exploding-reuse", None)

    # A request holding 32 of the 33 blocks evicts the cached ones, compressed included.
    llm.generate([{"prompt_token_ids": prompt_ids(614, 1000)}], sampling(8, None),
                 use_tqdm=False)
    hits = scheduler._kvcompress.stats.prefix_reuse_hits
    prompt = context + questions[3]
    (late,) = llm.generate([{"prompt_token_ids": prompt}], sampling(ANSWER, xargs),
                           use_tqdm=False)
    assert scheduler._kvcompress.stats.prefix_reuse_hits == hits
    assert late.num_cached_tokens < len(context)
    whole = reference.select(prompt, spec)  # missed: compressed whole, query-aware
    assert list(late.outputs[0].token_ids) == reference.greedy(prompt, ANSWER, whole)
    assert pool.get_num_free_blocks() == free


class _Exploding:
    """A policy whose scoring raises at layer 1 (as a kernel bug would)."""

    inputs = frozenset()
    head_select = "shared"

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int:
        return budget

    def selection_layer(self, layer_idx: int) -> int:
        return layer_idx

    def score(self, obs: Any) -> Any:
        raise RuntimeError("simulated kernel failure")

    def select(self, obs: Any, scores: Any) -> Any:
        raise AssertionError("not reached")

    def keep_indices(self, obs: Any) -> Any:
        return self.select(obs, self.score(obs))


def test_reuse_prefix_settings_are_checked() -> None:
    """`kv_reuse_prefix` is a declared setting (flag, YAML, request key) and refuses the
    compactions whose result depends on more than the context and the settings."""
    from vllm_kvcompress.config import CompressionConfigError, CompressionSpec, resolve_request

    server = CompressionSpec()
    assert resolve_request(server, {"kv_policy": "knorm", **REUSE}).reuse_prefix == "on"
    with pytest.raises(CompressionConfigError, match=r"^kv_reuse_prefix: must be one of off, on"):
        resolve_request(server, {"kv_policy": "knorm", "kv_reuse_prefix": "yes"})
    for extra in ({"kv_decode_budget": 200}, {"kv_prefill_budget": 200}):
        with pytest.raises(CompressionConfigError,
                           match=r"^kv_reuse_prefix: 'on' cannot be combined with decode_budget"):
            resolve_request(server, {"kv_policy": "knorm", **REUSE, **extra})


def test_tp2_reuses_the_compressed_context_exactly(tiny_model: Path,
                                                    reference: ReferenceModel) -> None:
    """Tensor parallelism (two ranks, one KV head each): request 2 hits the compressed context
    (every rank's worker adopts the evicted count; vLLM copies the partial block on every rank)
    and its tokens equal the reference's, in both selection modes; nothing leaks."""
    from test_tensor_parallel import MAX_TOKENS, run

    cases = [{"kv_policy": "knorm", "kv_ratio": 0.25, "kv_window": 16, **REUSE,
              "kv_head_select": "per_head"},
             {"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16, **REUSE}]
    contexts = [prompt_ids(621 + i, 301) for i in range(len(cases))]
    questions = [prompt_ids(631 + i, QUESTION) for i in range(len(cases))]
    two = run(tiny_model, 2, cases, contexts, then=[c + q for c, q in zip(contexts, questions,
                                                                          strict=True)])
    assert two["then_cached"] == [len(c) for c in contexts]
    for xargs, context, question, got in zip(cases, contexts, questions, two["then_tokens"],
                                             strict=True):
        kept = reference.select(context, request_spec(xargs))
        assert got == reference.greedy_on_compressed_prefix(context, kept, question,
                                                            MAX_TOKENS), xargs
    assert two["free_after"] == two["free_before"]


@pytest.mark.server
def test_vllm_serve_reuses_a_compressed_context(server: Any, tiny_model: Path) -> None:
    """Through `vllm serve`'s OpenAI API (`/v1/completions`, token-id prompts): the context
    alone with `kv_reuse_prefix: on` is published, the context + question with the same
    `vllm_xargs` hits it (the `/metrics` counters), a `none` request on the same prompt does
    not, and `kv_reuse_prefix` with a decode budget is a 400 naming the field."""
    import requests

    from vllm_kvcompress.local_server import metric_values

    def post(prompt: list[int], xargs: dict[str, Any], max_tokens: int) -> Any:
        return requests.post(f"{server.base_url}/v1/completions", timeout=120, json={
            "model": str(tiny_model), "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "vllm_xargs": xargs})

    def counters() -> tuple[float, float, float]:
        text = server.metrics()
        return tuple(metric_values(text, f"vllm_kvcompress:{name}_total")[0]
                     for name in ("prefixes_published", "prefix_reuse_hits",
                                  "prefix_reuse_tokens"))

    xargs = {"kv_policy": "knorm", "kv_ratio": 0.25, "kv_window": 16, **REUSE}
    context = prompt_ids(641, 300)
    question = prompt_ids(642, QUESTION)
    published, hits, tokens = counters()
    assert post(context, xargs, 1).status_code == 200
    assert counters() == (published + 1, hits, tokens)
    answer = post(context + question, xargs, 8)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
    assert counters() == (published + 1, hits + 1, tokens + len(context))
    assert post(context + question, {"kv_policy": "none"}, 8).status_code == 200
    assert counters()[1] == hits + 1
    refused = post(context, {**xargs, "kv_decode_budget": 200}, 1)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "vllm_xargs.kv_reuse_prefix"
