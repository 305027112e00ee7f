"""The vLLM entry point: idempotent registration, version guard, CLI flags, deployment YAMLs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from vllm_serve_parser import make_serve_parser

from vllm_kvcompress import deployment, plugin, server_config, vllm_patches
from vllm_kvcompress.config import ADDITIONAL_CONFIG_KEY

REPO = Path(__file__).resolve().parents[1]

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def serve_parser() -> argparse.ArgumentParser:
    """The real `vllm serve` argument parser, with the plugin registered."""
    plugin.register()
    return make_serve_parser()


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path) -> str:
    return str(tiny_model)


def engine_spec(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """What `vllm serve ARGV` puts into additional_config['kvcompress'] for every process."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parser.parse_args(argv)
    args.model = args.model_tag  # what `vllm serve` itself does with the positional model
    engine_args = AsyncEngineArgs.from_cli_args(args)
    return engine_args.additional_config[ADDITIONAL_CONFIG_KEY]


def test_register_is_idempotent_and_patches_once() -> None:
    plugin.register()
    from vllm.engine.arg_utils import EngineArgs

    add = EngineArgs.add_cli_args
    plugin.register()
    assert vllm_patches.apply_all() == []  # every manifest entry already applied
    assert EngineArgs.add_cli_args is add
    assert {p.target for p in vllm_patches.MANIFEST} == vllm_patches._applied


def test_manifest_names_target_reason_and_hooks() -> None:
    for patch in vllm_patches.MANIFEST:
        assert patch.target.startswith("vllm.") and patch.why and patch.hooks


@pytest.mark.parametrize("installed", ["0.31.2", "0.34.0", "1.0.0+cpu"])
def test_unsupported_vllm_exits_with_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                                     installed: str) -> None:
    monkeypatch.setattr(vllm_patches, "version", lambda name: installed)
    with pytest.raises(SystemExit) as info:
        vllm_patches.check_vllm_version()
    message = str(info.value.code)
    assert "\n" not in message
    assert f"unsupported vLLM {installed}" in message and ">=0.32,<0.34" in message
    assert "0.33.x" in message and "docs/vllm-versions.md" in message


@pytest.mark.parametrize("installed", ["0.34.0", "0.34.1rc1+cu130", "0.35.0"])
def test_vllm_034_is_refused_naming_the_runner_rewrite(monkeypatch: pytest.MonkeyPatch,
                                                       installed: str) -> None:
    monkeypatch.setattr(vllm_patches, "version", lambda name: installed)
    with pytest.raises(SystemExit) as info:
        vllm_patches.check_vllm_version()
    message = str(info.value.code)
    assert "\n" not in message
    assert "rewrote the model runner" in message and "not ported" in message
    assert "no CPU build of 0.34" in message
    assert "newest supported release is 0.33.x" in message
    assert message.endswith("see docs/vllm-versions.md")


def test_supported_versions_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    for installed in ("0.32.0", "0.32.0+cpu", "0.32.7", "0.33.0", "0.33.1+cu129", "0.33.0rc2"):
        monkeypatch.setattr(vllm_patches, "version", lambda name, v=installed: v)
        assert vllm_patches.check_vllm_version() == installed


def test_flags_reach_additional_config(serve_parser: argparse.ArgumentParser,
                                      model_dir: str) -> None:
    spec = engine_spec(serve_parser, [model_dir, "--kv-policy", "chunkkv", "--kv-ratio", "0.1",
                                      "--kv-chunk-size", "20"])
    assert spec["policy"] == "chunkkv" and spec["ratio"] == 0.1 and spec["chunk_size"] == 20


def test_kernels_flag_reaches_additional_config(serve_parser: argparse.ArgumentParser,
                                               model_dir: str) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = serve_parser.parse_args([model_dir, "--kv-kernels", "torch"])
    args.model = args.model_tag
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config[server_config.KERNELS_KEY] == "torch"


