"""KVzip in the real engine (in process, tiny Llama, fp32, CPU_ATTN).

The reference is written here, independently of the engine's code: plain transformers prefills
the context, runs its own reconstruction passes (kvpress's repeat prompt from the tokenizer's
chat template, chunked, teacher-forced) over a copy of the full cache, scores each context token
per layer and KV head from the captured q/k (max softmax weight over [sinks, chunk, own keys]),
makes its own selection from those scores, then greedy-decodes attending only to the kept tokens.

* exactness: engine tokens and kept indices == reference, ``shared`` and ``per_head``, contexts of
  several reconstruction chunks, in one batch with a ``none`` neighbour; no block leaked;
* compress once, reuse: request 1 (context alone, ``kv_reuse_prefix: on``) is compressed by
  kvzip; request 2 (context + question, same settings) hits the compressed prefix, prefills only
  the question and equals the reference.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from kv_reference import KeptIndices, ReferenceModel
from test_engine_compression import (
    engine_internals,
    kept_log,
    prompt_ids,
    recording_llm,
    request_spec,
)

pytestmark = pytest.mark.engine

MAX_TOKENS = 12
CHUNK = 64
CASES: list[tuple[dict[str, Any], int]] = [
    ({"kv_policy": "kvzip", "kv_ratio": 0.25, "kv_window": 8, "kv_kvzip_chunk_size": CHUNK},
     230),
    ({"kv_policy": "kvzip", "kv_ratio": 0.3, "kv_window": 8, "kv_kvzip_chunk_size": CHUNK,
      "kv_head_select": "per_head"}, 200),
]


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Any:
    gc.collect()
    engine = recording_llm(tiny_model, num_blocks=512)
    yield engine
    del engine
    gc.collect()


def repeat_ids(model_dir: Path) -> tuple[list[int], list[int], list[int]]:
    """kvpress's (first-chunk prompt, later-chunk prompt, chat suffix) ids, derived here."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    separator = "\n" + "#" * len("dummy context")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "dummy context" + separator}], add_generation_prompt=True,
        tokenize=False)
    suffix = text.split(separator)[1]
    def encode(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False)

    return (encode("\n\nRepeat the previous context exactly."),
            encode("\n\nRepeat the part of the previous context exactly, starting with"),
            encode(suffix))


@torch.no_grad()
def reference_kvzip_scores(reference: ReferenceModel, model_dir: Path, context: list[int],
                           chunk: int, sinks: int) -> list[torch.Tensor]:
    """Per layer ``[H, L]``: each context token's max reconstruction attention (kvpress)."""
    model = reference.model
    first, later, suffix = repeat_ids(model_dir)
    length = len(context)
    cache = model(torch.tensor([context]), use_cache=True).past_key_values
    scores = [torch.zeros(layer.keys.shape[1], length) for layer in cache.layers]
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        lead = first if start == 0 else later + context[start - 8:start]
        ids = lead + suffix + context[start:end]
        with reference._capture() as captured:
            model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
        cache.crop(length)  # the reconstruction's own KV is dropped
        for layer, tensors in captured.items():
            queries, keys = tensors.queries, tensors.keys  # [Hq, q, D], [H, L + q, D]
            heads, q_len = keys.shape[0], queries.shape[1]
            group = queries.shape[0] // heads
            sink = min(sinks, start)
            sub = torch.cat([keys[:, :sink], keys[:, start:end], keys[:, length:]], dim=1)
            for head in range(heads):
                q = queries[head * group:(head + 1) * group]  # [G, q, D]
                logits = q @ sub[head].T / keys.shape[-1] ** 0.5  # [G, q, s + c + q]
                own = logits[:, :, -q_len:]
                own.masked_fill_(torch.ones(q_len, q_len).triu(1).bool(), float("-inf"))
                weights = logits.softmax(dim=-1)[:, :, sink:sink + end - start]
                scores[layer][head, start:end] = weights.amax(dim=(0, 1))
    return scores


def reference_kept(reference: ReferenceModel, model_dir: Path, context: list[int],
                   xargs: dict[str, Any], engine_scores: list[torch.Tensor] | None = None
                   ) -> KeptIndices:
    """The reference's own kvzip selection of ``context`` (its scores checked against the
    engine's recorded ones when given: the selection alone hides small score errors)."""
    from vllm_kvcompress.policies import LayerObservation, build_policy

    spec = request_spec(xargs)
    assert spec.kvzip_chunk_size == CHUNK < len(context)  # several reconstruction passes
    kept = spec.kept_tokens(len(context))
    scores = reference_kvzip_scores(reference, model_dir, context, spec.kvzip_chunk_size,
                                    spec.sink_tokens)
    if engine_scores is not None:
        assert len(engine_scores) == len(scores)
        for layer, (got, want) in enumerate(zip(engine_scores, scores, strict=True)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, layer=layer: f"layer {layer}: {m}")
    policy = build_policy(spec)
    result = {}
    for layer, layer_scores in enumerate(scores):
        obs = LayerObservation(
            seq_len=len(context), budget=kept, sink_tokens=spec.sink_tokens, window=spec.window,
            layer_idx=layer, num_layers=len(scores), num_kv_heads=layer_scores.shape[0],
            reconstruction_attention=layer_scores)
        result[layer] = policy.keep_indices(obs).tolist()
    return result


