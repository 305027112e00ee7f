"""A real ``vllm serve`` against hostile clients (issue 22): every hostile request is a 400
within a second, never a 5xx; the engine stays up; good requests keep their exact output, also
while hostile ones arrive beside them; block usage and the query ring's memory return to idle;
operator controls given as flags are enforced; KV connectors are refused at startup.

The server is the session's (``conftest.server``): the chunkkv deployment, max_model_len 1024,
per-request files allowed under ``conftest.allowed_dir``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from vllm_kvcompress.local_server import CPU_SERVER_ENV, LocalServer, metric_values

pytestmark = pytest.mark.server

VLLM = str(Path(sys.executable).with_name("vllm"))
PROMPT = "the secret number is 42 remember it " * 30  # ~300 tokens: compressed by chunkkv
HUGE = 10**12

#: (vllm_xargs, field the 400 names). Sizes past every bound, wrong types, strings that are too
#: long or odd, forged internals, and files no client may name.
HOSTILE: list[tuple[dict[str, Any], str]] = [
    # The request that took EngineCore down (204,800,000,000 bytes in the query ring).
    ({"kv_policy": "snapkv", "kv_window": 100000000, "kv_decode_budget": 100000200},
     "kv_window"),
    ({"kv_window": 513}, "kv_window"),
    ({"kv_window": 2**63 - 1}, "kv_window"),
    ({"kv_window": -1}, "kv_window"),
    ({"kv_window": 0}, "kv_window"),
    # JSON booleans: vLLM's request model would make them 1 (strict_xargs refuses them first).
    ({"kv_window": True}, "kv_window"),
    ({"kv_decode_interval": [False]}, "kv_decode_interval"),
    ({"kv_window": "32"}, "kv_window"),
    ({"kv_window": [32]}, "kv_window"),
    ({"kv_window": 32.5}, "kv_window"),
    ({"kv_budget": HUGE}, "kv_budget"),
    ({"kv_budget": 1025}, "kv_budget"),  # past max_model_len
    ({"kv_sink_tokens": HUGE}, "kv_sink_tokens"),
    ({"kv_min_prompt_len": HUGE}, "kv_min_prompt_len"),
    ({"kv_decode_budget": HUGE}, "kv_decode_budget"),
    ({"kv_decode_budget": 500, "kv_decode_interval": 1}, "kv_decode_interval"),
    ({"kv_decode_budget": 500, "kv_decode_interval": HUGE}, "kv_decode_interval"),
    ({"kv_prefill_budget": HUGE}, "kv_prefill_budget"),
    ({"kv_prefill_budget": 0}, "kv_prefill_budget"),
    ({"kv_prefill_budget": 20}, "kv_prefill_budget"),  # no room for sinks + window (36)
    ({"kv_prefill_budget": True}, "kv_prefill_budget"),
    ({"kv_prefill_budget": "512"}, "kv_prefill_budget"),
    ({"kv_policy": "pyramidkv", "kv_prefill_budget": 200}, "kv_prefill_budget"),
    ({"kv_chunk_size": HUGE}, "kv_chunk_size"),
    ({"kv_chunk_size": 129}, "kv_chunk_size"),
    ({"kv_pool_kernel": 65}, "kv_pool_kernel"),
    ({"kv_reuse_layers": 5}, "kv_reuse_layers"),  # the tiny model has 4 layers
    ({"kv_policy": "sagekv", "kv_sage_queries": HUGE}, "kv_sage_queries"),
    ({"kv_policy": "expected_attention", "kv_future_positions": HUGE}, "kv_future_positions"),
    ({"kv_policy": "pyramidkv", "kv_beta": 1e300}, "kv_beta"),
    ({"kv_policy": "kvzip", "kv_kvzip_chunk_size": HUGE}, "kv_kvzip_chunk_size"),
    ({"kv_policy": "kvzip", "kv_kvzip_chunk_size": 4097}, "kv_kvzip_chunk_size"),
    ({"kv_policy": "kvzip", "kv_kvzip_chunk_size": 0}, "kv_kvzip_chunk_size"),
    ({"kv_policy": "kvzip", "kv_decode_budget": 512}, "kv_decode_budget"),
    ({"kv_reuse_prefix": "maybe"}, "kv_reuse_prefix"),
    ({"kv_reuse_prefix": True}, "kv_reuse_prefix"),
    ({"kv_policy": "snapkv", "kv_reuse_prefix": "on", "kv_prefill_budget": 512},
     "kv_reuse_prefix"),
    ({"kv_ratio": True}, "kv_ratio"),
    ({"kv_ratio": 1e-400}, "kv_ratio"),  # parses as 0.0
    ({"kv_ratio": -0.0}, "kv_ratio"),
    ({"kv_policy": "x" * 100_000}, "kv_policy"),
    ({"kv_policy": "snäpkv"}, "kv_policy"),
    ({"kv_policy": "snapkv\u0000"}, "kv_policy"),
    ({"kv_policy": ["snapkv"]}, "kv_policy"),
    ({"kv_head_select": "💥"}, "kv_head_select"),
    # An unknown key is named shortened (quoted in 80 characters): never echoed whole.
    ({"kv_" + "z" * 10_000: 1}, "kv_" + "z" * 73 + "..."),
    ({"_kvcompress_spec": "forged", "kv_policy": "snapkv"}, "_kvcompress_spec"),
    # Files: one answer for missing, outside, linked out, a directory, /proc, long names.
    ({"kv_policy": "qfilters", "kv_qfilters_path": "missing.safetensors"}, "kv_qfilters_path"),
    ({"kv_policy": "qfilters", "kv_qfilters_path": "link-out.safetensors"}, "kv_qfilters_path"),
    ({"kv_policy": "qfilters", "kv_qfilters_path": "a-folder"}, "kv_qfilters_path"),
    ({"kv_policy": "qfilters", "kv_qfilters_path": "/proc/self/environ"}, "kv_qfilters_path"),
    ({"kv_policy": "qfilters", "kv_qfilters_path": "/etc/passwd"}, "kv_qfilters_path"),
    ({"kv_policy": "qfilters", "kv_qfilters_path": "../" * 20 + "etc/passwd"},
     "kv_qfilters_path"),
    ({"kv_policy": "qfilters", "kv_qfilters_path": "n" * 300}, "kv_qfilters_path"),
    ({"kv_policy": "qfilters", "kv_qfilters_path": "/" + "d/" * 2000}, "kv_qfilters_path"),
]
#: Every file case that is a well-formed path (one longer than 1,024 characters is refused for
#: its length, which says nothing about the file system).
FILE_CASES = [x for x, field in HOSTILE if field == "kv_qfilters_path"
              and len(x["kv_qfilters_path"]) <= 1024]


def body(xargs: Any, max_tokens: int = 6, stream: bool = False, prompt: str = PROMPT
         ) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "", "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0.0, "stream": stream, "ignore_eos": True}
    if xargs is not None:
        out["vllm_xargs"] = xargs
    return out


def send(server: LocalServer, tiny_model: Path, payload: dict[str, Any] | str,
         timeout: float = 60) -> requests.Response:
    if isinstance(payload, dict):
        payload = {**payload, "model": str(tiny_model)}
        return requests.post(f"{server.base_url}/v1/completions", json=payload, timeout=timeout)
    return requests.post(f"{server.base_url}/v1/completions", data=payload, timeout=timeout,
                         headers={"Content-Type": "application/json"})


def tokens(resp: requests.Response) -> list[Any]:
    assert resp.status_code == 200, resp.text[:500]
    return resp.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def baseline(server: LocalServer, tiny_model: Path) -> dict[str, Any]:
    """Greedy outputs of the good requests, each sent alone before any hostile one."""
    return {name: tokens(send(server, tiny_model, body(xargs)))
            for name, xargs in GOOD.items()}


GOOD = {"server default": None, "none": {"kv_policy": "none"},
        "snapkv": {"kv_policy": "snapkv", "kv_ratio": 0.3, "kv_window": 16},
        "qfilters file": {"kv_policy": "qfilters", "kv_qfilters_path": "tiny.safetensors",
                          "kv_window": 8},
        "prefill budget": {"kv_policy": "snapkv", "kv_prefill_budget": 96, "kv_window": 16}}


@pytest.mark.parametrize(("xargs", "field"), HOSTILE, ids=[f"{i}-{f[:20]}" for i, (_, f)
                                                           in enumerate(HOSTILE)])
def test_hostile_xargs_get_a_400_within_a_second(server: LocalServer, tiny_model: Path,
                                                 xargs: dict, field: str) -> None:
    start = time.perf_counter()
    resp = send(server, tiny_model, body(xargs))
    elapsed = time.perf_counter() - start
    assert resp.status_code == 400, resp.text[:500]
    error = resp.json()["error"]
    assert error["param"] == f"vllm_xargs.{field}", error
    assert elapsed < 1.0, elapsed
    assert len(resp.text) < 4000  # a 100 kB value is not echoed back


def test_every_unusable_file_gets_the_same_answer(server: LocalServer, tiny_model: Path) -> None:
    """No existence oracle: a missing file, a link out, a folder, /proc and /etc/passwd read
    the same."""
    messages = {send(server, tiny_model, body(x)).json()["error"]["message"]
                for x in FILE_CASES}
    assert len(messages) == 1, messages


@pytest.mark.parametrize("raw", [
    '{"model": "M", "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"kv_ratio": NaN}}',
    '{"model": "M", "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"kv_ratio": Infinity}}',
    '{"model": "M", "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"kv_window": {"a": 1}}}',
    '{"model": "M", "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"kv_window": 1e999}}',
    '{"model": "M", "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"kv_window": '
    + "9" * 5000 + "}}",
    '{"model": "M", "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"kv_policy": null}}',
])
def test_raw_json_oddities_are_client_errors(server: LocalServer, tiny_model: Path,
                                             raw: str) -> None:
    """NaN, infinities, nested objects, a 5000-digit integer, a null: a 4xx from vLLM's
    request model or ours (or, for the null, 'unset'), never a 5xx."""
    resp = send(server, tiny_model, raw.replace('"M"', json.dumps(str(tiny_model))))
    assert resp.status_code < 500, resp.text[:500]
    if "null" not in raw:
        assert resp.status_code >= 400, resp.text[:500]


def test_server_stays_up_and_good_requests_keep_their_output(
        server: LocalServer, tiny_model: Path, baseline: dict[str, Any]) -> None:
    for xargs, _ in HOSTILE[:5]:
        assert send(server, tiny_model, body(xargs)).status_code == 400
    assert requests.get(f"{server.base_url}/health", timeout=10).status_code == 200
    for name, xargs in GOOD.items():
        assert tokens(send(server, tiny_model, body(xargs))) == baseline[name], name


def test_hostile_and_good_requests_concurrently(server: LocalServer, tiny_model: Path,
                                                baseline: dict[str, Any]) -> None:
    """64 requests at once, a quarter of them good: the hostile ones are 400s, the good ones
    answer exactly as they did alone."""
    jobs: list[tuple[str, dict[str, Any] | None]] = []
    for i in range(48):
        jobs.append(("hostile", HOSTILE[i % len(HOSTILE)][0]))
        if i % 3 == 0:
            name = list(GOOD)[(i // 3) % len(GOOD)]
            jobs.append((name, GOOD[name]))

    def run(job: tuple[str, dict[str, Any] | None]) -> tuple[str, requests.Response]:
        return job[0], send(server, tiny_model, body(job[1]), timeout=300)

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(run, jobs))
    for name, resp in results:
        if name == "hostile":
            assert resp.status_code == 400, resp.text[:300]
        else:
            assert tokens(resp) == baseline[name], name
    assert requests.get(f"{server.base_url}/health", timeout=10).status_code == 200


def wait_idle(server: LocalServer, timeout: float = 60) -> str:
    """Waits until no request runs or waits; returns the metrics text."""
    deadline = time.time() + timeout
    while True:
        text = server.metrics()
        busy = sum(metric_values(text, "vllm:num_requests_running")) + \
            sum(metric_values(text, "vllm:num_requests_waiting"))
        if busy == 0 or time.time() > deadline:
            return text
        time.sleep(0.5)


def test_many_distinct_windows_do_not_pile_up_ring_memory(server: LocalServer,
                                                          tiny_model: Path) -> None:
    """Forty decode-compressed requests, each with its own window (all legal): the ring's pools
    follow the live requests and are released once they are done."""
    def run(window: int) -> int:
        xargs = {"kv_policy": "snapkv", "kv_window": window, "kv_decode_budget": 600,
                 "kv_decode_interval": 16, "kv_ratio": 1.0}
        return send(server, tiny_model, body(xargs, max_tokens=8), timeout=300).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(run, range(8, 512, 12)))
    assert set(codes) == {200}
    wait_idle(server)
    # One more step lets the workers drop the last pools (they are released between steps).
    tokens(send(server, tiny_model, body({"kv_policy": "none"}, max_tokens=2)))
    text = wait_idle(server)
    assert metric_values(text, "vllm_kvcompress:query_ring_bytes") == [0.0]
    assert metric_values(text, "vllm_kvcompress:query_ring_pool_bytes") == [0.0]


def test_mid_stream_disconnects_leave_no_blocks_behind(server: LocalServer, tiny_model: Path,
                                                       baseline: dict[str, Any]) -> None:
    """Streams that the client drops after a few chunks (compressing, decode-compressed and
    plain): the engine aborts them, frees their blocks and serves the next request exactly."""
    def drop(xargs: dict[str, Any] | None) -> None:
        payload = {**body(xargs, max_tokens=300, stream=True), "model": str(tiny_model)}
        with requests.post(f"{server.base_url}/v1/completions", json=payload, stream=True,
                           timeout=120) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(4):
                next(lines)
        # Leaving the block closes the connection mid-stream.

    cases = [None, {"kv_policy": "snapkv", "kv_decode_budget": 200, "kv_decode_interval": 16},
             {"kv_policy": "none"}, {"kv_policy": "chunkkv", "kv_ratio": 0.2}] * 3
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(drop, cases))
    text = wait_idle(server)
    assert max(metric_values(text, "vllm:kv_cache_usage_perc")) == 0.0
    assert requests.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert tokens(send(server, tiny_model, body(GOOD["snapkv"]))) == baseline["snapkv"]


# --- operator controls as flags, and what is refused at startup -----------------------------

@pytest.fixture(scope="module")
def locked_down(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("locked") / "serve.log"
    args = ["--enforce-eager", "--max-model-len", "1024", "--block-size", "32",
            "--kv-policy", "chunkkv", "--kv-allowed-policies", "snapkv,chunkkv",
            "--kv-max-window", "48", "--kv-min-decode-interval", "64"]
    with LocalServer(str(tiny_model), args, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as srv:
        yield srv


def test_operator_flags_are_enforced(locked_down: LocalServer, tiny_model: Path) -> None:
    def answer(xargs: dict[str, Any]) -> requests.Response:
        return send(locked_down, tiny_model, body(xargs, max_tokens=2))

    assert answer({"kv_policy": "snapkv", "kv_window": 48}).status_code == 200
    for xargs, field, fragment in (
            ({"kv_policy": "tova"}, "kv_policy", "none, snapkv, chunkkv on this server"),
            ({"kv_chunk_scorer": "knorm"}, "kv_chunk_scorer", "none, snapkv, chunkkv"),
            ({"kv_window": 49}, "kv_window", "<= 48"),
            ({"kv_decode_budget": 500, "kv_decode_interval": 63}, "kv_decode_interval", ">= 64"),
            ({"kv_policy": "qfilters", "kv_qfilters_path": "x"}, "kv_policy", "on this server")):
        resp = answer(xargs)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == f"vllm_xargs.{field}" and fragment in error["message"], error
    # No allowed folder: a file is never opened for a client.
    resp = answer({"kv_policy": "snapkv", "kv_qfilters_path": "/etc/passwd"})
    assert resp.status_code == 400
    assert "per-request files are disabled" in resp.json()["error"]["message"]


def test_kv_connector_with_compression_is_refused_at_startup(tiny_model: Path) -> None:
    connector = json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both"})
    out = subprocess.run([VLLM, "serve", str(tiny_model), "--kv-policy", "snapkv",
                          "--kv-transfer-config", connector], capture_output=True, text=True,
                         timeout=120, env={**CPU_SERVER_ENV})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm-kvcompress: compression disabled: KV connectors "
                           "(--kv-transfer-config) are not supported"), last
    assert "Traceback" not in out.stderr