def test_no_flags_means_policy_none(serve_parser: argparse.ArgumentParser,
                                    model_dir: str) -> None:
    assert engine_spec(serve_parser, [model_dir])["policy"] == "none"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_each_deployment_yaml_is_valid_for_vllm_serve_config(
        serve_parser: argparse.ArgumentParser, model_dir: str, path: Path) -> None:
    spec = engine_spec(serve_parser, [model_dir, "--config", str(path)])
    assert spec["policy"] == {"public-endpoint": "chunkkv",
                              "keydiff-reuse": "keydiff"}.get(path.stem, path.stem)
    if path.stem == "keydiff-reuse":
        assert (spec["reuse_prefix"], spec["ratio"]) == ("on", 0.25)


def test_operator_controls_reach_every_process(serve_parser: argparse.ArgumentParser,
                                               model_dir: str) -> None:
    """Operator flags (and their YAML keys) travel in additional_config['kvcompress'] beside
    the server default, where each front end builds its request rules from them."""
    block = engine_spec(serve_parser, [model_dir, "--config",
                                       str(REPO / "configs" / "public-endpoint.yaml")])
    assert tuple(block["allowed_policies"]) == ("chunkkv", "snapkv", "streamingllm")
    assert (block["max_window"], block["min_decode_interval"]) == (64, 64)
    block = engine_spec(serve_parser, [model_dir, "--kv-request-overrides", "off"])
    assert block["request_overrides"] == "off"
    from types import SimpleNamespace

    from vllm_kvcompress.admission import RequestRules

    settings = server_config.server_settings(SimpleNamespace(additional_config={
        ADDITIONAL_CONFIG_KEY: block}))
    rules = RequestRules.from_operator(settings.controls, {}, None)
    assert rules.overrides is False and settings.spec.policy == "none"


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--kv-allowed-policies", "snapkv,h2o"], "--kv-allowed-policies: must be a list"),
    (["--kv-max-window", "0"], "--kv-max-window: must be an integer >= 1"),
    (["--kv-allowed-file-dir", "/nonexistent-kv-dir"], "is not a directory"),
    (["--kv-policy", "snapkv", "--kv-window", "5000"], "--kv-window: must be an integer >= 1 "
                                                       "and <= 2048"),
])
def test_bad_operator_settings_stop_in_one_line(serve_parser: argparse.ArgumentParser,
                                                model_dir: str, argv: list[str],
                                                fragment: str) -> None:
    """The served model's limits bound the operator's own settings (its max_model_len here is
    2048), and operator controls are validated like every setting."""
    with pytest.raises(SystemExit) as info:
        engine_spec(serve_parser, [model_dir, "--max-model-len", "2048", *argv])
    message = str(info.value)
    assert message.startswith("vllm-kvcompress: invalid configuration: ") and "\n" not in message
    assert fragment in message, message


def test_precedence_yaml_file_then_flags(serve_parser: argparse.ArgumentParser,
                                         model_dir: str,
                                         tmp_path: Path) -> None:
    """--kv-compress-config < --kv-* flags; a flag's budget replaces the file's ratio."""
    path = tmp_path / "kv.yaml"
    path.write_text("policy: snapkv\nratio: 0.5\nwindow: 8\n")
    spec = engine_spec(serve_parser,
                       [model_dir, "--kv-compress-config", str(path), "--kv-budget", "64"])
    assert spec == {**spec, "policy": "snapkv", "budget": 64, "window": 8}
    assert "ratio" not in spec