def engine_scores(runner: Any, request_id: str) -> list[torch.Tensor]:
    """The engine's recorded kvzip scores of a request (internal ids carry a suffix)."""
    log = runner._kvcompress.reconstruction_log
    [key] = [k for k in log if k.rsplit("-", 1)[0] == request_id]
    return log[key]


def sampling(max_tokens: int, xargs: dict[str, Any] | None) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=xargs)


def test_kvzip_matches_reference_in_both_modes(llm: Any, reference: ReferenceModel,
                                               tiny_model: Path) -> None:
    """Several reconstruction chunks per context, shared and per_head, a `none` neighbour."""
    _, pool, runner = engine_internals(llm)
    free = pool.get_num_free_blocks()
    contexts = [prompt_ids(2600 + i, n) for i, (_, n) in enumerate(CASES)]
    neighbour = prompt_ids(2699, 150)
    outputs = llm.generate([{"prompt_token_ids": c} for c in [*contexts, neighbour]],
                           [sampling(MAX_TOKENS, x) for x, _ in CASES]
                           + [sampling(MAX_TOKENS, {"kv_policy": "none"})], use_tqdm=False)
    assert list(outputs[-1].outputs[0].token_ids) == reference.greedy(neighbour, MAX_TOKENS)
    differs = 0
    for (xargs, _), context, out in zip(CASES, contexts, outputs, strict=False):
        assert out.outputs[0].finish_reason == "length", xargs
        kept = reference_kept(reference, tiny_model, context, xargs,
                              engine_scores(runner, out.request_id))
        assert kept_log(runner, out.request_id) == kept, xargs
        want = reference.greedy(context, MAX_TOKENS, kept)
        got = list(out.outputs[0].token_ids)
        assert got == want, f"{xargs}: engine {got} != reference {want}"
        differs += got != reference.greedy(context, MAX_TOKENS)
    if CASES[1][0].get("kv_head_select") == "per_head":
        heads = kept_log(runner, outputs[1].request_id)[0]
        assert heads[0] != heads[1], "per_head selection kept the same tokens in every head"
    assert differs >= 1  # the comparison can fail: eviction changed some answer
    assert pool.get_num_free_blocks() == free


def test_compress_once_then_reuse(llm: Any, reference: ReferenceModel, tiny_model: Path
                                  ) -> None:
    """Request 1 compresses the context alone with kvzip and publishes it; request 2 (context +
    question, same settings) prefills only the question on the compressed context, exactly."""
    _, pool, runner = engine_internals(llm)
    free = pool.get_num_free_blocks()
    xargs = {"kv_policy": "kvzip", "kv_ratio": 0.25, "kv_reuse_prefix": "on",
             "kv_kvzip_chunk_size": CHUNK}
    context = prompt_ids(2701, 260)
    question = prompt_ids(2702, 23)
    one = llm.generate([{"prompt_token_ids": context}], sampling(1, xargs), use_tqdm=False)[0]
    kept = reference_kept(reference, tiny_model, context, xargs,
                          engine_scores(runner, one.request_id))
    assert kept_log(runner, one.request_id) == kept
    two = llm.generate([{"prompt_token_ids": context + question}], sampling(MAX_TOKENS, xargs),
                       use_tqdm=False)[0]
    assert two.num_cached_tokens == len(context)  # only the question was prefilled
    assert not [k for k in runner._kvcompress.kept_log
                if k.rsplit("-", 1)[0] == two.request_id], "request 2 was compacted"
    want = reference.greedy_on_compressed_prefix(context, kept, question, MAX_TOKENS)
    assert list(two.outputs[0].token_ids) == want
    assert pool.get_num_free_blocks() == free


@pytest.mark.parametrize("key", ["kv_decode_budget", "kv_prefill_budget"])
def test_kvzip_refuses_budgets_it_cannot_honour(key: str) -> None:
    """KVzip scores a whole prompt once: decode/prefill budgets are refused, naming the key."""
    from vllm_kvcompress.config import CompressionConfigError

    with pytest.raises(CompressionConfigError) as info:
        request_spec({"kv_policy": "kvzip", key: 200})
    assert info.value.field == key and "kvzip" in str(info.value)


