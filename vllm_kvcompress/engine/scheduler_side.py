"""Engine-core side: decide, per request, when and how much to compress; free the blocks.

On the scheduler step whose chunk completes a request's prompt, a request with a policy gets
``kept = spec.kept_tokens(prompt_len)`` tokens (deterministic, so the workers agree without a
round trip). The scheduler then:

1. takes ``M = cdiv(kept, block_size)`` fresh blocks from the pool (never hashed),
2. makes them the request's blocks (the next step's allocations grow from them),
3. returns the original blocks to the pool *with their prefix-cache hashes intact*: full prompt
   blocks become evictable cache entries, so a follow-up turn on the same context can still hit
   the uncompressed prefix,
4. tells the workers (a typed ``StepPlan`` in ``SchedulerOutput.kvcompress``) to write each
   layer's kept tokens into the fresh blocks during this step's forward.

Freeing at the end of ``schedule()`` is safe although this step's forward still reads the old
blocks: a freed block can only be handed out by a later ``schedule()``, whose forward runs after
this one. When the pool cannot spare ``M`` blocks, the request is compacted in place into its own
first ``M`` blocks if none of them is shared (their cache hashes are dropped first, since their
content changes); otherwise it keeps its full KV for now (counted as skipped).

After compression the request's manager allocates by *physical* length (logical minus evicted)
and never hashes its blocks (their content no longer matches the token hashes).

Decode-time compression (``decode_budget``): the same move, on a decode step whose physical
length reaches ``decode_budget + decode_interval`` (source: the request's current blocks and
length, kept: ``decode_budget``) and at the end of a re-prefill after preemption; evicted counts
accumulate. ``CompressionSpec.compaction_target`` is the rule.

Compress once, reuse (``reuse_prefix: on``, ``prefix_reuse.py``): a request's prompt-end
compaction is published to the prefix cache once its step has run (``publish_written``); a later
request with the same settings whose prompt starts with a published context takes it as a prefix
hit (``compressed_prefix_hit``): its first blocks are the shared compressed ones, its evicted
count is ``context_len - kept`` from the start (the workers adopt it: ``StepPlan.adopt``), and
its own tokens are never compressed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..admission import admitted_spec
from ..config import CompressionSpec
from .messages import CompactionPlan, StepPlan, WorkerReport
from .prefix_reuse import CompressedPrefixes, context_anchor, context_key
from .stats import CompressionStats

logger = logging.getLogger("vllm.kvcompress")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class DecodeTrack:
    """What a decode step of a decode-compressed request needs, resolved once.

    Attributes:
        spec: the request's settings (for the compaction plan).
        limit: ``decode_budget + decode_interval``: compact when the request holds this many.
        window: queries its workers keep per layer (0 for a key-only policy: no ring).
    """

    spec: CompressionSpec
    limit: int
    window: int


@dataclass(frozen=True)
class Publication:
    """A compressed prompt to publish once the step that writes it has run.

    Attributes:
        key: ``prefix_reuse.context_key`` of the prompt under the request's settings.
        anchor: ``prefix_reuse.context_anchor`` of the prompt.
        context_len: the prompt's length.
        kept: tokens its compacted blocks hold.
        blocks: those blocks (vLLM ``KVCacheBlock`` objects), in order.
    """

    key: bytes
    anchor: bytes
    context_len: int
    kept: int
    blocks: tuple[Any, ...]


@dataclass
class ManagerState:
    """What the compressed-KV manager adds to vLLM's full-attention manager.

    Attributes:
        evicted: request id -> tokens evicted (logical length minus physical length),
            cumulative over the request's compactions.
        no_cache: request ids whose blocks must never be hashed into the prefix cache.
        decoding: request id -> its ``DecodeTrack``, for requests with decode-time
            compression whose (re-)prefill has completed: the decode steps check these only,
            with plain integers (no spec lookups per step).
        settled: preempted-and-resumed request ids whose re-prefill has been handled.
        ring_queries: request id -> queries per layer its workers keep (its ``window``), for
            decode-compressed requests with a query-reading policy (the query ring's memory).
        reused: request id -> logical length of the compressed prefix it started on (a prefix
            hit under ``reuse_prefix``); such a request is never compacted.
        adopting: reused requests whose workers have not been told their evicted count yet.
        publishing: request id -> its compacted prompt, published after this step's forward.
    """

    evicted: dict[str, int] = field(default_factory=dict)
    no_cache: set[str] = field(default_factory=set)
    decoding: dict[str, DecodeTrack] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)
    ring_queries: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    adopting: set[str] = field(default_factory=set)
    publishing: dict[str, Publication] = field(default_factory=dict)
    #: Called when ``ring_queries`` loses a request (the planner reports the new total).
    on_ring_change: Callable[[], None] | None = None

    def forget(self, request_id: str) -> None:
        """The request's blocks are freed (finish, abort or preemption)."""
        self.evicted.pop(request_id, None)
        self.no_cache.discard(request_id)
        self.decoding.pop(request_id, None)
        self.settled.discard(request_id)
        self.forget_hit(request_id)
        self.publishing.pop(request_id, None)
        if self.ring_queries.pop(request_id, None) is not None and self.on_ring_change:
            self.on_ring_change()

    def forget_hit(self, request_id: str) -> None:
        """Drops what a compressed prefix hit set (a waiting request looks up again)."""
        if self.reused.pop(request_id, None) is not None:
            self.evicted.pop(request_id, None)
            self.no_cache.discard(request_id)
        self.adopting.discard(request_id)


def make_compressed_manager_class(base: type) -> type:
    """A subclass of vLLM's ``FullAttentionManager`` that allocates by physical length.

    Built at run time so this module imports without vLLM. Instances are converted in place
    (``__class__`` swap, then ``kvc`` is attached) because the coordinator constructs them.
    """

    class CompressedFullAttentionManager(base):  # type: ignore[misc, valid-type]
        kvc: ManagerState

        def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                       new_computed_blocks: Any, total_computed_tokens: int,
                                       num_local_computed_tokens: int, *args: Any,
                                       **kwargs: Any) -> int:
            # Physical counts throughout: a compressed prefix hit's last block is partial (and
            # copied on write) when its kept count, not its logical length, ends inside it.
            evicted = self.kvc.evicted.get(request_id, 0)
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens - evicted, new_computed_blocks,
                total_computed_tokens - evicted, num_local_computed_tokens - evicted, *args,
                **kwargs)

        def add_local_computed_blocks(self, request_id: str, new_computed_blocks: Any,
                                      num_local_computed_tokens: int, *args: Any,
                                      **kwargs: Any) -> None:
            evicted = self.kvc.evicted.get(request_id, 0)
            super().add_local_computed_blocks(request_id, new_computed_blocks,
                                              num_local_computed_tokens - evicted, *args,
                                              **kwargs)

        def allocate_new_blocks(self, request_id: str, num_tokens: int,
                                num_tokens_main_model: int, *args: Any, **kwargs: Any) -> list:
            evicted = self.kvc.evicted.get(request_id, 0)
            return super().allocate_new_blocks(request_id, num_tokens - evicted,
                                               num_tokens_main_model - evicted, *args, **kwargs)

        def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
            if request.request_id in self.kvc.no_cache:
                return
            super().cache_blocks(request, num_tokens, *args, **kwargs)

        def pop_blocks_for_free(self, request_id: str, *args: Any, **kwargs: Any) -> list:
            # The one exit for finish, abort and preemption: forget the request here.
            self.kvc.forget(request_id)
            return super().pop_blocks_for_free(request_id, *args, **kwargs)

    return CompressedFullAttentionManager