def test_kvcompress_block_in_serve_config(serve_parser: argparse.ArgumentParser,
                                          model_dir: str,
                                          tmp_path: Path) -> None:
    """A nested `kvcompress:` block in `vllm serve --config` works; --kv-* flags win over it."""
    path = tmp_path / "deploy.yaml"
    path.write_text("kvcompress:\n  policy: streamingllm\n  sink_tokens: 8\n  ratio: 0.2\n")
    spec = engine_spec(serve_parser, [model_dir, "--config", str(path), "--kv-ratio", "0.3"])
    assert (spec["policy"], spec["sink_tokens"], spec["ratio"]) == ("streamingllm", 8, 0.3)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--kv-ratio", "2"], "--kv-ratio: must be a number with 0 < ratio <= 1"),
    (["--kv-budget", "-3"], "--kv-budget: must be an integer >= 0"),
    (["--kv-ratio", "0.2", "--kv-budget", "3"], "--kv-ratio and --kv-budget: give one"),
    (["--kvcompress", '{"ratio": 0.2, "budget": 3}'], "kvcompress:ratio and kvcompress:budget"),
    (["--kvcompress", '{"polcy": "x"}'], "kvcompress:polcy: unknown key"),
    (["--kvcompress", "[1]"], "--kvcompress: must be a JSON object"),
    (["--kv-compress-config", "/nonexistent/kv.yaml"], "--kv-compress-config: cannot read"),
])
def test_bad_server_config_is_one_line(serve_parser: argparse.ArgumentParser,
                                       model_dir: str,
                                       argv: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as info:
        engine_spec(serve_parser, [model_dir, *argv])
    message = str(info.value.code)
    assert message.startswith("vllm-kvcompress: invalid configuration: ")
    assert expected in message and "\n" not in message


def test_unknown_policy_rejected_by_argparse(serve_parser: argparse.ArgumentParser,
                                             model_dir: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve_parser.parse_args([model_dir, "--kv-policy", "h2o"])
    assert "invalid choice: 'h2o'" in capsys.readouterr().err


def test_additional_config_json_flag_is_validated(serve_parser: argparse.ArgumentParser,
                                                  model_dir: str) -> None:
    block = json.dumps({ADDITIONAL_CONFIG_KEY: {"policy": "snapkv", "ratio": 0.4}})
    spec = engine_spec(serve_parser, [model_dir, "--additional-config", block, "--kv-window", "16"])
    assert (spec["policy"], spec["ratio"], spec["window"]) == ("snapkv", 0.4, 16)


def fake_config(**overrides: object) -> object:
    from types import SimpleNamespace

    model = SimpleNamespace(get_sliding_window=lambda: overrides.get("sliding"),
                            is_hybrid=overrides.get("hybrid", False), is_attention_free=False,
                            is_multimodal_model=overrides.get("multimodal", False))
    return SimpleNamespace(model_config=model,
                           cache_config=SimpleNamespace(cache_dtype=overrides.get("dtype", "auto")),
                           speculative_config=overrides.get("spec"),
                           kv_transfer_config=overrides.get("connector"))


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({}, None),
    ({"sliding": 4096}, "sliding-window"),
    ({"hybrid": True}, "hybrid"),
    ({"multimodal": True}, "multimodal"),
    ({"spec": object()}, "speculative decoding"),
    ({"dtype": "fp8_e4m3"}, "quantized KV cache"),
    ({"connector": object()}, "KV connectors (kv_transfer_config)"),
])
def test_unsupported_deployments_are_named(overrides: dict, fragment: str | None) -> None:
    plugin.register()
    reason = deployment.deployment_unsupported_reason(fake_config(**overrides))
    assert reason is None if fragment is None else fragment in reason


def test_policy_request_on_unsupported_deployment_is_a_400() -> None:
    """Checked when the request's SamplingParams is built (a 400 before a stream starts)."""
    from vllm.exceptions import VLLMValidationError

    from vllm_kvcompress.config import CompressionSpec
    from vllm_kvcompress.policies import ModelShape

    shape = ModelShape("m", 4, 2, 4, 64)
    refusing = server_config.Frontend(CompressionSpec(), shape, "pipeline parallelism (...)")
    with pytest.raises(VLLMValidationError, match=r"^kv_policy: compression is not available "
                                                  r"on this deployment: pipeline") as info:
        server_config.admit_request({"kv_policy": "snapkv"}, refusing)
    assert info.value.parameter == "vllm_xargs.kv_policy"
    server_config.admit_request({"kv_policy": "none"}, refusing)  # fine
    server_config.admit_request({"kv_policy": "snapkv"},
                                server_config.Frontend(CompressionSpec(), shape, None))


