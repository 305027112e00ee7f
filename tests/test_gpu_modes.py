"""GPU engine modes, decided by pure functions tested on CPU against vLLM's own types (no
machine here runs vLLM on a GPU): async scheduling off where compression runs on a GPU; a step
with compaction work never replays a full CUDA graph; the hook sees a step only inside the
model forward."""

from __future__ import annotations

import pytest

from vllm_kvcompress import plugin

plugin.register()


@pytest.mark.parametrize(("is_cuda", "possible", "requested", "want", "logged"), [
    (True, True, None, False, True),     # vLLM's GPU default (on) is turned off, with a line
    (True, True, True, False, True),     # an explicit --async-scheduling too
    (True, True, False, False, False),   # already off: nothing to say
    (True, False, None, None, False),    # GPU without the opt-in: compression cannot run there
    (False, True, None, None, False),    # CPU: vLLM forces it off itself
])
def test_async_scheduling_override(is_cuda: bool, possible: bool, requested: bool | None,
                                   want: bool | None, logged: bool) -> None:
    from vllm_kvcompress.engine.gpu_modes import async_scheduling_override

    value, line = async_scheduling_override(is_cuda, possible, requested)
    assert value == want and (line is not None) == logged


def test_full_cuda_graph_is_never_replayed_on_a_step_with_layer_work() -> None:
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor

    from vllm_kvcompress.engine.gpu_modes import graph_modes_to_exclude

    uniform_decode = BatchDescriptor(num_tokens=64, num_reqs=64, uniform=True)
    assert uniform_decode.uniform  # what vLLM replays as a FULL graph
    for mode in CUDAGraphMode.valid_runtime_modes():
        expected = {CUDAGraphMode.FULL} if mode == CUDAGraphMode.FULL else set()
        assert graph_modes_to_exclude(True, mode) == expected
        assert not graph_modes_to_exclude(False, mode)


def fake_dispatcher(captured: set) -> object:
    """vLLM's own ``CudagraphDispatcher.dispatch`` on a stand-in with graphs captured for
    ``captured`` modes (a uniform decode batch of 8 tokens)."""
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    class Dispatcher(CudagraphDispatcher):
        def __init__(self) -> None:  # no vllm_config: only what dispatch reads
            self.keys_initialized = True
            self.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
            self.compilation_config = SimpleNamespace(max_cudagraph_capture_size=64)
            self.specialize_lora_count = False
            full = BatchDescriptor(num_tokens=8, num_reqs=8, uniform=True)
            self.cudagraph_keys = {
                CUDAGraphMode.FULL: {full} if CUDAGraphMode.FULL in captured else set(),
                CUDAGraphMode.PIECEWISE: ({BatchDescriptor(num_tokens=8)}
                                          if CUDAGraphMode.PIECEWISE in captured else set())}

        def _create_padded_batch_descriptor(self, num_tokens, uniform, has_lora, loras):
            return BatchDescriptor(num_tokens=8, num_reqs=8 if uniform else None,
                                   uniform=uniform)

    return Dispatcher()


def test_a_step_with_layer_work_runs_piecewise_where_captured_else_eager() -> None:
    """vLLM's dispatcher, with FULL excluded by the plugin: PIECEWISE (attention and the hook
    run eagerly between graph pieces) when captured, else NONE; restored afterwards."""
    from vllm.config import CUDAGraphMode

    from vllm_kvcompress.engine.gpu_modes import excluding_graph_modes

    both = fake_dispatcher({CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE})
    assert both.dispatch(num_tokens=8, uniform_decode=True)[0] == CUDAGraphMode.FULL
    with excluding_graph_modes(both, frozenset({CUDAGraphMode.FULL})):
        assert both.dispatch(num_tokens=8, uniform_decode=True,
                             invalid_modes=None)[0] == CUDAGraphMode.PIECEWISE
    assert both.dispatch(num_tokens=8, uniform_decode=True)[0] == CUDAGraphMode.FULL
    full_only = fake_dispatcher({CUDAGraphMode.FULL})
    with excluding_graph_modes(full_only, frozenset({CUDAGraphMode.FULL})):
        assert full_only.dispatch(num_tokens=8, uniform_decode=True)[0] == CUDAGraphMode.NONE


def test_dispatch_wrapper_excludes_full_graphs_only_with_work() -> None:
    """The V1 runner's dispatch, wrapped: a FULL decision with layer work is redone with FULL
    excluded on the runner's dispatcher; without work the original decision stands."""
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    calls = []
    wrapped = GPUModelRunner._determine_batch_execution_and_padding

    def fake_original(self, *args, **kwargs):
        mode = self.cudagraph_dispatcher.dispatch(num_tokens=8, uniform_decode=True,
                                                  invalid_modes=None)[0]
        calls.append(mode)
        return mode, BatchDescriptor(num_tokens=8), False, None, None

    # The patch closes over the original; call it with a stand-in runner and original.
    closure = {c.cell_contents.__name__: c for c in wrapped.__closure__
               if callable(c.cell_contents) and hasattr(c.cell_contents, "__name__")}
    cell = next(c for name, c in closure.items()
                if name == "_determine_batch_execution_and_padding")
    real = cell.cell_contents
    cell.cell_contents = fake_original
    try:
        dispatcher = fake_dispatcher({CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE})
        busy = SimpleNamespace(_kvcompress=SimpleNamespace(has_layer_work=True),
                               cudagraph_dispatcher=dispatcher)
        idle = SimpleNamespace(_kvcompress=SimpleNamespace(has_layer_work=False),
                               cudagraph_dispatcher=dispatcher)
        assert wrapped(busy, num_tokens=8)[0] == CUDAGraphMode.PIECEWISE
        assert calls == [CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE]
        calls.clear()
        assert wrapped(idle, num_tokens=8)[0] == CUDAGraphMode.FULL
        assert calls == [CUDAGraphMode.FULL]
    finally:
        cell.cell_contents = real


def test_active_step_is_scoped_to_the_forward() -> None:
    from types import SimpleNamespace

    from vllm_kvcompress.engine import worker_side

    busy = SimpleNamespace(has_layer_work=True)
    with worker_side.active_step(busy):
        assert worker_side.ACTIVE_STEP is busy
    assert worker_side.ACTIVE_STEP is None
    with pytest.raises(RuntimeError), worker_side.active_step(busy):
        raise RuntimeError("forward failed")
    assert worker_side.ACTIVE_STEP is None  # cleared in finally
    with worker_side.active_step(SimpleNamespace(has_layer_work=False)):
        assert worker_side.ACTIVE_STEP is None
