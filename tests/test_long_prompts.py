"""Prompts longer than the KV pool (issue 25, deliverable 2), in the real engine (in process,
tiny Llama, fp32): with a server-wide ``prefill_budget`` the engine starts with a
``max_model_len`` its pool could not hold uncompressed, serves such prompts exactly (a
chunk-wise reference), and refuses a request that could never fit; without one, vLLM's own
startup check still refuses the same deployment.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kv_reference import CompressedGeneration, ReferenceModel, assert_same_compactions
from test_engine_compression import ENGINE, engine_internals, prompt_ids

pytestmark = pytest.mark.engine

BLOCKS = 40  # 39 usable blocks of 32: a pool of 1,248 tokens
CHUNK = 256
SERVER = {"policy": "snapkv", "prefill_budget": 512, "window": 16}
DEPLOYMENT = {**ENGINE, "max_model_len": 4096, "max_num_batched_tokens": CHUNK,
              "num_gpu_blocks_override": BLOCKS}


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Iterator[Any]:
    import os

    from vllm import LLM

    gc.collect()  # an earlier module's engine, collected late, must not outlive this one's start
    os.environ["VLLM_KVCOMPRESS_RECORD_KEPT"] = "1"
    engine = LLM(model=str(tiny_model), additional_config={"kvcompress": SERVER}, **DEPLOYMENT)
    yield engine
    del engine
    gc.collect()


def test_a_prompt_longer_than_the_pool_is_served_exactly(llm: Any, reference: ReferenceModel
                                                          ) -> None:
    from vllm import SamplingParams

    from vllm_kvcompress.config import CompressionSpec

    _, pool, runner = engine_internals(llm)
    usable = pool.num_gpu_blocks - 1
    assert usable * 32 < 3000 < DEPLOYMENT["max_model_len"]
    start_free = pool.get_num_free_blocks()
    ids = prompt_ids(1234, 3000)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    log = runner._kvcompress.compaction_log
    engine_log = log[next(k for k in log if k.rsplit("-", 1)[0] == out.request_id)]
    ref = CompressedGeneration(reference, CompressionSpec(**SERVER), engine_log)
    want = ref.generate(ids, 8, chunk=CHUNK)
    assert_same_compactions(engine_log, ref.compactions, SERVER)
    assert list(out.outputs[0].token_ids) == want
    assert len(ref.compactions) >= 10
    assert pool.get_num_free_blocks() == start_free


@pytest.mark.parametrize(("xargs", "max_tokens"), [
    ({"kv_policy": "none"}, 8),  # no compression: 3,008 tokens at once
    ({"kv_prefill_budget": 1100}, 8),  # a budget the pool cannot hold with a chunk
    (None, 1000),  # the budget holds the prompt, not 1,000 generated tokens
])
def test_a_request_that_could_never_fit_is_refused(llm: Any, xargs: dict | None,
                                                   max_tokens: int) -> None:
    from vllm import SamplingParams

    with pytest.raises(Exception, match=r"^kv_prefill_budget: this request would hold \d+ KV "
                                        r"tokens at once .* more than the KV pool's 1248") as info:
        llm.generate([{"prompt_token_ids": prompt_ids(77, 3000)}], SamplingParams(
            max_tokens=max_tokens, extra_args=xargs), use_tqdm=False)
    assert getattr(info.value, "parameter", None) == "vllm_xargs.kv_prefill_budget"
    served = llm.generate([{"prompt_token_ids": prompt_ids(78, 3000)}],
                          SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(served[0].outputs[0].token_ids) == 4  # the engine goes on


def test_without_a_prefill_budget_vllm_still_refuses_the_deployment(llm: Any) -> None:
    """The same pool and max_model_len with a server default that does not compress while
    prefilling: vLLM's own startup check stands (the adaptation is no blanket bypass). Checked
    on the function vLLM's engine core calls, with this engine's config and KV specs (no second
    engine)."""
    from vllm.v1.engine import core

    config = llm.llm_engine.vllm_config
    specs = llm.llm_engine.engine_core.engine_core.model_executor.get_kv_cache_specs()
    available = [BLOCKS * sum(spec.page_size_bytes for spec in specs[0].values())]
    saved = (config.additional_config, config.cache_config.num_gpu_blocks_override)
    try:
        config.cache_config.num_gpu_blocks_override = None
        config.additional_config = {"kvcompress": {"policy": "snapkv", "ratio": 0.25}}
        with pytest.raises(ValueError, match="max seq len"):
            core.get_kv_cache_configs(config, specs, available)
        config.additional_config = {"kvcompress": SERVER}
        core.get_kv_cache_configs(config, specs, available)  # the compressed footprint fits
        assert config.model_config.max_model_len == 4096  # restored after the check
    finally:
        config.additional_config, config.cache_config.num_gpu_blocks_override = saved


def test_long_prompts_contending_for_the_pool_wait_their_turn(llm: Any) -> None:
    """Three 3,000-token prompts at once on a pool that holds one and a half footprints: each is
    admitted when its footprint fits (the others wait; nothing is over-committed, so nothing is
    preempted), the first is aborted mid-prefill, the other two finish, and the pool's free
    count returns to where it started."""
    from vllm import SamplingParams

    scheduler, pool, _ = engine_internals(llm)
    start_free = pool.get_num_free_blocks()
    engine = llm.llm_engine
    for i in range(3):
        engine.add_request(f"contend-{i}", {"prompt_token_ids": prompt_ids(300 + i, 3000)},
                           SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    finished: dict[str, int] = {}
    preempted = 0
    for step in range(2000):
        if not engine.has_unfinished_requests():
            break
        if step == 3:
            assert 0 < scheduler.requests[next(k for k in scheduler.requests if k.startswith(
                "contend-0"))].num_computed_tokens < 3000
            engine.abort_request(["contend-0"])  # mid-prefill
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
        preempted = max(preempted, sum(r.num_preemptions for r in scheduler.requests.values()))
    assert finished.get("contend-1") == 24 and finished.get("contend-2") == 24, finished
    assert preempted == 0
    assert pool.get_num_free_blocks() == start_free


@pytest.mark.server
def test_vllm_serve_starts_beyond_its_pool_and_serves_long_prompts(
        tiny_model: Path, tmp_path: Path) -> None:
    """`vllm serve` with a max_model_len four times what its pool holds: it starts (one log
    line says why), answers a 3,000-token prompt, and gives a request that could never fit a
    400 naming the reason, streaming or not (before any event: no 200 followed by an error
    event), on completions and chat, then keeps serving."""
    import requests

    from vllm_kvcompress.local_server import LocalServer

    args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "4096",
            "--block-size", "32", "--max-num-batched-tokens", str(CHUNK),
            "--num-gpu-blocks-override", str(BLOCKS), "--kv-policy", "snapkv",
            "--kv-prefill-budget", "512", "--kv-window", "16"]
    with LocalServer(str(tiny_model), args, tmp_path / "serve.log",
                     env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        def complete(xargs: dict | None, max_tokens: int = 4) -> requests.Response:
            body: dict[str, Any] = {"model": str(tiny_model), "prompt": prompt_ids(5, 3000),
                                    "max_tokens": max_tokens, "temperature": 0.0}
            if xargs:
                body["vllm_xargs"] = xargs
            return requests.post(f"{server.base_url}/v1/completions", json=body, timeout=300)

        def refused_before_streaming(endpoint: str, xargs: dict) -> None:
            body: dict[str, Any] = {"model": str(tiny_model), "max_tokens": 4, "stream": True,
                                    "vllm_xargs": xargs}
            if endpoint == "completions":
                body["prompt"] = prompt_ids(6, 3000)
            else:  # about 3,000 tokens of text through the chat template
                body["messages"] = [{"role": "user", "content": "a b " * 1500}]
            with requests.post(f"{server.base_url}/v1/{endpoint}", json=body, stream=True,
                               timeout=300) as resp:
                text = resp.text
            assert resp.status_code == 400, (endpoint, xargs, text[:500])
            assert not text.startswith("data:")  # a JSON error, not an event stream
            error = resp.json()["error"]
            assert error["param"] == "vllm_xargs.kv_prefill_budget"
            assert "could never run" in error["message"]

        served = complete(None)
        assert served.status_code == 200, served.text[:500]
        assert served.json()["usage"]["completion_tokens"] == 4
        refused = complete({"kv_policy": "none"})
        assert refused.status_code == 400, refused.text[:500]
        error = refused.json()["error"]
        assert error["param"] == "vllm_xargs.kv_prefill_budget"
        assert "could never run" in error["message"]
        assert "no compression (kv_policy none)" in error["message"]  # not the server's budget
        for endpoint in ("completions", "chat/completions"):
            refused_before_streaming(endpoint, {"kv_policy": "none"})  # no prefill budget
            refused_before_streaming(endpoint, {"kv_prefill_budget": 1100})  # over the pool
        assert complete(None).status_code == 200
        log = (tmp_path / "serve.log").read_text()
        assert "the KV pool is checked for a request of 768 tokens, not max_model_len 4096" \
            in log