class SchedulerCompression:
    """Per-scheduler state and the post-``schedule()`` planning step.

    Args:
        server_spec: the server default (``additional_config["kvcompress"]``).
        manager: the request-to-blocks manager (already converted, with ``kvc`` attached).
        block_pool: vLLM's block pool.
        block_size: tokens per block.
        num_layers: attention layers of the model (for per-layer budgets).
        stats: counters shared with the metrics exporter.
        query_bytes: bytes one kept query takes in every layer, all tensor-parallel ranks
            together (``num_layers * num_q_heads * head_size * dtype size``), for the query
            ring's reported memory.
        chunk: the most tokens one prefill step computes (``max_num_batched_tokens``).
        prefixes: the published compressed prefixes (``None``: prefix caching is off, so
            ``reuse_prefix`` publishes and finds nothing).
    """

    def __init__(self, server_spec: CompressionSpec, manager: Any, block_pool: Any,
                 block_size: int, num_layers: int, stats: CompressionStats,
                 query_bytes: int = 0, chunk: int = 8192,
                 prefixes: CompressedPrefixes | None = None) -> None:
        self.server_spec = server_spec
        self.manager = manager
        self.block_pool = block_pool
        self.block_size = block_size
        self.num_layers = num_layers
        self.stats = stats
        self.query_bytes = query_bytes
        #: Tokens per prefill chunk at most (``max_num_batched_tokens``).
        self.chunk = chunk
        self.prefixes = prefixes
        manager.kvc.on_ring_change = self.report_ring

    def report_ring(self) -> None:
        """Publishes the query ring's memory (``query_ring_bytes``) when it changed."""
        ring_bytes = sum(self.manager.kvc.ring_queries.values()) * self.query_bytes
        if ring_bytes != self.stats.query_ring_bytes:
            self.stats.query_ring_bytes = ring_bytes
            self.stats.flush()

    def on_report(self, report: WorkerReport, requests: dict[str, Any]) -> list[str]:
        """Takes the workers' report of a step: counts failures and the query ring's pool
        memory; returns the failed requests still live (vLLM finishes them with an error)."""
        live = [req_id for req_id in report.failed if req_id in requests]
        if live:
            self.stats.record_failed(len(live))
        if report.ring_pool_bytes is not None:
            self.stats.query_ring_pool_bytes = report.ring_pool_bytes
            self.stats.flush()
        return live

    def physical_kept(self, spec: CompressionSpec, prompt_len: int) -> int | None:
        """Tokens every layer keeps in the paged cache (the largest layer budget)."""
        kept = spec.kept_tokens(prompt_len)
        if kept is None:
            return None
        from ..policies.registry import build_policy

        policy = build_policy(spec)
        protected = min(spec.sink_tokens + spec.window, prompt_len)
        largest = max(policy.layer_budget(kept, layer, self.num_layers, prompt_len, protected)
                      for layer in range(self.num_layers))
        return largest if largest < prompt_len else None

    def request_spec(self, request: Any) -> CompressionSpec:
        """The spec the front end admitted for this request (or the server default), read
        once per request: nothing client-set is parsed or validated in the engine core."""
        spec = getattr(request, "_kvcompress_spec", None)
        if spec is None:
            params = request.sampling_params
            spec = admitted_spec(params.extra_args if params is not None else None,
                                 self.server_spec)
            request._kvcompress_spec = spec
        return spec

    def admits(self, request: Any, free_blocks: int) -> bool | None:
        """Admission by compressed size: whether the pool's ``free_blocks`` hold what a waiting
        request that compresses while prefilling needs at its peak (``prefill_budget`` + one
        chunk), or ``None`` when vLLM's own full-prompt check applies (no budget, or a prompt
        that fits within budget + chunk anyway)."""
        spec = self.request_spec(request)
        if not spec.enabled or spec.prefill_budget is None:
            return None
        peak = spec.prefill_budget + self.chunk
        if request.num_tokens <= peak:
            return None
        return cdiv(peak, self.block_size) <= free_blocks

    def max_cache_hit_blocks(self, request: Any) -> int | None:
        """Most prefix-cache hit blocks a request may take, or ``None`` for no limit.

        A request that will be compressed with a scoring policy (at the end of its prompt, or
        later while decoding) needs its window's queries, which exist only for tokens computed
        in this prefill, so the window is never taken from cache. That holds for the re-prefill
        of a preempted decode-compressed request too (prompt and outputs: its uncompressed
        prompt blocks may still be cached), which would otherwise reach its next compaction
        with fewer than ``window`` queries.

        A request that compresses while prefilling (``prefill_budget = P``) takes at most its
        first ``P`` tokens from cache, whatever its policy, and only whole chunks of them: a
        longer hit would hold more than ``P`` + one chunk (the footprint it was admitted by) and
        would skip the cuts the uncached prefill makes (an end-of-prompt selection instead);
        whole chunks keep the chunk ends, so a request prefilled alone cuts where it would have
        on a cold cache and keeps the same tokens. One no longer than ``P`` is never cut while
        prefilling: the rules above apply to it.
        """
        spec = self.request_spec(request)
        end = request.num_tokens if request.num_output_tokens > 0 else request.num_prompt_tokens
        if spec.enabled and spec.prefill_budget is not None and end > spec.prefill_budget:
            limit = spec.prefill_budget
            if self.needs_queries(spec):
                limit = min(limit, max(end - spec.window, 0))
            return limit // self.chunk * self.chunk // self.block_size
        if not spec.enabled or not self.needs_queries(spec):
            return None
        if request.num_output_tokens > 0:  # resumed after a preemption
            if spec.decode_budget is None and spec.prefill_budget is None:
                return None  # its prompt was compressed once; it is not compressed again
            end = request.num_tokens
        else:
            end = request.num_prompt_tokens
            if spec.decode_budget is None and spec.prefill_budget is None and \
                    self.physical_kept(spec, end) is None:
                return None
        return max(end - spec.window, 0) // self.block_size

    def compressed_prefix_hit(self, request: Any, limit: int) -> tuple[list[Any], int] | None:
        """A waiting request's hit on a published compressed prefix (``reuse_prefix: on``):
        ``(blocks, logical tokens computed)``, or ``None`` (vLLM's own lookup then runs).

        On a hit the request is set up as if it had compacted that prefix itself: ``evicted``
        is ``context_len - kept`` (the manager allocates by physical length, a partial last
        block is copied on write), its blocks are never hashed, and its own tokens are never
        compacted. Called on every lookup of a waiting request, so an earlier hit that was not
        scheduled is replaced.

        Args:
            request: a waiting vLLM ``Request`` (nothing computed, no blocks).
            limit: the longest hit allowed (``num_tokens - 1``: the last token is computed).
        """
        if self.prefixes is None:
            return None
        state = self.manager.kvc
        state.forget_hit(request.request_id)
        spec = self.request_spec(request)
        if not spec.enabled or spec.reuse_prefix != "on" or not self.prefixes:
            return None
        found = self.prefixes.find(request, spec.key(), limit)
        if found is None:
            return None
        prefix, blocks = found
        req_id = request.request_id
        state.reused[req_id] = prefix.context_len
        state.adopting.add(req_id)
        state.evicted[req_id] = prefix.context_len - prefix.kept
        state.no_cache.add(req_id)
        return blocks, prefix.context_len

    def publish_written(self, report: WorkerReport | None) -> None:
        """After a step's forward: publishes the prompts it compacted under ``reuse_prefix``,
        except those whose compaction failed (their blocks are half written)."""
        state = self.manager.kvc
        if not state.publishing:
            return
        failed = set(report.failed) if report is not None else set()
        pending, state.publishing = state.publishing, {}
        for req_id, publication in pending.items():
            held = tuple(self.manager.req_to_blocks.get(req_id) or ())
            written = held[:len(publication.blocks)]
            if req_id in failed or len(written) < len(publication.blocks) or any(
                    a is not b for a, b in zip(written, publication.blocks, strict=True)):
                continue
            if self.prefixes.publish(publication.key, publication.anchor,
                                     publication.context_len, publication.kept,
                                     publication.blocks):
                self.stats.record_published()

    @staticmethod
    def needs_queries(spec: CompressionSpec) -> bool:
        """Whether the spec's policy reads the window's queries (cached per spec)."""
        from ..policies.base import needs_queries
        from ..policies.registry import build_policy

        policy = build_policy(spec)
        return policy is not None and needs_queries(policy)

    def after_schedule(self, requests: dict[str, Any],
                       num_scheduled_tokens: dict[str, int]) -> StepPlan:
        """Plans this step's compactions and frees the replaced blocks (after planning every
        request, so no block freed here can become another request's destination in the same
        step). Returns the message for the workers (falsy when there is nothing to do).

        Three moments compact a request: the end of its first prefill (the prompt policy, or
        ``decode_budget`` if that is smaller), a decode step on which its physical length
        reaches ``decode_budget + decode_interval`` (down to ``decode_budget``), and the end of
        the re-prefill after a preemption (down to ``decode_budget``, so a request does not
        regrow under the memory pressure that preempted it).
        """
        state = self.manager.kvc
        compact: dict[str, CompactionPlan] = {}
        stash: dict[str, int] = {}
        release: list[str] = []
        adopt: dict[str, int] = {}
        to_free: list[list[Any]] = []
        for req_id, n_new in num_scheduled_tokens.items():
            request = requests.get(req_id)
            if request is None:
                continue
            if req_id in state.reused:
                # Started on a published compressed prefix: its own tokens stay whole.
                if req_id in state.adopting:
                    state.adopting.discard(req_id)
                    adopt[req_id] = state.evicted[req_id]
                    self.stats.record_reuse(state.reused[req_id])
                continue
            after = request.num_computed_tokens
            decoding = state.decoding.get(req_id)
            if decoding is not None:
                self._plan_decode_step(req_id, after, decoding, compact, stash, to_free)
                continue
            prompt_len = request.num_prompt_tokens
            if after - n_new >= prompt_len and (not request.num_preemptions
                                                or req_id in state.settled):
                continue  # decode step without decode-time compression: the common case, cheap
            resumed = request.num_output_tokens > 0
            spec = self.request_spec(request)
            if not spec.enabled:
                state.settled.add(req_id)
                continue
            end = request.num_tokens if resumed else prompt_len
            if after < end:
                if self._will_compress(spec, end, resumed) and self.needs_queries(spec):
                    stash[req_id] = spec.window
                if spec.prefill_budget is not None:  # a re-prefill after preemption too
                    self._plan_prefill_chunk(req_id, after, spec, compact, to_free)
                continue
            # This step completes the (re-)prefill.
            state.settled.add(req_id)
            # What the request holds now: earlier prefill chunks may have been compacted.
            physical_end = end - state.evicted.get(req_id, 0)
            if resumed:
                prompt_kept = None
                kept = spec.prompt_end_target(physical_end, None)
                if kept is None and spec.decode_budget is None:
                    self.stats.skipped_resumed += 1
            else:
                prompt_kept = self.physical_kept(spec, prompt_len)
                kept = spec.prompt_end_target(physical_end, prompt_kept)
                if kept is None and physical_end == prompt_len:
                    self.stats.not_compressed_short += 1
            if spec.decode_budget is not None:
                window = spec.window if self.needs_queries(spec) else 0
                state.decoding[req_id] = DecodeTrack(
                    spec, spec.decode_budget + spec.decode_interval, window)
                if window:
                    stash[req_id] = window
                    state.ring_queries[req_id] = window
            if kept is not None:
                kind = "resumed" if resumed else (
                    "prompt" if kept == prompt_kept else
                    "prefill" if kept == spec.prefill_budget else "decode")
                plan = self._move_to_compact_blocks(req_id, physical_end, kept, spec, to_free,
                                                    kind)
                if plan is not None:
                    compact[req_id] = plan
                    if self.needs_queries(spec):
                        stash[req_id] = spec.window
                    if (kind == "prompt" and spec.reuse_prefix == "on"
                            and self.prefixes is not None and physical_end == prompt_len):
                        hash_block = self.prefixes.hash_block_size
                        state.publishing[req_id] = Publication(
                            context_key(request, prompt_len, spec.key(), hash_block),
                            context_anchor(request, prompt_len, hash_block),
                            prompt_len, kept, tuple(self.manager.req_to_blocks[req_id]))
                elif spec.decode_budget is None and self.needs_queries(spec):
                    # Prompt-only and skipped for lack of memory: nothing will read the window
                    # queries its earlier chunks recorded; the workers drop them now rather than
                    # when the request finishes.
                    release.append(req_id)
        for blocks in to_free:
            self.block_pool.free_blocks(reversed(blocks))
        self.report_ring()
        return StepPlan(compact, stash, tuple(release), adopt)

    def _will_compress(self, spec: CompressionSpec, end: int, resumed: bool) -> bool:
        """Whether a request in a non-final prefill chunk may be compacted later (its window
        queries are then kept)."""
        if spec.decode_budget is not None or spec.prefill_budget is not None:
            return True
        return not resumed and self.physical_kept(spec, end) is not None

    def _plan_prefill_chunk(self, req_id: str, after: int, spec: CompressionSpec,
                            compact: dict[str, CompactionPlan], to_free: list[list[Any]]
                            ) -> None:
        """A prefill chunk that is not the prompt's last: compact to ``prefill_budget`` when the
        request holds more (``CompressionSpec.prefill_target``); its queries are stashed."""
        physical = after - self.manager.kvc.evicted.get(req_id, 0)
        kept = spec.prefill_target(physical)
        if kept is None:
            return
        plan = self._move_to_compact_blocks(req_id, physical, kept, spec, to_free, "prefill",
                                            mid_prompt=True)
        if plan is not None:
            compact[req_id] = plan

    def _plan_decode_step(self, req_id: str, after: int, track: DecodeTrack,
                          compact: dict[str, CompactionPlan], stash: dict[str, int],
                          to_free: list[list[Any]]) -> None:
        """A decode step of a decode-compressed request: compact when it reaches the limit
        (``compaction_target``'s decode rule, on the integers resolved in ``track``)."""
        physical = after - self.manager.kvc.evicted.get(req_id, 0)
        if track.window:
            stash[req_id] = track.window
        if physical < track.limit:
            return
        spec = track.spec
        plan = self._move_to_compact_blocks(req_id, physical, spec.decode_budget, spec, to_free,
                                            "decode")
        if plan is not None:
            compact[req_id] = plan

    def _move_to_compact_blocks(self, req_id: str, source_len: int, kept: int,
                                spec: CompressionSpec, to_free: list[list[Any]], kind: str,
                                mid_prompt: bool = False) -> CompactionPlan | None:
        manager = self.manager
        old = manager.req_to_blocks.get(req_id)
        if not old:
            return None
        num_kept_blocks = cdiv(kept, self.block_size)
        own = all(block.ref_cnt == 1 for block in old[:num_kept_blocks])
        # An already compacted request's blocks are never hashed, so nothing is lost by
        # compacting them in place, and the pool lends no fresh blocks for the step (later
        # prefill cuts and decode-time compactions). A first compaction copies into fresh
        # blocks when it can, so the originals stay valid in the prefix cache.
        reuse = own and req_id in manager.kvc.no_cache
        if not reuse and self.block_pool.get_num_free_blocks() >= num_kept_blocks:
            fresh = self.block_pool.get_new_blocks(num_kept_blocks)
            to_free_now = old
            in_place = False
        elif own:
            fresh = old[:num_kept_blocks]
            # Their content is about to change: they must stop answering for their tokens.
            self.block_pool.evict_blocks({block.block_id for block in fresh})
            to_free_now = old[num_kept_blocks:]
            in_place = True
        else:
            # A decode-compressed request tries again on its next step.
            self.stats.skipped_no_memory += 1
            return None
        manager.req_to_blocks[req_id] = list(fresh)
        evicted = manager.kvc.evicted.get(req_id, 0) + source_len - kept
        manager.kvc.evicted[req_id] = evicted
        manager.kvc.no_cache.add(req_id)
        to_free.append(list(to_free_now))
        freed = len(old) - num_kept_blocks
        if kind == "prompt":
            self.stats.record(source_len, kept, blocks_freed=freed)
        elif kind == "prefill":
            self.stats.record_prefill(source_len, kept, blocks_freed=freed)
        else:
            self.stats.record_decode(source_len, kept, blocks_freed=freed,
                                     resumed=kind == "resumed")
        logger.debug("vllm-kvcompress: %s (%s) keeps %d of %d tokens, %d -> %d blocks%s",
                     req_id, kind, kept, source_len, len(old), num_kept_blocks,
                     " (in place)" if in_place else "")
        return CompactionPlan(kept=kept, source_len=source_len, evicted=evicted,
                              src_blocks=tuple(block.block_id for block in old),
                              dst_blocks=tuple(block.block_id for block in fresh),
                              in_place=in_place, spec=spec, kind=kind,
                              keep_queries=mid_prompt or spec.decode_budget is not None)