@pytest.mark.parametrize(("sizes", "fragment"), [
    ({}, None),
    ({"pipeline": 2}, "pipeline parallelism"),
    ({"data": 2}, "data parallelism"),
    ({"decode_context": 2}, "context parallelism"),
    ({"prefill_context": 2}, "context parallelism"),
])
def test_parallel_layouts_that_cannot_be_verified_are_refused(sizes: dict,
                                                              fragment: str | None) -> None:
    reason = deployment.parallel_unsupported_reason(**sizes)
    assert reason is None if fragment is None else fragment in reason
    from types import SimpleNamespace

    config = fake_config()
    config.parallel_config = SimpleNamespace(
        pipeline_parallel_size=sizes.get("pipeline", 1), data_parallel_size=sizes.get("data", 1),
        decode_context_parallel_size=sizes.get("decode_context", 1),
        prefill_context_parallel_size=sizes.get("prefill_context", 1))
    full = deployment.deployment_unsupported_reason(config)
    assert full is None if fragment is None else fragment in full


@pytest.mark.parametrize("flag", [["--pipeline-parallel-size", "2"],
                                  ["--data-parallel-size", "2"],
                                  ["--decode-context-parallel-size", "2"]])
def test_server_default_policy_on_unverifiable_layout_stops_in_one_line(
        serve_parser: argparse.ArgumentParser, model_dir: str, flag: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        engine_spec(serve_parser, [model_dir, "--kv-policy", "snapkv", *flag])
    message = str(info.value)
    assert message.startswith("vllm-kvcompress: compression disabled: ") and "\n" not in message
    assert "parallel" in message and "'snapkv'" in message
    assert engine_spec(serve_parser, [model_dir, *flag])["policy"] == "none"  # no policy: fine


def test_engine_core_decoding_never_validates_client_values() -> None:
    """msgspec re-runs SamplingParams.__post_init__ (and so _verify_extra_args) when the engine
    core's input thread decodes a request; an exception there would kill that thread. In a
    process without a front end the plugin's check does nothing, and the engine reads only the
    admitted spec: a decoded request carrying values no front end would admit is inert."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_kvcompress.admission import ADMITTED_KEY, admitted_spec
    from vllm_kvcompress.config import CompressionSpec
    from vllm_kvcompress.policies import ModelShape

    plugin.register()
    front = server_config.Frontend(CompressionSpec(), ModelShape("m", 4, 2, 4, 64), None)
    saved = server_config._FRONTEND
    try:
        server_config._FRONTEND = front  # a front end: hostile values are a 400
        with pytest.raises(VLLMValidationError, match=r"^kv_window: must be an integer"):
            SamplingParams(max_tokens=2, extra_args={"kv_window": 10**9})
        params = SamplingParams(max_tokens=2, extra_args={"kv_policy": "snapkv"})
        assert params.extra_args[ADMITTED_KEY].values["policy"] == "snapkv"
        wire = MsgpackEncoder().encode(params)
        server_config._FRONTEND = None  # the engine core's process
        decoded = MsgpackDecoder(SamplingParams).decode(wire)
        assert admitted_spec(decoded.extra_args, CompressionSpec()).policy == "snapkv"
        # Whatever reaches the engine core unadmitted is not parsed (and does not raise).
        forged = SamplingParams(max_tokens=2, extra_args={"kv_window": 10**9})
        hostile = MsgpackDecoder(SamplingParams).decode(MsgpackEncoder().encode(forged))
        assert admitted_spec(hostile.extra_args, CompressionSpec()) == CompressionSpec()
    finally:
        server_config._FRONTEND = saved
