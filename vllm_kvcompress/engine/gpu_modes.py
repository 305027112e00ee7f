"""GPU engine modes made safe by construction (pure decisions; the wrappers are in
``vllm_patches``). Neither mode happens on CPU, so these are unit-tested on CPU against vLLM's
own types.

* **Async scheduling** (on by default on GPUs in vLLM 0.32): the scheduler plans step N+1 before
  step N's output arrives, so a request whose compaction failed in step N would keep a
  block-table row whose original blocks were already freed. Where compression can run on a GPU,
  async scheduling is turned off, with one log line.
* **Full CUDA graphs** (replayed for uniform decode batches, or any batch in ``FULL`` mode): a
  replayed graph never calls the plugin's per-layer hook, so a step that carries layer work
  (a compaction, or query-ring writes of decode-compressed requests) must not replay one. It is
  dispatched again with ``FULL`` excluded: vLLM's dispatcher then picks the step's PIECEWISE
  graph where one was captured (``FULL_AND_PIECEWISE``, vLLM's default), whose attention - and
  the hook after it - runs eagerly between the graph pieces, and eager mode otherwise.
  Cost: such a step loses the full graph's launch savings (on decode batches typically a few
  percent to ~20% of the step on small models; not measured here: no GPU). Steps without layer
  work keep their full graph; a decode-compressed request with a key-only policy (``knorm``,
  ``keydiff``, ``qfilters``, ``streamingllm``) brings layer work only on its compaction steps
  (every ``decode_interval`` tokens), one reading queries on every step (its window's queries
  must be recorded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def async_scheduling_override(is_cuda: bool, compression_possible: bool,
                              requested: bool | None) -> tuple[bool | None, str | None]:
    """The async-scheduling setting to use, and the log line when the plugin changed it.

    Args:
        is_cuda: the platform is an NVIDIA GPU.
        compression_possible: the engine path can evict on this platform (the GPU opt-in).
        requested: the user's ``async_scheduling`` (``None``: vLLM's default, on for GPUs).
    """
    if is_cuda and compression_possible and requested is not False:
        return False, ("vllm-kvcompress: async scheduling turned off (a compaction that fails "
                       "in step N must not leave freed blocks in a row step N+1 already uses)")
    return requested, None


def graph_modes_to_exclude(has_layer_work: bool, runtime_mode: Any) -> frozenset[Any]:
    """The CUDA-graph modes this step must be dispatched again without (empty: keep it).

    Args:
        has_layer_work: the step carries compaction or query-ring work for the hook.
        runtime_mode: the ``CUDAGraphMode`` vLLM's dispatcher chose for the step.
    """
    from vllm.config import CUDAGraphMode

    if has_layer_work and runtime_mode == CUDAGraphMode.FULL:
        return frozenset({CUDAGraphMode.FULL})
    return frozenset()


@contextlib.contextmanager
def excluding_graph_modes(dispatcher: Any, modes: frozenset[Any]) -> Iterator[None]:
    """While open, ``dispatcher.dispatch`` (vLLM's ``CudagraphDispatcher``) never returns one of
    ``modes``: they are added to the ``invalid_modes`` it already takes. Restored on exit."""
    original = dispatcher.dispatch

    def dispatch(*args: Any, invalid_modes: Any = None, **kwargs: Any) -> Any:
        return original(*args, invalid_modes=set(invalid_modes or ()) | set(modes), **kwargs)

    dispatcher.dispatch = dispatch
    try:
        yield
    finally:
        del dispatcher.dispatch  # the class's method again