def test_kvzip_refused_where_it_cannot_run() -> None:
    """Another architecture or tensor parallelism: one clear reason (startup / HTTP 400)."""
    from vllm_kvcompress.admission import Frontend, admit
    from vllm_kvcompress.config import CompressionConfigError, CompressionSpec
    from vllm_kvcompress.deployment import kvzip_unsupported_reason

    assert kvzip_unsupported_reason(["Qwen2ForCausalLM"]) is None
    assert "tensor parallelism" in kvzip_unsupported_reason(["LlamaForCausalLM"], 2)
    reason = kvzip_unsupported_reason(["GPT2LMHeadModel"])
    assert "GPT2LMHeadModel" in reason
    frontend = Frontend(CompressionSpec(), None, None, policy_unsupported={"kvzip": reason})
    with pytest.raises(CompressionConfigError) as info:
        admit({"kv_policy": "kvzip"}, frontend)
    assert info.value.field == "kv_policy" and "GPT2LMHeadModel" in str(info.value)
    assert admit({"kv_policy": "knorm"}, frontend).policy == "knorm"


@pytest.mark.parametrize(("start", "end"), [(0, 200), (0, 64), (64, 128), (192, 200)])
def test_chunk_scores_match_a_loop(start: int, end: int) -> None:
    """``chunk_scores`` (one batched logits matrix) == a loop over KV heads and query heads."""
    from vllm_kvcompress.policies.kvzip import chunk_scores

    gen = torch.Generator().manual_seed(start)
    queries, own = torch.randn(4, 30, 64, generator=gen), torch.randn(2, 30, 64, generator=gen)
    context = torch.randn(2, 200, 64, generator=gen)
    want = torch.zeros(2, end - start)
    sink = min(4, start)
    for head in range(2):
        keys = torch.cat([context[head, :sink], context[head, start:end], own[head]])
        for query_head in (2 * head, 2 * head + 1):
            logits = 0.125 * queries[query_head] @ keys.T
            logits[:, -30:] += torch.full((30, 30), float("-inf")).triu(1)
            weights = logits.softmax(-1)[:, sink:sink + end - start].amax(0)
            want[head] = torch.maximum(want[head], weights)
    torch.testing.assert_close(chunk_scores(queries, context, own, start, end, 4, 0.125), want)


def test_default_chunk_size_is_valid_on_a_short_context_server() -> None:
    """A server whose max_model_len is below kvzip's default chunk (2048) still starts: the
    flags hand every default to the server layer, which is checked against the deployment."""
    from vllm_kvcompress.config import resolve
    from vllm_kvcompress.policies.params import Bounds

    bounds = Bounds(deployment={"max_model_len": 1024, "num_layers": 2})
    spec = resolve(({"kvzip_chunk_size": 2048}, {}, bounds))
    assert spec.kvzip_chunk_size == 2048


@pytest.mark.server
def test_vllm_serve_compresses_once_with_kvzip_and_reuses(server: Any, tiny_model: Path,
                                                          reference: ReferenceModel) -> None:
    """Through `vllm serve`'s OpenAI API: request 1 sends the context alone with kvzip and
    `kv_reuse_prefix: on` (published: `/metrics`); request 2 sends the context + a question
    with the same `vllm_xargs`, starts on the compressed context (a reuse hit covering the
    whole context) and answers what the reference answers attending to its OWN kvzip selection
    of the context."""
    import requests
    from transformers import AutoTokenizer

    from vllm_kvcompress.local_server import metric_values

    def post(prompt: list[int], max_tokens: int) -> Any:
        return requests.post(f"{server.base_url}/v1/completions", timeout=300, json={
            "model": str(tiny_model), "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "vllm_xargs": xargs})

    def counters() -> tuple[float, ...]:
        text = server.metrics()
        return tuple(metric_values(text, f"vllm_kvcompress:{name}_total")[0]
                     for name in ("prefixes_published", "prefix_reuse_hits",
                                  "prefix_reuse_tokens"))

    xargs = {"kv_policy": "kvzip", "kv_ratio": 0.25, "kv_reuse_prefix": "on",
             "kv_kvzip_chunk_size": CHUNK}
    context, question = prompt_ids(2711, 250), prompt_ids(2712, 19)
    published, hits, tokens = counters()
    assert post(context, 1).status_code == 200
    assert counters() == (published + 1, hits, tokens)
    answer = post(context + question, MAX_TOKENS)
    assert answer.status_code == 200, answer.text
    assert counters() == (published + 1, hits + 1, tokens + len(context))
    kept = reference_kept(reference, tiny_model, context, xargs)
    want = reference.greedy_on_compressed_prefix(context, kept, question, MAX_TOKENS)
    assert want != reference.greedy(context + question, MAX_TOKENS)  # eviction shows
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    assert answer.json()["choices"][0]["text"] == tokenizer.decode(want)
