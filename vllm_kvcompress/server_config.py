"""Server configuration: the ``--kv-*`` flags, YAML files, the resolved server default, and the
checks a request's ``kv_*`` keys get before a response starts.

Everything here is plain logic over vLLM's objects; the wrappers that call it are in
``vllm_patches`` (vLLM is imported lazily).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import (
    ADDITIONAL_CONFIG_KEY,
    CompressionConfigError,
    CompressionSpec,
    check_model_data,
    cli_names,
    request_names,
    resolve,
    resolve_request,
    validate_request,
    yaml_names,
)
from .deployment import (
    deployment_unsupported_reason,
    engine_compression_supported,
    model_shape,
    parallel_unsupported_reason,
)
from .policies.model_data import ModelShape
from .policies.registry import all_params, model_data_hook

logger = logging.getLogger("vllm.kvcompress")

#: Key of the plugin's runtime settings in ``additional_config`` (not user-facing).
RUNTIME_KEY = "kvcompress_runtime"
#: ``additional_config`` key choosing the kernels (``--kv-kernels``); wins over the env var.
KERNELS_KEY = "kvcompress_kernels"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Adds a ``--kv-*`` flag per declared parameter (all default to None so 'not given' is
    visible), plus the file/JSON/kernel options."""
    if any(a.dest == "kv_policy" for a in parser._actions):
        return
    group = parser.add_argument_group(
        "vllm-kvcompress",
        "KV-cache compression after prefill. Precedence: defaults < --kv-compress-config / "
        "the kvcompress: block of --config < --kv-* flags < per-request vllm_xargs kv_* keys.")
    for param in all_params().values():
        default = "" if param.default is None else f" (default: {param.default})"
        kwargs: dict[str, Any] = {"default": None, "help": param.help + default,
                                  "type": param.type if param.type in (int, float) else str,
                                  "dest": "kv_" + param.name}
        choices = param.allowed_choices()
        if choices is not None:
            kwargs["choices"] = choices
        group.add_argument(param.flag, **kwargs)
    group.add_argument("--kv-compress-config", default=None, metavar="FILE",
                       help="YAML file with compression settings (policy, ratio, budget, ...).")
    group.add_argument("--kv-kernels", default=None, choices=["auto", "torch", "triton", "cuda"],
                       help="Implementation of scoring/selection/compaction (default: auto = "
                            "CUDA C++ > Triton > torch per device; env VLLM_KVCOMPRESS_KERNELS).")
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
    flags = {f: getattr(args, "kv_" + f) for f in all_params()
             if getattr(args, "kv_" + f, None) is not None}
    layers.append((flags, cli_names()))
    return resolve(*layers)


_stats_path: str | None = None


def register_stats_collector() -> str:
    """Registers the ``vllm_kvcompress:`` collector in this (API server) process, once.

    Returns:
        The file the engine core writes its counters to (see ``engine.stats``).
    """
    global _stats_path
    if _stats_path is None:
        from prometheus_client import REGISTRY

        from .engine.stats import StatsCollector

        folder = Path(tempfile.mkdtemp(prefix="vllm-kvcompress-"))
        _stats_path = str(folder / "stats.json")
        REGISTRY.register(StatsCollector(_stats_path))
    return _stats_path


