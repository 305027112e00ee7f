"""The scheduler/worker seam: typed messages in declared fields, freeing after planning."""

from __future__ import annotations

import dataclasses
import pickle
from types import SimpleNamespace
from typing import Any

from vllm_kvcompress.config import CompressionSpec
from vllm_kvcompress.engine import messages
from vllm_kvcompress.engine.scheduler_side import ManagerState, SchedulerCompression
from vllm_kvcompress.engine.stats import CompressionStats


def test_plan_and_report_ride_in_declared_fields_and_pickle() -> None:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ModelRunnerOutput

    plan = messages.StepPlan(
        compact={"a": messages.CompactionPlan(kept=70, source_len=300, evicted=230,
                                              src_blocks=(5, 9, 2),
                                              dst_blocks=(7, 8, 1), in_place=False,
                                              spec={"policy": "snapkv"})},
        stash={"b": 32}, release=("c",))
    fields = {f.name: f.default for f in dataclasses.fields(SchedulerOutput)}
    output = SchedulerOutput(**{name: default for name, default in fields.items()
                                if default is not dataclasses.MISSING} |
                             {name: None for name, default in fields.items()
                              if default is dataclasses.MISSING})
    carried = messages.with_plan(output, plan)
    assert isinstance(carried, SchedulerOutput)
    assert "kvcompress" in {f.name for f in dataclasses.fields(carried)}  # declared field
    again = pickle.loads(pickle.dumps(carried))
    assert messages.plan_of(again) == plan
    report = messages.WorkerReport(failed=("a",))
    runner_output = messages.with_report(
        ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}), report)
    assert messages.report_of(pickle.loads(pickle.dumps(runner_output))) == report
    assert not messages.StepPlan() and messages.plan_of(object()) is None
    assert messages.StepPlan(release=("c",))  # a release alone is work for the workers


class Pool:
    """A block pool that records the order of allocations and frees."""

    def __init__(self, free: int) -> None:
        self.free = list(range(100, 100 + free))
        self.events: list[tuple[str, list[int]]] = []

    def get_num_free_blocks(self) -> int:
        return len(self.free)

    def get_new_blocks(self, n: int) -> list[Any]:
        taken, self.free = self.free[:n], self.free[n:]
        self.events.append(("new", taken))
        return [SimpleNamespace(block_id=b, ref_cnt=1) for b in taken]

    def free_blocks(self, blocks: Any) -> None:
        ids = [b.block_id for b in blocks]
        self.events.append(("free", ids))
        self.free = ids + self.free  # freed blocks come back first (what could go wrong)


def test_blocks_are_freed_after_every_request_is_planned() -> None:
    """Two requests complete their prompts in one step: the second's destination blocks never
    include the first's originals (which this step's forward still reads)."""
    pool = Pool(free=6)
    manager = SimpleNamespace(
        kvc=ManagerState(),
        req_to_blocks={r: [SimpleNamespace(block_id=b, ref_cnt=1) for b in blocks]
                       for r, blocks in {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]}.items()})
    planner = SchedulerCompression(CompressionSpec(policy="snapkv", ratio=0.25, window=8),
                                   manager, pool, block_size=32, num_layers=2,
                                   stats=CompressionStats())
    requests = {r: SimpleNamespace(request_id=r, num_computed_tokens=128,
                                   num_prompt_tokens=128, num_output_tokens=0,
                                   sampling_params=None) for r in ("a", "b")}
    plan = planner.after_schedule(requests, {"a": 64, "b": 64})
    assert set(plan.compact) == {"a", "b"}
    sources = {b for job in plan.compact.values() for b in job.src_blocks}
    destinations = {b for job in plan.compact.values() for b in job.dst_blocks}
    assert not sources & destinations
    kinds = [kind for kind, _ in pool.events]
    assert kinds == ["new", "new", "free", "free"]
