"""The scheduler's decode-time decisions, pure (fake pool, manager and requests; no engine)."""

from __future__ import annotations

from types import SimpleNamespace

from admitted import admitted_args

from vllm_kvcompress.config import CompressionSpec
from vllm_kvcompress.engine.scheduler_side import ManagerState, SchedulerCompression
from vllm_kvcompress.engine.stats import CompressionStats

BLOCK = 16
#: Prefill chunk (``max_num_batched_tokens``) of the planner under test.
CHUNK = 32


class FakePool:
    """The slice of vLLM's BlockPool the planner uses."""

    def __init__(self, size: int) -> None:
        self.free = [SimpleNamespace(block_id=i, ref_cnt=0) for i in range(size)]
        self.evicted: set[int] = set()

    def get_num_free_blocks(self) -> int:
        return len(self.free)

    def get_new_blocks(self, n: int) -> list:
        taken, self.free = self.free[:n], self.free[n:]
        for block in taken:
            block.ref_cnt = 1
        return taken

    def free_blocks(self, blocks) -> None:
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free.append(block)

    def evict_blocks(self, ids: set[int]) -> None:
        self.evicted |= ids


def planner(pool: FakePool, **server: object) -> SchedulerCompression:
    manager = SimpleNamespace(req_to_blocks={}, kvc=ManagerState())
    return SchedulerCompression(CompressionSpec(**server), manager, pool, BLOCK, num_layers=2,
                                stats=CompressionStats(), query_bytes=1000, chunk=CHUNK)


def request(req_id: str, prompt: int, xargs: dict | None = None) -> SimpleNamespace:
    """A request as the engine core sees it: its kv_* keys admitted by a front end."""
    return SimpleNamespace(request_id=req_id, num_prompt_tokens=prompt, num_computed_tokens=0,
                           num_output_tokens=0, num_preemptions=0, num_tokens=prompt,
                           sampling_params=SimpleNamespace(extra_args=admitted_args(xargs)))