def engine_args_additional_config(engine_args: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The ``additional_config`` a ``vllm serve`` command line resolves to (``from_cli_args``).

    Raises:
        SystemExit: one line, for a bad setting, per-model data that does not fit the model, or
            a server default policy on a parallel layout that cannot compress.
    """
    try:
        spec = server_spec_from_args(args, engine_args.additional_config)
        reason = parallel_unsupported_reason(
            engine_args.pipeline_parallel_size, engine_args.data_parallel_size,
            engine_args.decode_context_parallel_size,
            getattr(engine_args, "prefill_context_parallel_size", 1))
        if spec.enabled and reason:
            raise SystemExit(f"vllm-kvcompress: compression disabled: {reason} (server "
                             f"default policy {spec.policy!r})")
        if spec.enabled and model_data_hook(spec) is not None:
            check_model_data(spec, model_shape(engine_args.create_model_config()), cli_names())
    except CompressionConfigError as err:
        raise SystemExit(f"vllm-kvcompress: invalid configuration: {err}") from None
    config = {
        **(engine_args.additional_config or {}),
        ADDITIONAL_CONFIG_KEY: spec.as_dict(exclude_none=True),
        RUNTIME_KEY: {"stats_path": register_stats_collector()},
    }
    if getattr(args, "kv_kernels", None):
        config[KERNELS_KEY] = args.kv_kernels
    return config


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


@dataclass(frozen=True)
class Frontend:
    """What this front end knows at startup, for checks made when a request's SamplingParams
    is built (before a response, streaming included, starts).

    Attributes:
        server: the server default spec.
        shape: the served model's shape (per-model data).
        unsupported: why this deployment cannot compress, or ``None``.
    """

    server: CompressionSpec
    shape: ModelShape
    unsupported: str | None


def check_server_default(vllm_config: Any) -> None:
    """Checks the server default (settings and per-model data) as soon as vLLM's config exists,
    before any engine part is built, so a bad offline ``LLM(additional_config=...)`` fails
    cleanly at construction.

    Raises:
        CompressionConfigError: names the setting.
    """
    spec = server_spec(vllm_config)
    check_model_data(spec, model_shape(vllm_config.model_config),
                     yaml_names("additional_config.kvcompress"))


#: Set once per process when its InputProcessor is built (requests are validated there).
_FRONTEND: Frontend | None = None


def open_frontend(vllm_config: Any) -> Frontend:
    """Validates and logs the server default for a front end (API server or offline ``LLM``)
    and makes it the process's frontend for request checks.

    Raises:
        CompressionConfigError: the server default or its per-model data is invalid.
    """
    global _FRONTEND
    spec = server_spec(vllm_config)
    shape = model_shape(vllm_config.model_config)
    check_model_data(spec, shape, yaml_names("additional_config.kvcompress"))
    _, detail = engine_compression_supported()
    unsupported = deployment_unsupported_reason(vllm_config)
    logger.info("vllm-kvcompress: server default %s; KV eviction in the engine: %s",
                spec.explicit(),
                f"active ({detail})" if unsupported is None else f"NOT ACTIVE: {unsupported}")
    _FRONTEND = Frontend(spec, shape, unsupported)
    return _FRONTEND


def raise_for_request(extra_args: dict[str, Any] | None,
                       frontend: Frontend | None = None) -> None:
    """Validates a request's ``kv_*`` keys, refuses a policy where compression cannot run and
    checks per-model data; ``frontend``: the admitting processor's (else this process's)."""
    from vllm.exceptions import VLLMValidationError

    frontend = frontend or _FRONTEND
    try:
        validate_request(extra_args)
        if frontend is not None and extra_args:
            _refuse_if_unsupported(frontend.unsupported, extra_args)
            check_model_data(resolve_request(frontend.server, extra_args), frontend.shape,
                             request_names())
    except CompressionConfigError as err:
        raise VLLMValidationError(str(err), parameter=f"vllm_xargs.{err.field}") from None


def _refuse_if_unsupported(reason: str | None, extra_args: dict[str, Any]) -> None:
    """A request asking for a policy on a deployment that cannot compress gets a 400, rather
    than silently running uncompressed.

    Raises:
        CompressionConfigError: naming ``kv_policy``.
    """
    policy = extra_args.get("kv_policy")
    if policy in (None, "none") or not reason:
        return
    raise CompressionConfigError("kv_policy", "compression is not available on this "
                                              f"deployment: {reason}")


def describe_allowed() -> dict[str, str]:
    """Setting -> what is allowed, with the live policy list (docs, `kvcompress policies`)."""
    return {name: param.allowed() for name, param in all_params().items()}
