"""A real `vllm serve` with the plugin: flags in --help, HTTP 400 for bad kv_* input, and a bad
server config failing at startup with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from vllm_kvcompress.local_server import CPU_SERVER_ENV, LocalServer, metric_values

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
VLLM = str(Path(sys.executable).with_name("vllm"))


def post(server: LocalServer, endpoint: str, tiny_model: Path, xargs: object,
         stream: bool = False) -> requests.Response:
    body: dict[str, object] = {"model": str(tiny_model), "max_tokens": 4, "temperature": 0.0,
                               "stream": stream}
    if endpoint == "completions":
        body["prompt"] = "the secret number is 42 remember it"
    else:
        body["messages"] = [{"role": "user", "content": "what is the secret number"}]
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return requests.post(f"{server.base_url}/v1/{endpoint}", json=body, timeout=60)


BAD_XARGS = [
    ({"kv_policy": "h2o"}, "kv_policy"),
    ({"kv_ratio": 1.5}, "kv_ratio"),
    ({"kv_ratio": 0}, "kv_ratio"),
    ({"kv_ratio": "0.5"}, "kv_ratio"),
    ({"kv_ratio": 0.2, "kv_budget": 10}, "kv_ratio and kv_budget"),
    ({"kv_budget": -4}, "kv_budget"),
    ({"kv_budget": 2.5}, "kv_budget"),
    ({"kv_chunk_size": 0}, "kv_chunk_size"),
    ({"kv_head_select": "all_heads"}, "kv_head_select"),
    ({"kv_chunk_grid": "sentences"}, "kv_chunk_grid"),
    ({"kv_beta": 0.5}, "kv_beta"),
    ({"kv_unknown": 1}, "kv_unknown"),
    ({"kv_merge": "yes"}, "kv_merge"),
    ({"kv_policy": "sagekv", "kv_sage_queries": 0}, "kv_sage_queries"),
    ({"kv_policy": "expected_attention", "kv_future_positions": 0}, "kv_future_positions"),
    ({"kv_decode_budget": 0}, "kv_decode_budget"),
    ({"kv_decode_interval": -1}, "kv_decode_interval"),
    # No room for the sinks (4), the server's window (32) and the interval (128).
    ({"kv_decode_budget": 150}, "kv_decode_budget"),
    ({"kv_policy": "qfilters"}, "kv_qfilters_path"),  # the policy needs its file
    ({"kv_policy": "qfilters", "kv_qfilters_path": "/nonexistent.safetensors"},
     "kv_qfilters_path"),
]


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("xargs", "field"), BAD_XARGS, ids=[f for _, f in BAD_XARGS])
def test_bad_xargs_get_400_naming_the_field(server: LocalServer, tiny_model: Path, endpoint: str,
                                           stream: bool, xargs: dict, field: str) -> None:
    resp = post(server, endpoint, tiny_model, xargs, stream=stream)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["message"].startswith(f"{field}: ")
    assert error["param"] == f"vllm_xargs.{field}"


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_server_keeps_serving_after_bad_input(server: LocalServer, tiny_model: Path,
                                              endpoint: str) -> None:
    assert post(server, endpoint, tiny_model, {"kv_ratio": 7}).status_code == 400
    for xargs in (None, {"kv_policy": "snapkv", "kv_ratio": 0.5}, {"kv_policy": "none"},
                  {"kv_budget": 40, "kv_chunk_size": 5}, {"other_plugin_key": "ignored"},
                  {"kv_policy": "chunkkv", "kv_head_select": "per_head",
                   "kv_chunk_grid": "from_zero"}):
        resp = post(server, endpoint, tiny_model, xargs)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("xargs", [
    {"kv_policy": "tova", "kv_ratio": 0.5}, {"kv_policy": "sagekv", "kv_sage_queries": 4},
    {"kv_policy": "knorm"}, {"kv_policy": "keydiff", "kv_head_select": "shared"},
    {"kv_policy": "expected_attention", "kv_future_positions": 64},
    {"kv_policy": "snapkv", "kv_merge": "on"}], ids=lambda x: x["kv_policy"])
def test_every_method_serves_through_vllm_xargs(server: LocalServer, tiny_model: Path,
                                                xargs: dict) -> None:
    resp = post(server, "completions", tiny_model, {**xargs, "kv_window": 4, "kv_sink_tokens": 1})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4


def test_qfilters_file_checked_per_request(server: LocalServer, tiny_model: Path,
                                           allowed_dir: Path) -> None:
    """The tiny model's own filters (named relative to the operator's folder, or by their full
    path inside it) serve; filters of another shape are a 400 naming the key and the shapes,
    before anything runs."""
    for name in ("tiny.safetensors", str(allowed_dir / "tiny.safetensors")):
        good = {"kv_policy": "qfilters", "kv_qfilters_path": name, "kv_window": 4,
                "kv_sink_tokens": 1}
        resp = post(server, "completions", tiny_model, good)
        assert resp.status_code == 200, resp.text
    resp = post(server, "completions", tiny_model,
                {**good, "kv_qfilters_path": "other-model.safetensors"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "vllm_xargs.kv_qfilters_path"
    assert "(30, 3, 64)" in error["message"] and "(4, 2, 64)" in error["message"]


def test_streaming_good_request_succeeds(server: LocalServer, tiny_model: Path) -> None:
    resp = post(server, "chat/completions", tiny_model, {"kv_policy": "streamingllm"}, stream=True)
    assert resp.status_code == 200
    events = [line for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_help_lists_the_flags() -> None:
    out = subprocess.run([VLLM, "serve", "--help=all"], capture_output=True, text=True,
                         timeout=120, env={**CPU_SERVER_ENV, "PATH": str(Path(VLLM).parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--kv-policy", "--kv-ratio", "--kv-budget", "--kv-compress-config",
                 "--kv-chunk-size", "--kv-window"):
        assert flag in out.stdout
    assert ("{none,chunkkv,expected_attention,keydiff,knorm,kvzip,pyramidkv,qfilters,sagekv,"
            "snapkv,streamingllm,tova}") in out.stdout
    for flag in ("--kv-merge", "--kv-sage-queries", "--kv-future-positions",
                 "--kv-qfilters-path", "--kv-allowed-policies", "--kv-request-overrides",
                 "--kv-allowed-file-dir", "--kv-max-window", "--kv-min-decode-interval"):
        assert flag in out.stdout


def test_bad_server_config_fails_at_startup_with_one_line(tiny_model: Path,
                                                          tmp_path: Path) -> None:
    deploy = tmp_path / "bad.yaml"
    deploy.write_text("kv-policy: snapkv\nkv-ratio: 1.7\n")
    out = subprocess.run([VLLM, "serve", str(tiny_model), "--config", str(deploy)],
                         capture_output=True, text=True, timeout=120, env={**CPU_SERVER_ENV})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm-kvcompress: invalid configuration: --kv-ratio: must be a number")
    assert "Traceback" not in out.stderr


def test_qfilters_without_its_file_fails_at_startup_with_one_line(tiny_model: Path) -> None:
    out = subprocess.run([VLLM, "serve", str(tiny_model), "--kv-policy", "qfilters"],
                         capture_output=True, text=True, timeout=120, env={**CPU_SERVER_ENV})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm-kvcompress: invalid configuration: --kv-qfilters-path: ")
    assert "Traceback" not in out.stderr


def usage_while_decoding(server: LocalServer, tiny_model: Path, xargs: dict) -> float:
    """vLLM's KV usage gauge sampled while a long prompt is decoding (streamed)."""
    words = ("the secret number is 42 and the city is paris remember it well " * 70).split()
    body = {"model": str(tiny_model), "prompt": " ".join(words[:700]), "max_tokens": 400,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "vllm_xargs": xargs}
    with requests.post(f"{server.base_url}/v1/completions", json=body, stream=True,
                       timeout=120) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(20):  # well past prefill
            next(lines)
        usage = max(metric_values(server.metrics(), "vllm:kv_cache_usage_perc"))
        for _ in lines:
            pass
    return usage


