"""The settings model: precedence, validation messages, and the deterministic kept count."""

from __future__ import annotations

import pytest

from vllm_kvcompress.config import (
    CompressionConfigError,
    CompressionSpec,
    cli_names,
    request_names,
    resolve,
    resolve_request,
)


def test_defaults_mean_no_compression() -> None:
    spec = CompressionSpec()
    assert spec.policy == "none" and not spec.enabled
    assert spec.kept_tokens(100_000) is None


def test_precedence_defaults_yaml_cli_request() -> None:
    """Each layer overrides the one below; a layer's ratio or budget replaces both below it."""
    yaml_layer = {"policy": "snapkv", "ratio": 0.5, "window": 16}
    cli_layer = {"policy": "chunkkv", "chunk_size": 20}
    server = resolve((yaml_layer, {}), (cli_layer, cli_names()))
    assert (server.policy, server.ratio, server.window, server.chunk_size) == (
        "chunkkv", 0.5, 16, 20)
    request = resolve_request(server, {"kv_budget": 300, "unrelated": "kept for others"})
    assert request.budget == 300 and request.ratio is None  # budget replaced the server's ratio
    assert request.policy == "chunkkv" and request.chunk_size == 20
    assert resolve_request(server, {"kv_policy": "none"}).enabled is False
    assert resolve_request(server, None) is server


@pytest.mark.parametrize(("values", "field", "fragment"), [
    ({"kv_policy": "h2o"}, "kv_policy", "none, chunkkv, expected_attention, keydiff, knorm, "
     "kvzip, pyramidkv, qfilters, sagekv, snapkv, streamingllm, tova"),
    ({"kv_ratio": 0}, "kv_ratio", "0 < ratio <= 1"),
    ({"kv_ratio": 1.5}, "kv_ratio", "0 < ratio <= 1"),
    ({"kv_ratio": -0.1}, "kv_ratio", "0 < ratio <= 1"),
    ({"kv_ratio": "0.5"}, "kv_ratio", "got '0.5'"),
    ({"kv_ratio": True}, "kv_ratio", "got True"),
    ({"kv_ratio": 0.2, "kv_budget": 10}, "kv_ratio and kv_budget", "not both"),
    ({"kv_budget": -1}, "kv_budget", "integer >= 0"),
    ({"kv_budget": 2.5}, "kv_budget", "integer >= 0"),
    ({"kv_budget": "10"}, "kv_budget", "integer >= 0"),
    ({"kv_budget": [1, 2]}, "kv_budget", "integer >= 0"),
    ({"kv_window": 0}, "kv_window", "integer >= 1"),
    ({"kv_pool_kernel": 4}, "kv_pool_kernel", "odd"),
    ({"kv_chunk_size": 0}, "kv_chunk_size", "integer >= 1"),
    ({"kv_kvzip_chunk_size": 0}, "kv_kvzip_chunk_size", "integer >= 1"),
    ({"kv_sink_tokens": -2}, "kv_sink_tokens", "integer >= 0"),
    ({"kv_rato": 0.5}, "kv_rato", "allowed keys: kv_policy, kv_ratio"),
])
def test_bad_request_values_name_the_field(values: dict, field: str, fragment: str) -> None:
    with pytest.raises(CompressionConfigError) as info:
        resolve_request(CompressionSpec(policy="chunkkv"), values)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in str(info.value)


def test_cli_layer_errors_use_flag_names() -> None:
    with pytest.raises(CompressionConfigError, match=r"^--kv-ratio: must be"):
        resolve(({"ratio": 3.0}, cli_names()))


def test_ratio_and_budget_in_one_layer_rejected_but_across_layers_allowed() -> None:
    with pytest.raises(CompressionConfigError, match="not both"):
        resolve(({"ratio": 0.5, "budget": 10}, request_names()))
    spec = resolve(({"ratio": 0.5}, {}), ({"budget": 10}, {}))
    assert spec.budget == 10 and spec.ratio is None


