"""Server configuration: the ``--kv-*`` flags, YAML files, the resolved server default, and the
checks a request's ``kv_*`` keys get before a response starts.

Everything here is plain logic over vLLM's objects; the wrappers that call it are in
``vllm_patches`` (vLLM is imported lazily).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .admission import (
    Frontend,
    RequestRules,
    admit,
    check_operator_values,
    is_admitted_by,
    operator_params,
    remember,
    split_block,
)
from .config import (
    ADDITIONAL_CONFIG_KEY,
    CompressionConfigError,
    CompressionSpec,
    check_model_data,
    cli_names,
    resolve,
    yaml_names,
)
from .deployment import (
    deployment_unsupported_reason,
    engine_compression_supported,
    kvzip_unsupported_reason,
    model_shape,
    parallel_unsupported_reason,
)
from .policies.params import Bounds
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
    for param in [*all_params().values(), *operator_params().values()]:
        default = "" if param.default is None else f" (default: {param.default})"
        kwargs: dict[str, Any] = {"default": None, "help": param.help + default,
                                  "type": param.type if param.type in (int, float) else str,
                                  "dest": "kv_" + param.name}
        choices = param.allowed_choices()
        if choices is not None and param.type is not list:
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


@dataclass(frozen=True)
class ServerSettings:
    """The server's compression default and the operator's rules for clients.

    Attributes:
        spec: the server default (every request without ``kv_*`` keys gets it).
        controls: operator settings given explicitly (``admission.OPERATOR_PARAMS`` and the
            generated ``max_<name>`` / ``min_<name>`` caps).
    """

    spec: CompressionSpec
    controls: dict[str, Any]

    def block(self) -> dict[str, Any]:
        """The ``additional_config["kvcompress"]`` block that carries both to every process."""
        return {**self.spec.as_dict(exclude_none=True), **self.controls}


def _layer(block: dict[str, Any], source: str, bounds: Bounds
           ) -> tuple[tuple[dict[str, Any], dict[str, str], Bounds], dict[str, Any]]:
    """One config block as a spec layer and its validated operator settings."""
    settings, controls = split_block(block)
    names = yaml_names(source)
    return (settings, names, bounds), check_operator_values(controls, lambda k: f"{source}:{k}")


def server_settings_from_args(args: argparse.Namespace, additional: dict[str, Any] | None,
                              bounds: Bounds | None = None) -> ServerSettings:
    """Resolves the server default and the operator settings from config files, the JSON block
    and ``--kv-*`` flags (``bounds``: the served model's limits, when known)."""
    bounds = bounds or Bounds()
    layers: list[tuple[dict[str, Any], dict[str, str], Bounds]] = []
    controls: dict[str, Any] = {}
    block = (additional or {}).get(ADDITIONAL_CONFIG_KEY)
    if block is not None:
        if not isinstance(block, dict):
            raise CompressionConfigError("additional_config.kvcompress", "must be a mapping")
        layer, more = _layer(block, "additional_config.kvcompress", bounds)
        layers.append(layer)
        controls.update(more)
    path = getattr(args, "kv_compress_config", None)
    if path:
        layer, more = _layer(_load_yaml(path), path, bounds)
        layers.append(layer)
        controls.update(more)
    raw = getattr(args, "kvcompress", None)
    if raw:
        try:
            block = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as err:
            raise CompressionConfigError("--kvcompress", f"not valid JSON: {err}") from None
        if not isinstance(block, dict):
            raise CompressionConfigError("--kvcompress", "must be a JSON object")
        layer, more = _layer(block, "kvcompress", bounds)
        layers.append(layer)
        controls.update(more)
    flags = {f: getattr(args, "kv_" + f) for f in all_params()
             if getattr(args, "kv_" + f, None) is not None}
    layers.append((flags, cli_names(), bounds))
    operator_flags = {f: getattr(args, "kv_" + f) for f in operator_params()
                      if getattr(args, "kv_" + f, None) is not None}
    controls.update(check_operator_values(
        operator_flags, lambda k: "--kv-" + k.replace("_", "-")))
    return ServerSettings(resolve(*layers), controls)


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
        settings = server_settings_from_args(args, engine_args.additional_config)
        spec = settings.spec
        if spec.enabled or settings.controls:
            # The served model's limits bound the server's own settings too (one line here,
            # rather than a traceback when the engine config is built).
            server_settings_from_args(args, engine_args.additional_config, deployment_bounds(
                engine_args.create_model_config()))
        if engine_args.kv_transfer_config is not None and spec.enabled:
            raise SystemExit("vllm-kvcompress: compression disabled: KV connectors "
                             "(--kv-transfer-config) are not supported with compression: "
                             "compacted blocks would be shared under their original token "
                             f"hashes (server default policy {spec.policy!r})")
        reason = parallel_unsupported_reason(
            engine_args.pipeline_parallel_size, engine_args.data_parallel_size,
            engine_args.decode_context_parallel_size,
            getattr(engine_args, "prefill_context_parallel_size", 1))
        if spec.enabled and reason:
            raise SystemExit(f"vllm-kvcompress: compression disabled: {reason} (server "
                             f"default policy {spec.policy!r})")
        if spec.policy == "kvzip":
            model_config = engine_args.create_model_config()
            kvzip_reason = kvzip_unsupported_reason(
                getattr(model_config.hf_config, "architectures", None),
                engine_args.tensor_parallel_size)
            if kvzip_reason:
                raise SystemExit(f"vllm-kvcompress: policy 'kvzip' is not available: "
                                 f"{kvzip_reason}")
        if spec.enabled and model_data_hook(spec) is not None:
            check_model_data(spec, model_shape(engine_args.create_model_config()), cli_names())
    except CompressionConfigError as err:
        raise SystemExit(f"vllm-kvcompress: invalid configuration: {err}") from None
    config = {
        **(engine_args.additional_config or {}),
        ADDITIONAL_CONFIG_KEY: settings.block(),
        RUNTIME_KEY: {"stats_path": register_stats_collector()},
    }
    if getattr(args, "kv_kernels", None):
        config[KERNELS_KEY] = args.kv_kernels
    return config


def deployment_bounds(model_config: Any) -> Bounds:
    """The served model's limits on every size setting (``Param.bound``)."""
    return Bounds(deployment={"max_model_len": int(model_config.max_model_len),
                              "num_layers": int(model_config.get_total_num_hidden_layers())})


def server_settings(vllm_config: Any, bounds: Bounds | None = None) -> ServerSettings:
    """The server default and operator settings carried by ``vllm_config.additional_config``
    in every process.

    Raises:
        CompressionConfigError: the block is invalid (offline ``LLM(additional_config=...)``).
    """
    block = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
    if block is None:
        return ServerSettings(CompressionSpec(), {})
    if not isinstance(block, dict):
        raise CompressionConfigError("additional_config.kvcompress", "must be a mapping")
    layer, controls = _layer(block, "additional_config.kvcompress", bounds or Bounds())
    return ServerSettings(resolve(layer), controls)


def server_spec(vllm_config: Any) -> CompressionSpec:
    """The server default carried by ``vllm_config.additional_config`` in every process."""
    return server_settings(vllm_config).spec


def _server_file_results(spec: CompressionSpec, shape: Any) -> dict[str, str | None]:
    """Loads and checks the server's own per-model data files (any that are set, whichever
    policy reads them), once at startup, so requests choosing such a policy need no I/O.

    Raises:
        CompressionConfigError: the server default's own policy reads a file that does not fit.
    """
    from .admission import _model_data_hooks
    from .policies.model_data import load_model_data

    check_model_data(spec, shape, yaml_names("additional_config.kvcompress"))
    results: dict[str, str | None] = {}
    for hook in _model_data_hooks():
        path = spec[hook.param]
        if path is None:
            continue
        try:
            load_model_data(hook, path, shape)
            results[path] = None
        except ValueError as err:
            results[path] = str(err)
    return results


def check_server_default(vllm_config: Any) -> None:
    """Checks the server default (settings within the model's limits, per-model data) as soon
    as vLLM's config exists, before any engine part is built, so a bad offline
    ``LLM(additional_config=...)`` fails cleanly at construction.

    Raises:
        CompressionConfigError: names the setting.
    """
    settings = server_settings(vllm_config, deployment_bounds(vllm_config.model_config))
    check_model_data(settings.spec, model_shape(vllm_config.model_config),
                     yaml_names("additional_config.kvcompress"))
    if settings.spec.enabled and getattr(vllm_config, "kv_transfer_config", None) is not None:
        raise CompressionConfigError(
            "additional_config.kvcompress:policy", "compression cannot run with a KV connector "
            "(kv_transfer_config): compacted blocks would be shared under their original token "
            "hashes")


#: Set once per process when its InputProcessor is built (requests are admitted there). Only
#: front ends have one: the engine core and the workers never admit (see ``admission``).
_FRONTEND: Frontend | None = None


def open_frontend(vllm_config: Any) -> Frontend:
    """Validates and logs the server default for a front end (API server or offline ``LLM``)
    and makes it the process's front end for admitting requests.

    Raises:
        CompressionConfigError: the server default or its per-model data is invalid.
    """
    global _FRONTEND
    model = vllm_config.model_config
    bounds = deployment_bounds(model)
    settings = server_settings(vllm_config, bounds)
    shape = model_shape(model)
    server_files = _server_file_results(settings.spec, shape)
    _, detail = engine_compression_supported()
    unsupported = deployment_unsupported_reason(vllm_config)
    rules = RequestRules.from_operator(settings.controls, bounds.deployment, shape)
    kvzip_reason = kvzip_unsupported_reason(
        getattr(model.hf_config, "architectures", None),
        vllm_config.parallel_config.tensor_parallel_size)
    if settings.spec.policy == "kvzip" and kvzip_reason:
        raise CompressionConfigError("policy", f"'kvzip' is not available here: {kvzip_reason}")
    logger.info("vllm-kvcompress: server default %s; operator settings %s; KV eviction in the "
                "engine: %s", settings.spec.explicit(), settings.controls or "defaults",
                f"active ({detail})" if unsupported is None else f"NOT ACTIVE: {unsupported}")
    _FRONTEND = Frontend(settings.spec, shape, unsupported, rules, server_files,
                         policy_unsupported={"kvzip": kvzip_reason} if kvzip_reason else {})
    return _FRONTEND


def admit_request(extra_args: dict[str, Any] | None, frontend: Frontend | None = None,
                  again: bool = True) -> None:
    """Admits a request's ``kv_*`` keys in a front end and stores the resolved spec in
    ``extra_args`` for the engine core; does nothing in a process without a front end (the
    engine core re-runs this check when it decodes a request: it must never raise there).

    Args:
        extra_args: the request's ``extra_args`` (modified in place).
        frontend: the admitting processor's front end (default: this process's).
        again: whether a request this front end already admitted is admitted again.

    Raises:
        VLLMValidationError: names ``vllm_xargs.<key>``; an HTTP 400 on the OpenAI server.
    """
    from vllm.exceptions import VLLMValidationError

    frontend = frontend or _FRONTEND
    if frontend is None or not extra_args:
        return
    if not again and is_admitted_by(extra_args, frontend):
        return
    try:
        remember(extra_args, admit(extra_args, frontend), frontend)
    except CompressionConfigError as err:
        raise VLLMValidationError(str(err), parameter=f"vllm_xargs.{err.field}") from None


def server_footprint(vllm_config: Any) -> int | None:
    """Tokens one request under the server default needs at once when that default compresses
    while prefilling (``prefill_budget`` + one chunk, or its decode bound if larger), else
    ``None``: what vLLM's startup check should hold the KV pool to instead of
    ``max_model_len``. Requests are then held to the pool one by one (``check_fits``)."""
    spec = server_spec(vllm_config)
    if not spec.enabled or spec.prefill_budget is None or \
            deployment_unsupported_reason(vllm_config) is not None:
        return None
    chunk = int(vllm_config.scheduler_config.max_num_batched_tokens)
    tokens = spec.prefill_budget + chunk
    if spec.decode_budget is not None:
        tokens = max(tokens, spec.decode_budget + spec.decode_interval)
    return tokens


@contextlib.contextmanager
def pool_checked_for_footprint(vllm_config: Any) -> Iterator[None]:
    """Inside, ``max_model_len`` reads as the server's compressed footprint
    (``server_footprint``) when that is smaller, so vLLM's check that the KV pool holds one
    whole request accepts a ``max_model_len`` the pool could not hold uncompressed. Restored on
    exit (vLLM compares it before and after to detect its own auto-fit)."""
    model = vllm_config.model_config
    footprint = server_footprint(vllm_config)
    if footprint is None or footprint >= model.max_model_len:
        yield
        return
    full = model.max_model_len
    model.max_model_len = footprint
    try:
        yield
    finally:
        model.max_model_len = full
    logger.warning("vllm-kvcompress: the KV pool is checked for a request of %d tokens, not "
                   "max_model_len %d: the server compresses while prefilling (prefill_budget "
                   "%d + one chunk); a request that could never fit gets HTTP 400", footprint,
                   full, server_spec(vllm_config).prefill_budget)


def check_fits(request: Any, vllm_config: Any, frontend: Frontend | None) -> None:
    """Refuses a request that could never fit the KV pool (it would wait or be preempted
    forever): its footprint under its admitted spec (``config.request_footprint``) against the
    pool's usable tokens, once the engine has reported them. Only a server whose
    ``max_model_len`` exceeds the pool can have such requests.

    Args:
        request: anything with ``prompt_token_ids`` and ``sampling_params`` (vLLM's
            ``EngineCoreRequest``); requests without them are left to later checks.
        vllm_config: the front end's config (pool size, chunk).
        frontend: the admitting front end (``None``: no check).

    Raises:
        VLLMValidationError: names ``vllm_xargs.kv_prefill_budget``, the footprint, the pool and
            what would fit.
    """
    check_prompt_fits(getattr(request, "prompt_token_ids", None),
                      getattr(request, "sampling_params", None), vllm_config, frontend)


def check_prompt_fits(prompt: Any, params: Any, vllm_config: Any, frontend: Frontend | None
                      ) -> None:
    """``check_fits`` for a prompt before its request exists: an engine input already
    rendered to tokens (a mapping with ``prompt_token_ids``, what the OpenAI server passes to
    ``AsyncLLM.generate``) or a token list; anything else (text, embeddings) is checked later,
    by ``check_fits``, once tokenized. Called where the server has not started a response yet,
    so a streaming request is refused with a 400, not a 200 followed by an error event.

    Raises:
        VLLMValidationError: as ``check_fits``.
    """
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from .admission import admitted_spec
    from .config import request_footprint

    if isinstance(prompt, Mapping):
        prompt = prompt.get("prompt_token_ids")
    blocks = vllm_config.cache_config.num_gpu_blocks
    if not blocks or prompt is None or isinstance(prompt, str) or frontend is None or \
            not isinstance(params, SamplingParams):
        return
    pool = (blocks - 1) * vllm_config.cache_config.block_size  # the null block is never lent
    chunk = int(vllm_config.scheduler_config.max_num_batched_tokens)
    spec = admitted_spec(params.extra_args, frontend.server)
    max_tokens = params.max_tokens or 0
    needed = request_footprint(spec, len(prompt), max_tokens, chunk)
    if needed <= pool:
        return
    budget = ("no compression (kv_policy none)" if not spec.enabled else
              "no kv_prefill_budget" if spec.prefill_budget is None else
              f"kv_prefill_budget {spec.prefill_budget}")
    raise VLLMValidationError(
        f"kv_prefill_budget: this request would hold {needed} KV tokens at once ({len(prompt)} "
        f"prompt tokens, max_tokens {max_tokens}, {budget}, chunks of {chunk}), more than the "
        f"KV pool's {pool}: it could never run. Set kv_prefill_budget (at most "
        f"{max(pool - chunk, 0)}) and/or a smaller max_tokens",
        parameter="vllm_xargs.kv_prefill_budget")


def describe_allowed() -> dict[str, str]:
    """Setting -> what is allowed, with the live policy list (docs, `kvcompress policies`)."""
    return {name: param.allowed() for name, param in all_params().items()}