def step(plan: SchedulerCompression, req: SimpleNamespace, n_new: int) -> object:
    """One scheduler step of ``n_new`` tokens: allocate as vLLM would (physical length), plan."""
    manager = plan.manager
    req.num_computed_tokens += n_new
    held = req.num_computed_tokens - manager.kvc.evicted.get(req.request_id, 0)
    blocks = manager.req_to_blocks.setdefault(req.request_id, [])
    need = -(-held // BLOCK) - len(blocks)
    if need > 0:
        blocks += plan.block_pool.get_new_blocks(need)
    result = plan.after_schedule({req.request_id: req}, {req.request_id: n_new})
    if req.num_computed_tokens >= req.num_tokens:  # a token was sampled
        req.num_output_tokens += 1
        req.num_tokens += 1
    return result


DECODE = {"kv_policy": "snapkv", "kv_window": 16, "kv_decode_budget": 100,
          "kv_decode_interval": 24}


def test_decode_steps_compact_at_the_limit_and_evicted_accumulates() -> None:
    pool = FakePool(64)
    plan = planner(pool)
    req = request("r", 90, DECODE)
    first = step(plan, req, 90)  # prefill: 90 < 124, kept whole, tracked, window recorded
    assert not first.compact and first.stash == {"r": 16}
    assert "r" in plan.manager.kvc.decoding
    compactions = []
    for _ in range(60):
        out = step(plan, req, 1)
        assert out.stash == {"r": 16}  # the query ring is fed on every decode step
        held = req.num_computed_tokens - plan.manager.kvc.evicted.get("r", 0)
        assert held < 124 and len(plan.manager.req_to_blocks["r"]) <= -(-124 // BLOCK)
        if out.compact:
            compactions.append(out.compact["r"])
    assert [(c.kind, c.source_len, c.kept) for c in compactions] == [("decode", 124, 100)] * 2
    assert [c.evicted for c in compactions] == [24, 48]  # cumulative, not overwritten
    assert plan.stats.decode_compactions == 2 and plan.stats.decode_tokens_evicted == 48
    assert len(plan.manager.req_to_blocks["r"]) + len(pool.free) == 64  # nothing leaked
    assert "r" in plan.manager.kvc.no_cache
    assert plan.stats.query_ring_bytes == 16 * 1000  # window x bytes per kept query
    plan.manager.kvc.forget("r")  # finished: its ring goes with it, reported at once
    assert plan.stats.query_ring_bytes == 0


def test_prompt_at_the_limit_is_cut_to_the_budget_and_prompt_ratio_stands_below() -> None:
    plan = planner(FakePool(64))
    long = request("long", 200, DECODE)
    out = step(plan, long, 128)
    assert not out.compact and out.stash == {"long": 16}  # non-final chunk: window kept
    out = step(plan, long, 72)
    job = out.compact["long"]
    assert (job.kind, job.source_len, job.kept, job.evicted) == ("decode", 200, 100, 100)
    ratio = request("ratio", 200, {**DECODE, "kv_ratio": 0.5})
    job = step(plan, ratio, 200).compact["ratio"]
    assert (job.kind, job.kept) == ("prompt", 100)  # 0.5 x 200 < 124: the prompt policy's
    assert plan.stats.requests_compressed == 1 and plan.stats.decode_compactions == 1


def test_key_only_policy_records_no_queries_and_takes_full_cache_hits() -> None:
    plan = planner(FakePool(64))
    req = request("k", 90, {**DECODE, "kv_policy": "knorm"})
    assert plan.max_cache_hit_blocks(req) is None
    assert not step(plan, req, 90).stash
    assert plan.stats.query_ring_bytes == 0  # key-only: no ring
    query_reader = request("q", 90, DECODE)
    # decode_budget alone (prompt not cut): the window is still recomputed for later scoring.
    assert plan.max_cache_hit_blocks(query_reader) == (90 - 16) // BLOCK


def test_no_memory_and_shared_blocks_retry_on_the_next_step() -> None:
    pool = FakePool(8)
    plan = planner(pool)
    req = request("r", 110, DECODE)
    step(plan, req, 110)
    for block in plan.manager.req_to_blocks["r"]:
        block.ref_cnt = 2  # shared through a prefix hit: no in-place compaction
    pool.free = []
    out = None
    while out is None or not out.compact:
        if req.num_computed_tokens - 110 == 14:
            for block in plan.manager.req_to_blocks["r"]:
                block.ref_cnt = 1  # the other holder finished
        out = step(plan, req, 1)
        assert req.num_computed_tokens < 140
    assert plan.stats.skipped_no_memory >= 1
    job = out.compact["r"]
    assert job.in_place and job.source_len >= 124 and job.kept == 100


def test_untracked_requests_cost_nothing_and_none_is_never_planned() -> None:
    plan = planner(FakePool(64))
    req = request("n", 300, {"kv_policy": "none", "kv_decode_budget": 100,
                             "kv_decode_interval": 24, "kv_window": 16})
    assert not step(plan, req, 300)
    for _ in range(200):
        assert not step(plan, req, 1)
    assert not plan.manager.kvc.decoding and plan.manager.kvc.evicted == {}


def test_prompt_only_compaction_skipped_for_memory_releases_the_query_ring() -> None:
    """A prompt-only request's workers record window queries over its prefill chunks; when the
    compaction at the prompt's end is skipped (no memory, blocks shared), the plan tells them to
    drop those queries at once. A compacted one keeps them for this step's scoring."""
    pool = FakePool(16)
    plan = planner(pool)
    req = request("p", 100, {"kv_policy": "snapkv", "kv_window": 16, "kv_ratio": 0.25})
    first = step(plan, req, 64)
    assert first.stash == {"p": 16} and not first.release  # a chunk: queries recorded
    for block in plan.manager.req_to_blocks["p"]:
        block.ref_cnt = 2  # shared through a prefix hit: no in-place compaction either
    pool.free = pool.free[:1]  # not enough for the 2 fresh blocks of 25 kept tokens
    last = step(plan, req, 36)
    assert not last.compact and last.release == ("p",) and "p" not in last.stash
    assert plan.stats.skipped_no_memory == 1
    roomy = planner(FakePool(16))
    other = request("q", 100, {"kv_policy": "snapkv", "kv_window": 16, "kv_ratio": 0.25})
    step(roomy, other, 64)
    done = step(roomy, other, 36)
    assert "q" in done.compact and done.stash == {"q": 16} and not done.release


def test_resumed_decode_compressed_request_recomputes_its_window() -> None:
    """A preempted decode-compressed request's re-prefill (prompt + outputs) may hit its old
    uncompressed prompt blocks in the prefix cache; the hits stop short of its last ``window``
    tokens so its query ring is full again when it next compacts. A prompt-only request is not
    compressed again after a preemption: no cap."""
    plan = planner(FakePool(64))
    req = request("r", 90, DECODE)  # window 16
    req.num_output_tokens, req.num_tokens = 30, 120
    assert plan.max_cache_hit_blocks(req) == (120 - 16) // BLOCK
    fresh = request("f", 90, DECODE)
    assert plan.max_cache_hit_blocks(fresh) == (90 - 16) // BLOCK
    prompt_only = request("p", 100, {"kv_policy": "snapkv", "kv_window": 16, "kv_ratio": 0.25})
    prompt_only.num_output_tokens, prompt_only.num_tokens = 5, 105
    assert plan.max_cache_hit_blocks(prompt_only) is None
    prefill = request("b", 200, {"kv_policy": "snapkv", "kv_window": 16,
                                 "kv_prefill_budget": 64})
    prefill.num_output_tokens, prefill.num_tokens = 5, 205  # its re-prefill is cut again
    assert plan.max_cache_hit_blocks(prefill) == 64 // BLOCK  # no further than its budget
    keys_only = request("k", 90, {**DECODE, "kv_policy": "knorm"})
    keys_only.num_output_tokens, keys_only.num_tokens = 30, 120
    assert plan.max_cache_hit_blocks(keys_only) is None


def test_prefill_budget_request_takes_no_more_than_its_budget_from_cache() -> None:
    """A request compressing while prefilling takes at most its first ``prefill_budget``
    tokens from the prefix cache, with or without queries to keep: a longer hit would hold more
    than budget + one chunk and replace its chunk-wise cuts by an end-of-prompt selection.
    Whole chunks of it only (``CHUNK`` = 32 here), so the chunk ends stay where a cold cache
    puts them."""
    plan = planner(FakePool(64))
    for policy in ("snapkv", "streamingllm", "knorm"):
        req = request(policy, 400, {"kv_policy": policy, "kv_window": 16,
                                    "kv_prefill_budget": 100})
        assert plan.max_cache_hit_blocks(req) == 96 // BLOCK, policy  # 3 chunks of 32
    near = request("n", 110, {"kv_policy": "snapkv", "kv_window": 16, "kv_prefill_budget": 100})
    assert plan.max_cache_hit_blocks(near) == 64 // BLOCK  # whole chunks, the window recomputed
    # Never longer than its budget, so never cut while prefilling: only the window is recomputed.
    short = request("s", 90, {"kv_policy": "snapkv", "kv_window": 16, "kv_prefill_budget": 100,
                              "kv_ratio": 0.5})
    assert plan.max_cache_hit_blocks(short) == (90 - 16) // BLOCK
    keys_only = request("k", 90, {"kv_policy": "knorm", "kv_prefill_budget": 100})
    assert plan.max_cache_hit_blocks(keys_only) is None
