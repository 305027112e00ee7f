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


def test_full_cuda_graph_is_never_replayed_on_a_step_with_compaction_work() -> None:
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor

    from vllm_kvcompress.engine.gpu_modes import must_run_eager

    uniform_decode = BatchDescriptor(num_tokens=64, num_reqs=64, uniform=True)
    assert uniform_decode.uniform  # what vLLM replays as a FULL graph
    for mode in CUDAGraphMode.valid_runtime_modes():
        assert must_run_eager(True, mode) == (mode == CUDAGraphMode.FULL)
        assert not must_run_eager(False, mode)


def test_dispatch_wrapper_forces_eager_only_with_work() -> None:
    """The V1 runner's dispatch, wrapped: a FULL decision with compaction work is redone with
    force_eager; without work the original decision stands."""
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    calls = []
    wrapped = GPUModelRunner._determine_batch_execution_and_padding

    def fake_original(self, *args, **kwargs):
        calls.append(kwargs.get("force_eager", False))
        mode = CUDAGraphMode.NONE if kwargs.get("force_eager") else CUDAGraphMode.FULL
        return mode, BatchDescriptor(num_tokens=8), False, None, None

    # The patch closes over the original; call it with a stand-in runner and original.
    closure = {c.cell_contents.__name__: c for c in wrapped.__closure__
               if callable(c.cell_contents) and hasattr(c.cell_contents, "__name__")}
    cell = next(c for name, c in closure.items()
                if name == "_determine_batch_execution_and_padding")
    real = cell.cell_contents
    cell.cell_contents = fake_original
    try:
        busy = SimpleNamespace(_kvcompress=SimpleNamespace(has_layer_work=True))
        idle = SimpleNamespace(_kvcompress=SimpleNamespace(has_layer_work=False))
        assert wrapped(busy, num_tokens=8)[0] == CUDAGraphMode.NONE
        assert calls == [False, True]
        calls.clear()
        assert wrapped(idle, num_tokens=8)[0] == CUDAGraphMode.FULL
        assert calls == [False]
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