def test_metrics_show_blocks_freed_and_kv_usage_drop(server: LocalServer,
                                                     tiny_model: Path) -> None:
    full = usage_while_decoding(server, tiny_model, {"kv_policy": "none"})
    compressed = usage_while_decoding(server, tiny_model, {"kv_policy": "chunkkv",
                                                           "kv_ratio": 0.25})
    assert 0 < compressed < 0.5 * full
    text = server.metrics()
    assert metric_values(text, "vllm_kvcompress:requests_compressed_total")[0] >= 1
    assert metric_values(text, "vllm_kvcompress:blocks_freed_total")[0] > 0
    assert metric_values(text, "vllm_kvcompress:tokens_evicted_total")[0] > 0
    assert metric_values(text, "vllm_kvcompress:kept_ratio_count")[0] >= 1


def test_decode_budget_keeps_vllms_own_usage_gauge_flat(server: LocalServer,
                                                        tiny_model: Path) -> None:
    """A 300-token generation after a ~700-token prompt with decode_budget 128 + interval 32:
    vLLM's own KV usage gauge, sampled while it decodes, never shows more than the request's
    bound (cdiv(160, 32) + 1 = 6 blocks of the pool), and the decode counters move."""
    import re

    words = ("the secret number is 42 and the city is paris remember it well " * 70).split()
    body = {"model": str(tiny_model), "prompt": " ".join(words[:700]), "max_tokens": 300,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "vllm_xargs": {"kv_ratio": 1.0, "kv_decode_budget": 128, "kv_decode_interval": 32}}
    before = server.metrics()
    blocks = int(re.search(r'num_gpu_blocks="(\d+)"', before).group(1))
    compactions_before = metric_values(before, "vllm_kvcompress:decode_compactions_total")[0]
    samples = []
    with requests.post(f"{server.base_url}/v1/completions", json=body, stream=True,
                       timeout=300) as resp:
        assert resp.status_code == 200
        ring = []
        for number, _ in enumerate(resp.iter_lines()):
            if number % 25 == 10:
                text = server.metrics()
                samples.append(max(metric_values(text, "vllm:kv_cache_usage_perc")))
                ring.append(metric_values(text, "vllm_kvcompress:query_ring_bytes")[0])
    # vLLM's usage is used / (blocks - 1): the null block is never handed out.
    print(f"usage samples while decoding: {samples} (bound {6 / (blocks - 1):.6f})")
    assert len(samples) >= 8 and max(samples) <= 6 / (blocks - 1) + 1e-9
    # The server's chunkkv reads queries: 32 per layer kept while it decodes, then released.
    # Only the first half of the samples: under load vLLM sends several tokens per event, and a
    # sample taken on the stream's last events can follow the request's end on the server.
    assert min(ring[: len(ring) // 2]) > 0
    after = server.metrics()
    assert metric_values(after, "vllm_kvcompress:query_ring_bytes") == [0.0]
    assert metric_values(after, "vllm_kvcompress:decode_compactions_total")[0] >= \
        compactions_before + 5
    assert metric_values(after, "vllm_kvcompress:decode_tokens_evicted_total")[0] > 0
    assert metric_values(after, "vllm_kvcompress:decode_blocks_freed_total")[0] > 0


KV_KEYS = ["kv_policy", "kv_ratio", "kv_budget", "kv_window", "kv_pool_kernel", "kv_chunk_size",
           "kv_reuse_layers", "kv_sink_tokens", "kv_min_prompt_len", "kv_head_select",
           "kv_chunk_grid", "kv_beta", "kv_merge", "kv_sage_queries", "kv_future_positions",
           "kv_qfilters_path", "kv_decode_budget", "kv_decode_interval", "kv_bogus", "kv_",
           "not_ours"]


def xargs_strategy() -> Any:
    from hypothesis import strategies as st

    scalar = st.one_of(
        st.sampled_from(["none", "snapkv", "chunkkv", "streamingllm", "pyramidkv", "h2o", "",
                         "0.5", "SNAPKV", "shared", "per_head", "from_zero", "tova", "sagekv",
                         "knorm", "keydiff", "expected_attention", "qfilters", "on", "off"]),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),  # JSON has no NaN/Inf
        st.booleans())
    value = st.one_of(scalar, st.lists(scalar, max_size=3))
    return st.dictionaries(st.sampled_from(KV_KEYS), value, max_size=4)


def test_fuzzed_xargs_never_5xx(server: LocalServer, tiny_model: Path) -> None:
    """Random kv_* keys and values on completions and chat, streaming or not: every answer is a
    200 with tokens or a 400 whose message names a vllm_xargs field; never a 5xx, and the server
    still answers a plain request afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    seen = {200: 0, 400: 0}

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(xargs=xargs_strategy(), endpoint=st.sampled_from(["completions", "chat/completions"]),
           stream=st.booleans())
    def check(xargs: dict, endpoint: str, stream: bool) -> None:
        resp = post(server, endpoint, tiny_model, xargs, stream=stream)
        assert resp.status_code in (200, 400), (xargs, resp.status_code, resp.text[:500])
        seen[resp.status_code] += 1
        if resp.status_code == 400:
            error = resp.json()["error"]
            assert str(error.get("param", "")).startswith("vllm_xargs"), error
        elif stream:
            assert resp.text.rstrip().endswith("data: [DONE]") and '"error"' not in resp.text
        else:
            assert resp.json()["usage"]["completion_tokens"] >= 1

    check()
    assert seen[200] > 0 and seen[400] > 0  # both paths exercised
    assert post(server, "completions", tiny_model, None).status_code == 200
