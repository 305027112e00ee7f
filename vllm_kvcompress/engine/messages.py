"""The typed messages between the scheduler (engine core) and the workers, one step at a time.

vLLM's own pattern for plugins that talk across that boundary is the KV connector's metadata
(scheduler -> worker) and output (worker -> scheduler), carried in declared dataclass fields.
The plugin follows it without occupying the KV-connector slot (users' real connectors keep it):
the scheduler's ``SchedulerOutput`` and the worker's ``ModelRunnerOutput`` are given subclasses
with one declared field each (``with_plan``, ``with_report``), picklable (plain types only), so
they cross the process boundary of the multiprocess executor unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import CompressionSpec


@dataclass(frozen=True)
class CompactionPlan:
    """One request's compaction in this step.

    Attributes:
        kept: tokens each layer keeps per KV head.
        source_len: tokens the request holds in its blocks after this step's forward (its
            physical length: the prompt at the end of a prefill, the compacted prefix plus the
            generated tokens on a decode step).
        evicted: logical minus physical length after this compaction (cumulative).
        src_blocks: the request's current block ids, in order.
        dst_blocks: ``cdiv(kept, block_size)`` block ids receiving the kept tokens.
        in_place: whether ``dst_blocks`` are the first blocks of ``src_blocks``.
        spec: the request's admitted settings (validated in the front end; pickled as a
            trusted spec, so the workers never re-parse or re-check them).
        kind: ``prompt`` (end of the first prefill), ``prefill`` (a prefill chunk leaving the
            request above ``prefill_budget``, or the prompt's end cut to it), ``decode`` (a
            decode step crossing ``decode_budget + decode_interval``) or ``resumed`` (end of
            the re-prefill after a preemption).
        keep_queries: whether the request's query ring outlives this compaction (later
            prefill chunks or decode steps score again).
    """

    kept: int
    source_len: int
    evicted: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    in_place: bool
    spec: CompressionSpec
    kind: str = "prompt"
    keep_queries: bool = False


@dataclass(frozen=True)
class StepPlan:
    """What the workers do for compression in one step.

    Attributes:
        compact: request id -> its compaction.
        stash: request id -> window size, for requests whose last ``window`` queries the
            workers keep (in their query ring) from this step: prefill chunks of a request
            that will be compressed with a policy that reads queries, and every step of a
            decode-compressed one.
        release: request ids whose query ring the workers drop now: a prompt-only request
            whose prefill ended without a compaction (skipped for lack of memory), so its
            recorded window queries will never be read.
        adopt: request id -> tokens evicted, for requests that start this step on a compressed
            prefix from the prefix cache (``reuse_prefix``): their first blocks hold the kept
            tokens of that prefix, so their block-table row starts with this offset between
            logical and physical positions, as if they had compacted themselves.
    """

    compact: dict[str, CompactionPlan] = field(default_factory=dict)
    stash: dict[str, int] = field(default_factory=dict)
    release: tuple[str, ...] = ()
    adopt: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.compact or self.stash or self.release or self.adopt)


@dataclass(frozen=True)
class WorkerReport:
    """What the workers tell the scheduler after a step.

    Attributes:
        failed: request ids whose compaction (or query keeping) failed (finished with an
            error).
        ring_pool_bytes: memory the query ring's pools hold now, all tensor-parallel ranks
            together, when it changed this step (else ``None``).
    """

    failed: tuple[str, ...] = ()
    ring_pool_bytes: int | None = None


#: Subclass name -> (module, vLLM base class, declared field). Built on first use (here or when
#: a worker process unpickles one: module ``__getattr__`` below), since vLLM imports lazily.
_CARRIERS = {
    "KVCompressSchedulerOutput": ("vllm.v1.core.sched.output", "SchedulerOutput", "kvcompress"),
    "KVCompressModelRunnerOutput": ("vllm.v1.outputs", "ModelRunnerOutput", "kvcompress_report"),
}


@functools.cache
def _carrier(name: str) -> type:
    module, base_name, field_name = _CARRIERS[name]
    base = getattr(importlib.import_module(module), base_name)
    return dataclasses.make_dataclass(name, [(field_name, Any, field(default=None))],
                                      bases=(base,), namespace={"__module__": __name__})


def __getattr__(name: str) -> type:  # PEP 562: lets pickle find the carriers by name
    if name in _CARRIERS:
        return _carrier(name)
    raise AttributeError(name)


def with_plan(output: Any, plan: StepPlan) -> Any:
    """``output`` (a ``SchedulerOutput``) as the subclass that declares ``kvcompress``."""
    output.__class__ = _carrier("KVCompressSchedulerOutput")
    output.kvcompress = plan
    return output


def plan_of(output: Any) -> StepPlan | None:
    """The step's plan, or ``None`` (a step scheduled without the plugin's scheduler)."""
    return getattr(output, "kvcompress", None)


def with_report(output: Any, report: WorkerReport) -> Any:
    """``output`` (a ``ModelRunnerOutput``) as the subclass that declares ``kvcompress_report``.

    Raises:
        TypeError: ``output`` is not a ``ModelRunnerOutput`` (an async output: the plugin turns
            async scheduling off where it compresses, so this is a bug, not a mode).
    """
    cls = _carrier("KVCompressModelRunnerOutput")
    if not isinstance(output, cls.__mro__[1]):
        raise TypeError(f"cannot report compaction failures on a {type(output).__name__}")
    # A shallow copy: vLLM returns shared constants (EMPTY_MODEL_RUNNER_OUTPUT) on some paths,
    # and a report must not stick to every later step that returns the same object.
    output = copy.copy(output)
    output.__class__ = cls
    output.kvcompress_report = report
    return output


def report_of(output: Any) -> WorkerReport | None:
    return getattr(output, "kvcompress_report", None)