def install_scheduler_compression(scheduler: Any) -> None:
    """Converts a new vLLM ``Scheduler``'s full-attention manager and attaches the planner
    (``scheduler._kvcompress``), or leaves compression off with one log line; a server default
    policy where compression cannot run stops the engine with one line.

    Raises:
        SystemExit: a server default policy on a deployment that cannot compress.
    """
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    from ..deployment import deployment_unsupported_reason
    from ..server_config import RUNTIME_KEY, server_spec

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
    model = vllm_config.model_config
    query_bytes = (num_layers * model.model_arch_config.total_num_attention_heads
                   * model.get_head_size()
                   * model.dtype.itemsize)
    block_pool = scheduler.kv_cache_manager.block_pool
    prefixes = (CompressedPrefixes(block_pool, manager.block_size, manager.kv_cache_group_id)
                if block_pool.enable_caching else None)
    scheduler._kvcompress = SchedulerCompression(
        spec, manager, block_pool, scheduler.block_size, num_layers,
        stats, query_bytes, chunk=vllm_config.scheduler_config.max_num_batched_tokens,
        prefixes=prefixes)
    scheduler.kv_cache_manager._kvcompress_hit_cap = scheduler._kvcompress.max_cache_hit_blocks
    scheduler.kv_cache_manager._kvcompress_admission = scheduler._kvcompress.admits
    scheduler.kv_cache_manager._kvcompress_reuse = scheduler._kvcompress.compressed_prefix_hit
