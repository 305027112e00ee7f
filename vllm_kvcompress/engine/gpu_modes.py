"""GPU engine modes made safe by construction (pure decisions; the wrappers are in
``vllm_patches``). Neither mode happens on CPU, so these are unit-tested on CPU against vLLM's
own types.

* **Async scheduling** (on by default on GPUs in vLLM 0.32): the scheduler plans step N+1 before
  step N's output arrives, so a request whose compaction failed in step N would keep a
  block-table row whose original blocks were already freed. Where compression can run on a GPU,
  async scheduling is turned off, with one log line.
* **Full CUDA graphs** (replayed for uniform decode batches, or any batch in ``FULL`` mode): a
  replayed graph never calls the plugin's per-layer hook, so a step that carries compaction work
  must not replay one; it is dispatched again with ``force_eager``. Piecewise graphs leave
  attention (and the hook after it) outside the graph, so they are fine.
"""

from __future__ import annotations

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


def must_run_eager(has_layer_work: bool, runtime_mode: Any) -> bool:
    """Whether this step must be dispatched again with ``force_eager``.

    Args:
        has_layer_work: the step carries compaction (or window-stash) work for the hook.
        runtime_mode: the ``CUDAGraphMode`` vLLM's dispatcher chose for the step.
    """
    from vllm.config import CUDAGraphMode

    return has_layer_work and runtime_mode == CUDAGraphMode.FULL