@pytest.mark.parametrize(("spec", "prompt_len", "expected"), [
    (CompressionSpec(policy="snapkv", ratio=0.25), 1000, 250),
    (CompressionSpec(policy="snapkv", ratio=0.1), 30, None),        # sinks + window >= prompt
    (CompressionSpec(policy="snapkv", ratio=0.1), 1000, 100),
    (CompressionSpec(policy="snapkv", ratio=0.3), 1001, 301),        # ceil(300.3)
    (CompressionSpec(policy="snapkv", ratio=0.1), 370, 37),          # no float round-up to 38
    (CompressionSpec(policy="snapkv", budget=0), 1000, 36),          # keeps sinks + window
    (CompressionSpec(policy="snapkv", budget=1), 1000, 36),
    (CompressionSpec(policy="snapkv", budget=999), 1000, 999),
    (CompressionSpec(policy="snapkv", budget=1000), 1000, None),     # budget >= prompt: no-op
    (CompressionSpec(policy="snapkv", ratio=1.0), 1000, None),
    (CompressionSpec(policy="chunkkv"), 1000, 250),                  # default ratio 0.25
    (CompressionSpec(policy="chunkkv", min_prompt_len=2000), 1000, None),
    (CompressionSpec(policy="streamingllm", ratio=0.5, window=1, sink_tokens=0), 10, 5),
])
def test_kept_tokens(spec: CompressionSpec, prompt_len: int, expected: int | None) -> None:
    assert spec.kept_tokens(prompt_len) == expected


def test_spec_is_frozen_and_rejects_unknown_fields() -> None:
    spec = CompressionSpec(policy="snapkv")
    with pytest.raises(AttributeError, match="immutable"):
        spec.policy = "none"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="no compression setting"):
        _ = spec.polcy
    with pytest.raises(CompressionConfigError, match="unknown key"):
        resolve(({"polcy": "snapkv"}, {}))


def test_spec_is_hashable_comparable_and_round_trips() -> None:
    """Equal settings give equal, equally hashed specs (the policy cache relies on it); what a
    layer passes on (explicit settings) rebuilds the same spec in another process."""
    import pickle

    a = CompressionSpec(policy="chunkkv", ratio=0.3, chunk_size=20)
    b = CompressionSpec(policy="chunkkv", ratio=0.3)  # chunk_size 20 is the default
    assert a == b and hash(a) == hash(b)
    assert a != a.replace(head_select="per_head")
    assert CompressionSpec.from_dict(a.explicit()) == a
    assert pickle.loads(pickle.dumps(a)) == a
    assert a.as_dict()["chunk_grid"] == "after_sinks"
    assert "budget" not in a.as_dict(exclude_none=True)
    with pytest.raises(CompressionConfigError, match="kv_head_select: must be one of shared, "
                                                     "per_head"):
        resolve_request(a, {"kv_head_select": "all"})


def test_decode_budget_settings_and_room_check() -> None:
    from vllm_kvcompress.config import CompressionConfigError, resolve_request

    server = CompressionSpec(policy="snapkv", window=16)
    spec = resolve_request(server, {"kv_decode_budget": 100, "kv_decode_interval": 24})
    assert (spec.decode_budget, spec.decode_interval) == (100, 24)
    # decode_budget alone does not also cut the prompt by the default ratio.
    assert spec.kept_tokens(1000) is None
    assert spec.compaction_target(123) is None and spec.compaction_target(124) == 100
    # End of a prefill: the prompt policy's count stands unless it reaches the limit.
    ratio = spec.replace(ratio=0.5)
    assert ratio.compaction_target(200, ratio.kept_tokens(200)) == 100
    assert ratio.compaction_target(240, ratio.kept_tokens(240)) == 120
    assert ratio.compaction_target(200, 110) == 110
    assert CompressionSpec(policy="none", decode_budget=500).compaction_target(10_000) is None
    # Room for sinks + window + interval, named as the user wrote it, with the numbers.
    with pytest.raises(CompressionConfigError) as err:
        resolve_request(server, {"kv_decode_budget": 40})
    assert err.value.field == "kv_decode_budget" and "4 + 16 + 128 = 148" in str(err.value)
    with pytest.raises(CompressionConfigError, match="decode_budget"):
        CompressionSpec(policy="snapkv", decode_budget=10)
    for bad in (0, -3, 2.5, "x"):
        with pytest.raises(CompressionConfigError, match="kv_decode_budget"):
            resolve_request(server, {"kv_decode_budget": bad})
    with pytest.raises(CompressionConfigError, match="kv_decode_interval"):
        resolve_request(server, {"kv_decode_budget": 500, "kv_decode_interval": 0})
