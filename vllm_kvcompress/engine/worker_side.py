"""Worker side: compact each layer's kept tokens, then run on physical lengths.

Step N (a step that compacts a request: the one completing its prompt, or, with
``decode_budget``, a decode step or re-prefill that reaches the limit), for each attention layer,
right after the layer's own attention (so this step's logits use the full KV, as a reference model
would): record the step's queries of the requests that need them (the query ring), read the
layer's keys/values of the request's current tokens from the paged cache, score them with the
last ``window`` queries (post-RoPE), select ``kept`` indices with the request's policy, and write
the kept tokens into the destination blocks' first ``kept`` slots.

Step N+1 onwards: the request's block-table row is replaced by the destination blocks and the
row's evicted count (cumulative) makes ``seq_lens`` and vLLM's slot mapping physical (logical
minus evicted), while positions stay logical, so RoPE is unchanged and no attention backend needs
a mask.

A request that starts on a compressed prefix from the prefix cache (``reuse_prefix``, the plan's
``adopt``) gets the same row offset from its first step: its first blocks are that prefix's kept
tokens, shared with the request that compressed them (vLLM copies a partial last block on write).

A step without layer work costs the hook one check per layer; the remap costs one vectorised
check per step when no row carries evicted tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..config import CompressionSpec
from ..kernels.dispatch import compaction_backend, kernel_backend
from ..policies.base import (
    KEYS,
    MODEL_DATA,
    QUERIES,
    RECONSTRUCTION_ATTENTION,
    ROTARY,
    VALUES,
    WINDOW_ATTENTION,
    KVPolicy,
    LayerObservation,
    SelectionKernels,
)
from ..policies.model_data import load_model_data
from ..policies.registry import build_policy, model_data_hook
from ..policies.rotary import find_vllm_rotary
from ..policies.window_scoring import window_attention_scores
from .cpu_paged_cache import row_slots
from .evicted_rows import EvictedRows
from .messages import WorkerReport, plan_of
from .query_ring import QueryRing

logger = logging.getLogger("vllm.kvcompress")

#: Set to 1 to keep every compressed request's kept indices per layer (tests, debugging).
RECORD_ENV = "VLLM_KVCOMPRESS_RECORD_KEPT"


class PagedCacheAccess(Protocol):
    """Reads and writes tokens of one attention backend's per-layer paged cache.

    ``kernel_layout`` names the layout for the Triton kernels, or is ``None`` where they cannot
    address it (the torch path is used then).
    """

    kernel_layout: str | None

    def read(self, cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
             ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def write(self, cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              slots: torch.Tensor) -> None: ...


@dataclass
class CompactionTask:
    """One request's compaction during this step.

    Attributes:
        req_id: the request.
        spec: its resolved settings.
        policy: the policy object built from ``spec``.
        kept: tokens each layer keeps.
        source_len: tokens the request holds before the compaction (``L``, physical).
        logical_len: its logical length (``L`` plus tokens evicted earlier).
        keep_queries: whether its query ring outlives this compaction (decode-time
            compression scores again later).
        src_blocks: ``[>= cdiv(L, block_size)]`` block ids holding its tokens.
        dst_blocks: ``[cdiv(kept, block_size)]`` block ids receiving the kept tokens.
        in_place: whether ``dst_blocks`` are the first blocks of ``src_blocks``.
        query_start: first row of this request's tokens in the step's flattened batch.
        query_end: one past its last row.
        selections: selection layer -> kept indices ``[H, kept]``, for layer-wise index reuse.
        failed: compaction raised on this rank, or (tensor parallelism) on another one.
        context_ids: ``[L]`` the prompt's ids, for a policy scored by reconstruction (KVzip),
            which compacts after the forward (``WorkerCompression.after_forward``).
        reconstruction: per layer ``[H, L]`` KVzip scores, once computed.
    """

    req_id: str
    spec: CompressionSpec
    policy: KVPolicy
    kept: int
    source_len: int
    logical_len: int
    keep_queries: bool
    src_blocks: torch.Tensor
    dst_blocks: torch.Tensor
    in_place: bool
    query_start: int
    query_end: int
    selections: dict[int, torch.Tensor] = field(default_factory=dict)
    failed: bool = False
    context_ids: list[int] | None = None
    reconstruction: list[torch.Tensor] | None = None

    @property
    def after_forward(self) -> bool:
        """Whether this task compacts after the model forward (KVzip), not inside each layer."""
        return RECONSTRUCTION_ATTENTION in self.policy.inputs


class WorkerCompression:
    """Compression state of one model runner (one per worker process).

    Args:
        num_layers: attention layers of the model.
        block_size: tokens per KV block.
        kernels: ``auto``/``torch``/``triton``/``cuda`` from the config, or ``None`` to follow
            ``VLLM_KVCOMPRESS_KERNELS`` (see ``kernels.dispatch``).
        total_kv_heads: KV heads of the model over all tensor-parallel ranks.
        max_num_reqs: rows of the runner's input batch.
    """

    def __init__(self, num_layers: int, block_size: int, kernels: str | None = None,
                 total_kv_heads: int | None = None, max_num_reqs: int = 1024) -> None:
        self.num_layers = num_layers
        self.block_size = block_size
        self.kernels = kernels
        #: Tokens evicted per request and per block-table row (attached to vLLM's table).
        self.evicted_rows = EvictedRows(max_num_reqs)
        #: Wall time of the per-step work outside the layers (step boundaries, remap).
        self.step_seconds = 0.0
        self.pending: dict[str, tuple[list[int], int]] = {}
        #: The last ``window`` queries of requests that will be (or keep being) compressed.
        self.queries = QueryRing(num_layers)
        self.compactions: list[CompactionTask] = []
        self.record = os.environ.get(RECORD_ENV, "0") not in ("", "0")
        #: request id -> layer -> kept indices of its first compaction (``record``).
        self.kept_log: dict[str, dict[int, list[int]]] = {}
        #: request id -> every compaction: ``{"kind", "source_len", "kept", "layers"}``.
        self.compaction_log: dict[str, list[dict[str, Any]]] = {}
        #: Wall time spent scoring, selecting and compacting (for the overhead benchmark).
        self.compaction_seconds = 0.0
        #: Requests whose compaction raised this step; reported to the scheduler, which fails
        #: them alone (their destination blocks are half written).
        self.failed: set[str] = set()
        #: Requests whose window queries were lost on this rank (a ring write failed): their
        #: compactions fail here, and so, through the step's agreement, on every rank.
        self.poisoned: set[str] = set()
        self._reported_ring_bytes = 0
        self._tp: Any = _UNRESOLVED
        self._backend_by_device: dict[str, tuple[str, str]] = {}
        #: KV heads of the whole model (all ranks), for per-head model data under TP.
        self.total_kv_heads = total_kv_heads
        #: The model's RoPE for scorers that read ``rotary``: a ``Rotary``, a callable that
        #: finds it in the loaded model (resolved on first use), or ``None`` (no RoPE).
        self.rotary: Any = None
        #: Per layer, ``(kv_cache, access, scale, softcap)`` seen by this step's attention hook,
        #: for the compactions that run after the forward (KVzip).
        self.layer_caches: dict[int, tuple[torch.Tensor, Any, float | None, float]] = {}
        #: Wall time of KVzip's reconstruction passes (scoring only).
        self.reconstruction_seconds = 0.0
        #: request id -> per layer ``[H, L]`` KVzip scores (``record``).
        self.reconstruction_log: dict[str, list[torch.Tensor]] = {}

    # --- step boundaries ----------------------------------------------------------------------

    def begin_step(self, scheduler_output: Any, runner: Any) -> None:
        """Before vLLM updates its request states: forget ended requests, switch compacted
        requests to their destination blocks (before this step's new blocks are appended)."""
        start = time.perf_counter()
        self.compactions = []
        self.layer_caches = {}
        self.queries.plan([])
        tables = runner.input_batch.block_table
        if getattr(tables, "_kvcompress_evicted", None) is not self.evicted_rows:
            tables._kvcompress_evicted = self.evicted_rows  # a (re)built input batch
        ended = set(scheduler_output.finished_req_ids)
        ended |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        ended |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        for req_id in ended:
            self.evicted_rows.forget(req_id)
            self.pending.pop(req_id, None)
            self.queries.release(req_id)
            self.poisoned.discard(req_id)
        plan = plan_of(scheduler_output)
        if plan is not None:
            # Requests starting on a compressed prefix from the prefix cache: vLLM adds their
            # rows during this step's update (``added`` reads the count), or they are there.
            for req_id, evicted in plan.adopt.items():
                self.evicted_rows.set(req_id, runner.input_batch.req_id_to_index.get(req_id),
                                      evicted)
        for req_id, (blocks, evicted) in self.pending.items():
            state = runner.requests.get(req_id)
            if state is None:
                continue
            state.block_ids[0][:] = blocks
            row = runner.input_batch.req_id_to_index.get(req_id)
            if row is not None:
                table = tables[0]
                table.clear_row(row)
                table.append_row(blocks, row)
            self.evicted_rows.set(req_id, row, evicted)
        self.pending.clear()
        self.step_seconds += time.perf_counter() - start

    def after_prepare_inputs(self, scheduler_output: Any, runner: Any) -> None:
        """Makes ``seq_lens`` physical (vLLM's slot mapping already is: ``physical_positions``
        fed it); lays out this step's tasks."""
        start = time.perf_counter()
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        self.evicted_rows.to_physical_lengths(num_reqs, runner.seq_lens,
                                              runner.optimistic_seq_lens_cpu)
        plan = plan_of(scheduler_output)
        if plan:
            self._lay_out(plan, batch, runner)
        self.step_seconds += time.perf_counter() - start

    def _lay_out(self, plan: Any, batch: Any, runner: Any) -> None:
        starts = runner.query_start_loc.np
        for req_id, job in plan.compact.items():
            row = batch.req_id_to_index[req_id]
            spec = job.spec  # admitted in the front end: never re-parsed or re-checked here
            try:
                policy = build_policy(spec)
                if policy is None:
                    raise ValueError(f"request {req_id} has no policy to compact with")
            except Exception:
                # Its blocks were already moved by the scheduler: it cannot go on. Under
                # tensor parallelism every rank builds the same policy from the same spec.
                logger.exception("vllm-kvcompress: request %s: its policy could not be built;"
                                 " the request is finished with an error", req_id)
                self.failed.add(req_id)
                self.queries.release(req_id)
                continue
            task = CompactionTask(
                req_id=req_id, spec=spec, policy=policy, kept=job.kept,
                source_len=job.source_len, logical_len=job.kept + job.evicted,
                keep_queries=job.keep_queries,
                src_blocks=torch.tensor(job.src_blocks, dtype=torch.int64),
                dst_blocks=torch.tensor(job.dst_blocks, dtype=torch.int64),
                in_place=job.in_place, query_start=int(starts[row]),
                query_end=int(starts[row + 1]))
            if task.after_forward:
                state = runner.requests.get(req_id)
                prompt = None if state is None else state.prompt_token_ids
                if prompt is not None and task.logical_len == task.source_len:
                    task.context_ids = list(prompt[:task.source_len])
            self.compactions.append(task)
            self.pending[req_id] = (list(job.dst_blocks), job.evicted)
            if self.record:
                self.compaction_log.setdefault(req_id, []).append(
                    {"kind": job.kind, "source_len": job.source_len, "kept": job.kept,
                     "layers": {}})
        for req_id in plan.release:
            self.queries.release(req_id)
        entries = []
        for req_id, window in plan.stash.items():
            row = batch.req_id_to_index[req_id]
            entries.append((req_id, window, int(starts[row]), int(starts[row + 1])))
        self.queries.plan(entries)

    # --- per layer ----------------------------------------------------------------------------

    @property
    def has_layer_work(self) -> bool:
        return bool(self.compactions) or self.queries.has_writes

    def after_attention(self, layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor,
                        access: PagedCacheAccess, scale: float | None = None,
                        softcap: float = 0.0) -> None:
        """Stashes window queries and compacts this layer for this step's tasks.

        Args:
            layer_idx: the attention layer's index.
            query: ``[num_tokens, num_q_heads, head_dim]`` post-RoPE queries of the step.
            kv_cache: the layer's paged cache (this step's keys/values already written).
            access: reads and writes tokens of this backend's cache layout.
            scale: the attention layer's softmax scale (scores use the layer's own logits).
            softcap: the layer's logit soft-cap, 0 for none.
        """
        start = time.perf_counter()
        for failed_ids in self.queries.write(layer_idx, query):
            # A ring pool could not be allocated or written: its requests lose their window
            # queries, so they fail alone (never the step); compactions among them are
            # skipped below, and under tensor parallelism they fail on every rank when they
            # compact (``poisoned``: this rank then reports the failure to the others).
            logger.error("vllm-kvcompress: keeping window queries failed at layer %d; requests "
                         "%s are finished with an error", layer_idx, ", ".join(failed_ids))
            for req_id in failed_ids:
                self.poisoned.add(req_id)
                self.failed.add(req_id)
                self.pending.pop(req_id, None)
                self.queries.release(req_id)
        for task in self.compactions:
            if task.after_forward:
                # Scored by a pass over every layer's cache: compacted after the forward.
                self.layer_caches[layer_idx] = (kv_cache, access, scale, softcap)
                continue
            if task.req_id in self.poisoned and not task.failed:
                task.failed = True
            try:
                self._compact_layer(task, layer_idx, kv_cache, access, scale, softcap)
            except Exception:
                # One request's failure must not take the engine (and every other request)
                # down: keep its old block-table row and report it. Under tensor parallelism
                # the task stays in the list so this rank keeps joining the step's collectives
                # (with a failure flag) and the other ranks fail it too.
                logger.exception("vllm-kvcompress: compaction of request %s failed at layer %d;"
                                 " the request is finished with an error", task.req_id,
                                 layer_idx)
                self._fail(task)
        self.compaction_seconds += time.perf_counter() - start

    @property
    def has_work_after_forward(self) -> bool:
        return any(task.after_forward for task in self.compactions)

    def after_forward(self, runner: Any) -> None:
        """Compacts the step's KVzip tasks once the forward has written the prompt's KV:
        reconstruction passes over each request's cached context (``engine/reconstruction``),
        then per layer the generic selection and compaction. A failure fails that request alone.

        The scheduler freed these requests' source blocks when it planned this step; a freed
        block is only handed out by a later ``schedule()``, so reading them here is safe.
        """
        from .reconstruction import reconstruction_scores, repeat_prompt

        for task in self.compactions:
            if not task.after_forward or task.failed:
                continue
            start = time.perf_counter()
            try:
                if self._tensor_parallel() is not None:
                    raise ValueError("kvzip does not run under tensor parallelism")
                if task.context_ids is None:
                    raise ValueError("kvzip compresses a whole prompt once, at its end; it "
                                     "cannot run on a request whose tokens were evicted before "
                                     "(decode_budget, prefill_budget)")
                if sorted(self.layer_caches) != list(range(self.num_layers)):
                    raise RuntimeError(f"the attention hook saw layers {sorted(self.layer_caches)}"
                                       f" of {self.num_layers}")
                caches = [self.layer_caches[i] for i in range(self.num_layers)]
                contexts = [access.read(cache, task.src_blocks, task.source_len)
                            for cache, access, _, _ in caches]
                model = runner.get_model()
                head_size = contexts[0][0].shape[-1]
                scales = [scale if scale is not None else head_size ** -0.5
                          for _, _, scale, _ in caches]
                task.reconstruction = reconstruction_scores(
                    model, task.context_ids, contexts,
                    repeat_prompt(runner.model_config.tokenizer), task.spec.kvzip_chunk_size,
                    task.spec.sink_tokens, scales)
                if self.record:
                    self.reconstruction_log[task.req_id] = [t.cpu() for t in task.reconstruction]
                scored = time.perf_counter()
                self.reconstruction_seconds += scored - start
                logger.info("vllm-kvcompress: kvzip request %s: reconstruction of %d tokens "
                            "in %.3f s", task.req_id, task.source_len, scored - start)
                del contexts
                for layer_idx, (cache, access, scale, softcap) in enumerate(caches):
                    self._compact_layer(task, layer_idx, cache, access, scale, softcap)
            except Exception:
                logger.exception("vllm-kvcompress: kvzip compaction of request %s failed; the "
                                 "request is finished with an error", task.req_id)
                self._fail(task)
            task.reconstruction = None
            self.compaction_seconds += time.perf_counter() - start

    def _fail(self, task: CompactionTask) -> None:
        task.failed = True
        self.pending.pop(task.req_id, None)
        self.queries.release(task.req_id)
        self.failed.add(task.req_id)

    def end_step(self) -> None:
        """After the forward, on every rank: a failure on any tensor-parallel rank fails the
        request on all of them (the failure may have happened after the last collective)."""
        tp = self._tensor_parallel()
        if tp is None or not self.compactions:
            return
        # Every rank holds the same tasks in the same order (one scheduler message).
        flags = torch.tensor([float(t.failed) for t in self.compactions])
        flags = tp.all_reduce(flags.to(tp.device)).cpu()
        for task, flag in zip(self.compactions, flags.tolist(), strict=True):
            if flag > 0 and not task.failed:
                logger.warning("vllm-kvcompress: compaction of request %s failed on another "
                               "tensor-parallel rank", task.req_id)
                self._fail(task)

    def take_report(self) -> WorkerReport | None:
        """What to tell the scheduler after this step (``None``: nothing)."""
        tp = self._tensor_parallel()
        ring_bytes = self.queries.nbytes * (tp.world_size if tp is not None else 1)
        changed = ring_bytes != self._reported_ring_bytes
        if not self.failed and not changed:
            return None
        self._reported_ring_bytes = ring_bytes
        failed, self.failed = tuple(sorted(self.failed)), set()
        return WorkerReport(failed=failed, ring_pool_bytes=ring_bytes if changed else None)

    def _backends(self, device: torch.device) -> tuple[str, str]:
        """(scoring/selection, compaction) implementations on ``device``, resolved once."""
        if device.type not in self._backend_by_device:
            self._backend_by_device[device.type] = (kernel_backend(device, self.kernels),
                                                    compaction_backend(device, self.kernels))
        return self._backend_by_device[device.type]

    def _tensor_parallel(self) -> Any:
        """vLLM's tensor-parallel group when it has more than one rank, else ``None``."""
        if self._tp is _UNRESOLVED:
            self._tp = None
            try:
                from vllm.distributed import get_tp_group

                group = get_tp_group()
            except Exception:  # no distributed state (unit tests, tools)
                group = None
            if group is not None and group.world_size > 1:
                self._tp = group
        return self._tp

    def _window_queries(self, task: CompactionTask, layer_idx: int) -> torch.Tensor:
        """``[num_q_heads, w, head_dim]`` the request's last ``window`` queries (this step's
        included: the ring is written before any compaction of the layer)."""
        window = task.spec.window
        kept = self.queries.read(task.req_id, layer_idx)
        if kept is None or kept.shape[0] < window:
            have = 0 if kept is None else kept.shape[0]
            raise RuntimeError(f"only {have} window queries for {task.req_id}, need {window}")
        return kept[-window:].transpose(0, 1)

    def _compact_layer(self, task: CompactionTask, layer_idx: int,
                       kv_cache: torch.Tensor, access: PagedCacheAccess,
                       scale: float | None = None, softcap: float = 0.0) -> None:
        num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
        scoring, compaction = self._backends(kv_cache.device)
        layout = access.kernel_layout if scoring == "triton" else None
        source = task.policy.selection_layer(layer_idx)
        kept_idx = task.selections.get(source)
        keys = values = obs = None
        if kept_idx is None:
            obs = scores = error = None
            if not task.failed:
                try:
                    obs, keys, values = self._observe(task, layer_idx, kv_cache, access,
                                                      layout, scale, softcap)
                    scores = task.policy.score(obs).float()
                except Exception as err:
                    error = err
            tp = self._tensor_parallel()
            if tp is not None:
                # Every rank joins, failed or not, so the collectives stay aligned; the flag
                # makes a failure on any rank fail the request on all of them.
                total = (scores.sum(dim=0) if scores is not None else
                         torch.zeros(task.source_len, device=kv_cache.device))
                flag = torch.tensor([float(task.failed or error is not None)],
                                    device=total.device)
                reduced = tp.all_reduce(torch.cat([total, flag]).to(tp.device))
                if float(reduced[-1]) > 0:
                    if error is not None:
                        raise error
                    if not task.failed:
                        logger.warning("vllm-kvcompress: compaction of request %s failed on "
                                       "another tensor-parallel rank", task.req_id)
                        self._fail(task)
                    return
                # shared selection ranks the scores of every rank's heads: one token set.
                obs = dataclasses.replace(obs, shared_total=reduced[:-1].to(total.device))
            if error is not None:
                raise error
            if task.failed:
                return
            kept_idx = task.policy.select(obs, scores).to(torch.int64)
            if tuple(kept_idx.shape) != (num_kv_heads, task.kept):
                raise ValueError(f"policy {task.spec.policy!r} returned kept indices of shape "
                                 f"{tuple(kept_idx.shape)}, expected {(num_kv_heads, task.kept)}")
            task.selections[source] = kept_idx
        if task.failed:
            return
        dst_slots = row_slots(task.dst_blocks, task.kept, block_size).to(kv_cache.device)
        kept_on = kept_idx.to(kv_cache.device)
        merged_values = None
        merging = getattr(task.policy, "merged_values", None)
        if merging is not None:
            # The kept slots' values absorb this layer's evicted tokens (its own keys, values
            # and window attention, also on a layer that reuses another's selection).
            if obs is None or obs.layer_idx != layer_idx:
                obs, keys, values = self._observe(task, layer_idx, kv_cache, access,
                                                  layout, scale, softcap)
            merged_values = merging(obs, kept_on)
        if merged_values is not None:
            # Gather the keys (copies) before writing: the destination may overlap the source.
            index = kept_on.unsqueeze(-1).expand(-1, -1, keys.shape[-1])
            access.write(kv_cache, keys.gather(1, index), merged_values.to(values.dtype),
                         dst_slots)
        elif layout is not None:
            # Per-head source slots [H, kept]: slot j of head h receives head h's j-th token.
            src_slots = row_slots(task.src_blocks, task.source_len, block_size).to(
                kv_cache.device)[kept_on]
            if layout == "flash" and compaction == "cuda":
                from ..kernels.cuda_ext import compact_paged as compact_paged_cuda

                compact_paged_cuda(kv_cache, src_slots, dst_slots, task.in_place)
            else:
                from ..kernels.compaction import compact_paged

                compact_paged(kv_cache, src_slots, dst_slots, in_place=task.in_place,
                              layout=layout)
        else:
            if keys is None:
                keys, values = access.read(kv_cache, task.src_blocks, task.source_len)
            # Gather (copies) before writing: destination may overlap the source (in place).
            index = kept_on.unsqueeze(-1).expand(-1, -1, keys.shape[-1])
            access.write(kv_cache, keys.gather(1, index), values.gather(1, index), dst_slots)
        if self.record:
            self.kept_log.setdefault(task.req_id, {}).setdefault(layer_idx, kept_idx.tolist())
            log = self.compaction_log.get(task.req_id)
            if log:
                log[-1]["layers"][layer_idx] = kept_idx.tolist()
        if layer_idx == self.num_layers - 1 and not task.keep_queries:
            self.queries.release(task.req_id)

    def _kv_head_offset(self, local_heads: int) -> int:
        """Global index of this rank's first KV head (vLLM splits heads evenly, or replicates
        them when there are fewer heads than ranks)."""
        tp = self._tensor_parallel()
        if tp is None:
            return 0
        total = self.total_kv_heads or local_heads * tp.world_size
        if total >= tp.world_size:
            return tp.rank_in_group * local_heads
        return tp.rank_in_group * total // tp.world_size

    def _observe(self, task: CompactionTask, layer_idx: int,
                 kv_cache: torch.Tensor, access: PagedCacheAccess, layout: str | None,
                 scale: float | None, softcap: float
                 ) -> tuple[LayerObservation, torch.Tensor | None, torch.Tensor | None]:
        """The observation with exactly the inputs the policy declared, on this kernel path.

        Returns:
            ``(obs, keys, values)``; keys/values are the full prompt's ``[H, L, D]`` when they
            were read (always on the torch path, which compacts from them), else ``None``.
        """
        inputs = task.policy.inputs
        want_attention = WINDOW_ATTENTION in inputs
        queries = (self._window_queries(task, layer_idx)
                   if want_attention or QUERIES in inputs else None)
        keys = values = window_attention = kernels = None
        if layout is not None:
            from ..kernels.chunk_select import chunk_means_triton, stable_descending_order

            kernels = SelectionKernels(chunk_means_triton, stable_descending_order)
            if want_attention:
                from ..kernels.window_scores import paged_window_scores

                window_attention = paged_window_scores(
                    queries.contiguous(), kv_cache, task.src_blocks.to(kv_cache.device),
                    task.source_len, layout=layout, scale=scale, softcap=softcap)
            if KEYS in inputs or VALUES in inputs:
                keys, values = access.read(kv_cache, task.src_blocks, task.source_len)
        else:
            keys, values = access.read(kv_cache, task.src_blocks, task.source_len)
            if want_attention:
                window_attention = window_attention_scores(queries, keys, scale, softcap)
        model_data = None
        if MODEL_DATA in inputs:
            hook = model_data_hook(task.spec)
            if hook is None:
                raise ValueError(f"policy {task.spec.policy!r} reads model data but declares no "
                                 "model_data hook")
            model_data = load_model_data(hook, getattr(task.spec, hook.param))
        rotary = None
        if ROTARY in inputs:
            if callable(self.rotary):
                self.rotary = self.rotary()
            if self.rotary is None:
                raise ValueError(f"policy {task.spec.policy!r} needs the model's rotary "
                                 "embedding, and this model has none")
            rotary = self.rotary
        obs = LayerObservation(
            seq_len=task.source_len, budget=task.kept, sink_tokens=task.spec.sink_tokens,
            window=task.spec.window, layer_idx=layer_idx, num_layers=self.num_layers,
            num_kv_heads=kv_cache.shape[1], queries=queries,
            keys=keys if KEYS in inputs else None, values=values if VALUES in inputs else None,
            window_attention=window_attention, model_data=model_data, rotary=rotary,
            kernels=kernels,
            attn_scale=scale, attn_softcap=softcap,
            kv_head_offset=self._kv_head_offset(kv_cache.shape[1]),
            logical_len=task.logical_len,
            reconstruction_attention=(task.reconstruction[layer_idx]
                                      if RECONSTRUCTION_ATTENTION in inputs
                                      and task.reconstruction is not None else None))
        return obs, keys, values


_UNRESOLVED = object()

#: The worker state with layer work in the current forward, or None (read by the attention
#: hook). Set only inside ``active_step`` (around the model forward) and cleared in its
#: ``finally``, as vLLM scopes its forward context: a forward outside a scheduled step (a
#: data-parallel dummy batch, a CUDA-graph capture) never sees a stale step.
ACTIVE_STEP: WorkerCompression | None = None


@contextlib.contextmanager
def active_step(state: WorkerCompression | None) -> Iterator[None]:
    """Makes ``state`` visible to the attention hook for one forward (if it has layer work)."""
    global ACTIVE_STEP
    ACTIVE_STEP = state if state is not None and state.has_layer_work else None
    try:
        yield
    finally:
        ACTIVE_STEP = None


def worker_state(runner: Any) -> Any:
    """The runner's compression state, created on first use (one per worker process)."""
    from ..server_config import KERNELS_KEY

    state = getattr(runner, "_kvcompress", None)
    if state is None:
        kernels = (runner.vllm_config.additional_config or {}).get(KERNELS_KEY)
        state = WorkerCompression(num_layers=len(runner.kv_caches),
                                  block_size=runner.cache_config.block_size, kernels=kernels,
                                  total_kv_heads=runner.model_config.get_total_num_kv_heads(),
                                  max_num_reqs=runner.input_batch.max_num_reqs)
        state.rotary = lambda: find_vllm_rotary(runner.get_model())
        runner._kvcompress = state
    return state
