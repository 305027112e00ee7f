"""Paged-cache access per backend layout, the compaction step, and the physical-length remap.

CPU_ATTN is exercised through vLLM's own CPU writer; the FLASH_ATTN / TRITON_ATTN layout is checked
against the exact view expression those backends use, on CPU tensors, so the NVIDIA path is
covered here even though no GPU can run vLLM 0.32 in this project.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_kvcompress.config import CompressionSpec
from vllm_kvcompress.engine.cpu_paged_cache import CpuAttnCache, probe_layout, row_slots
from vllm_kvcompress.engine.flash_paged_cache import FlashLayoutCache
from vllm_kvcompress.engine.worker_side import CompactionTask, WorkerCompression
from vllm_kvcompress.policies import LayerObservation, build_policy


def cpu_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


def random_row(gen: torch.Generator, num_blocks: int, n_blocks: int) -> torch.Tensor:
    """Distinct, non-contiguous, unordered block ids (never block 0, vLLM's null block)."""
    return (torch.randperm(num_blocks - 1, generator=gen)[:n_blocks] + 1).to(torch.int64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("block_size", "head_size"), [(32, 64), (128, 64), (32, 128), (32, 48)])
def test_cpu_attn_roundtrip_through_vllm_writer(dtype: torch.dtype, block_size: int,
                                                head_size: int) -> None:
    """What vLLM's CPU writer stores, our reader returns, for each ISA layout and a partial
    last block (48 = the vec16 layout)."""
    gen = torch.Generator().manual_seed(block_size + head_size)
    isa = cpu_isa(dtype, block_size, head_size)
    heads, num_blocks, n_tokens = 3, 12, 3 * block_size + 7
    cache = torch.zeros(num_blocks, heads, block_size, 2 * head_size, dtype=dtype)
    row = random_row(gen, num_blocks, 4)
    keys = torch.randn(heads, n_tokens, head_size, generator=gen).to(dtype)
    values = torch.randn(heads, n_tokens, head_size, generator=gen).to(dtype)
    access = CpuAttnCache(isa)
    access.write(cache, keys, values, row_slots(row, n_tokens, block_size))
    got_k, got_v = access.read(cache, row, n_tokens)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert probe_layout(isa, dtype, block_size, head_size) is probe_layout(
        isa, dtype, block_size, head_size)  # probed once


def flash_view_tokens(cache: torch.Tensor, slots: torch.Tensor, head_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens at ``slots`` through the exact view FLASH_ATTN/TRITON_ATTN use in vLLM 0.32:
    ``kv_cache.transpose(1, 2).split(head_size, dim=-1)`` -> ``[blocks, block_size, H, D]``."""
    key_cache, value_cache = cache.transpose(1, 2).split(head_size, dim=-1)
    block_size = cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    return (key_cache[blocks, offsets].transpose(0, 1),
            value_cache[blocks, offsets].transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("block_size", "heads", "head_size"), [(16, 8, 128), (32, 1, 64),
                                                                (64, 2, 80)])
def test_flash_layout_matches_the_backends_view(dtype: torch.dtype, block_size: int, heads: int,
                                                head_size: int) -> None:
    gen = torch.Generator().manual_seed(heads * head_size)
    num_blocks, n_tokens = 40, 5 * block_size - 3
    cache = torch.randn(num_blocks, heads, block_size, 2 * head_size, generator=gen).to(dtype)
    row = random_row(gen, num_blocks, 5)
    slots = row_slots(row, n_tokens, block_size)
    access = FlashLayoutCache()
    want_k, want_v = flash_view_tokens(cache, slots, head_size)
    got_k, got_v = access.read(cache, row, n_tokens)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    keys = torch.randn(heads, 9, head_size, generator=gen).to(dtype)
    values = torch.randn(heads, 9, head_size, generator=gen).to(dtype)
    dst = random_row(gen, num_blocks, 1)
    access.write(cache, keys, values, row_slots(dst, 9, block_size))
    back_k, back_v = flash_view_tokens(cache, row_slots(dst, 9, block_size), head_size)
    assert torch.equal(back_k, keys) and torch.equal(back_v, values)


def test_large_block_ids_do_not_overflow() -> None:
    """Slots beyond 2**31 (large pools, large blocks) stay int64 end to end."""
    row = torch.tensor([70_000_000, 3], dtype=torch.int64)
    slots = row_slots(row, 40, 32)
    assert slots.dtype == torch.int64 and int(slots[0]) == 70_000_000 * 32


@pytest.mark.parametrize("mode", ["shared", "per_head"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("policy", ["snapkv", "chunkkv", "streamingllm"])
def test_compaction_writes_the_policys_tokens_to_destination_slots(
        policy: str, in_place: bool, kernels: str, mode: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One layer through the worker's compaction with the flash layout, via the dispatcher
    (torch reference, or the Triton kernels: scoring from the paged cache, chunk ranking,
    compaction): each KV head's destination slots hold exactly that head's kept tokens, in
    order; a source block reused in place is read before it is overwritten."""
    monkeypatch.setenv("VLLM_KVCOMPRESS_KERNELS", kernels)
    gen = torch.Generator().manual_seed(7)
    block_size, kv_heads, q_heads, head_size, prompt_len = 16, 2, 8, 64, 150
    cache = torch.randn(30, kv_heads, block_size, 2 * head_size, generator=gen)
    src = random_row(gen, 30, 10)
    spec = CompressionSpec(policy=policy, ratio=0.3, window=16, head_select=mode)
    kept = spec.kept_tokens(prompt_len)
    n_dst = -(-kept // block_size)
    dst = src[:n_dst] if in_place else torch.tensor([b for b in range(1, 30)
                                                     if b not in src.tolist()][:n_dst])
    access = FlashLayoutCache()
    keys, values = access.read(cache, src, prompt_len)
    keys, values = keys.clone(), values.clone()
    query = torch.randn(prompt_len, q_heads, head_size, generator=gen)
    expected = build_policy(spec).keep_indices(LayerObservation(
        seq_len=prompt_len, budget=kept, sink_tokens=spec.sink_tokens, window=spec.window,
        num_kv_heads=kv_heads, queries=query[-spec.window:].transpose(0, 1), keys=keys))

    worker = WorkerCompression(num_layers=1, block_size=block_size)
    worker.record = True
    task = CompactionTask(req_id="r", spec=spec, policy=build_policy(spec), kept=kept,
                          source_len=prompt_len, logical_len=prompt_len, keep_queries=False,
                          src_blocks=src, dst_blocks=dst, in_place=in_place, query_start=0,
                          query_end=prompt_len)
    worker.compactions = [task]
    worker.queries.plan([("r", spec.window, 0, prompt_len)])
    worker.after_attention(0, query, cache, access)

    kept_idx = torch.tensor(worker.kept_log["r"][0])
    assert tuple(kept_idx.shape) == (kv_heads, kept)
    if kernels == "torch" or policy == "streamingllm":
        assert torch.equal(kept_idx, expected)
    else:  # scores summed in another order: near-ties may differ, the set barely
        for got_row, want_row in zip(kept_idx, expected, strict=True):
            assert len(set(got_row.tolist()) ^ set(want_row.tolist())) <= 4
    if mode == "per_head" and policy != "streamingllm":
        assert not torch.equal(kept_idx[0], kept_idx[1])  # heads really keep their own
    got_k, got_v = access.read(cache, dst, kept)
    for head in range(kv_heads):
        assert torch.equal(got_k[head], keys[head, kept_idx[head]])
        assert torch.equal(got_v[head], values[head, kept_idx[head]])


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_scoring_uses_the_layers_own_scale_and_softcap(
        kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker scores with the attention layer's scale and logit soft-cap (what the model's
    own attention used), not 1/sqrt(head_dim): its selection equals the policy's on window
    attention computed with them, and differs from the default-scale one here."""
    monkeypatch.setenv("VLLM_KVCOMPRESS_KERNELS", kernels)
    gen = torch.Generator().manual_seed(11)
    block_size, kv_heads, q_heads, head_size, prompt_len = 16, 2, 4, 64, 120
    cache = torch.randn(20, kv_heads, block_size, 2 * head_size, generator=gen)
    src = random_row(gen, 20, 8)
    spec = CompressionSpec(policy="snapkv", ratio=0.2, window=16, pool_kernel=1)
    kept = spec.kept_tokens(prompt_len)
    dst = torch.tensor([b for b in range(1, 20) if b not in src.tolist()][:-(-kept // 16)])
    keys, _ = FlashLayoutCache().read(cache, src, prompt_len)
    keys = keys.clone()
    query = 4 * torch.randn(prompt_len, q_heads, head_size, generator=gen)

    def policy_choice(scale: float | None, softcap: float) -> torch.Tensor:
        return build_policy(spec).keep_indices(LayerObservation(
            seq_len=prompt_len, budget=kept, sink_tokens=spec.sink_tokens, window=spec.window,
            num_kv_heads=kv_heads, queries=query[-spec.window:].transpose(0, 1), keys=keys,
            attn_scale=scale, attn_softcap=softcap))

    worker = WorkerCompression(num_layers=1, block_size=block_size)
    worker.record = True
    worker.compactions = [CompactionTask(
        req_id="r", spec=spec, policy=build_policy(spec), kept=kept, source_len=prompt_len,
        logical_len=prompt_len, keep_queries=False, src_blocks=src, dst_blocks=dst,
        in_place=False, query_start=0, query_end=prompt_len)]
    worker.queries.plan([("r", spec.window, 0, prompt_len)])
    worker.after_attention(0, query, cache, FlashLayoutCache(), scale=0.5, softcap=2.0)
    got = torch.tensor(worker.kept_log["r"][0])
    want = policy_choice(0.5, 2.0)
    if kernels == "torch":
        assert torch.equal(got, want)
    else:  # kernel sums in another order
        assert len(set(got[0].tolist()) ^ set(want[0].tolist())) <= 2
    assert not torch.equal(want, policy_choice(None, 0.0))


def test_physical_remap_on_vllms_block_table() -> None:
    """vLLM's real MultiGroupBlockTable with the plugin's wrappers: rows added, condensed
    (``move_row``), reordered (``swap_row``) and cleared carry their evicted counts with them,
    and vLLM's own ``compute_slot_mapping`` receives physical positions (logical minus the
    row's count) once; seq_lens become physical; positions stay logical (RoPE unchanged)."""
    from vllm.platforms import current_platform
    from vllm.v1.worker.block_table import MultiGroupBlockTable

    from vllm_kvcompress.engine.evicted_rows import EvictedRows
    from vllm_kvcompress.vllm_patches import apply_all

    apply_all()
    current_platform.register_triton_kernel_overrides()  # what the CPU worker does at start
    block_size = 32
    table = MultiGroupBlockTable(max_num_reqs=4, max_num_batched_tokens=64, pin_memory=False,
                                 device=torch.device("cpu"), block_sizes=[block_size],
                                 max_num_blocks=[16])
    rows = EvictedRows(4)
    table._kvcompress_evicted = rows
    # Three requests; "a" (230 evicted) sits in row 2 until row 0 is freed and it moves down.
    rows.by_request["a"] = 230
    table.add_row(([8, 8],), 0)      # a request that leaves
    table.add_row(([7, 3, 11, 4],), 1)
    table.add_row(([5, 9, 2],), 2)
    rows.added("gone", 0), rows.added("b", 1), rows.added("a", 2)
    table.clear_row(0)
    table.move_row(2, 0)             # condense: "a" now in row 0
    table.swap_row(0, 1)             # reorder: "a" in row 1, "b" (uncompressed) in row 0
    assert rows.rows[:3].tolist() == [0, 230, 0]
    table.commit_block_table(2)
    logical_computed = np.array([100, 300])
    scheduled = np.array([3, 1])     # "b": prefill chunk of 3 at 100..102; "a": one decode token
    req_indices = np.repeat(np.arange(2), scheduled)
    query_pos = np.concatenate([np.arange(n) for n in scheduled])
    positions = torch.from_numpy(logical_computed[req_indices] + query_pos)
    logical = positions.clone()
    table.compute_slot_mapping(2, torch.tensor([0, 3, 4], dtype=torch.int32), positions)
    assert torch.equal(positions, logical)  # RoPE positions untouched
    physical = [100, 101, 102, 70]
    blocks = [[7, 3, 11, 4], [5, 9, 2]]
    want = [blocks[r][p // block_size] * block_size + p % block_size
            for r, p in zip(req_indices, physical, strict=True)]
    assert table.block_tables[0].slot_mapping.gpu[:4].tolist() == want
    seq_lens = torch.from_numpy(logical_computed + scheduled).to(torch.int32)
    rows.to_physical_lengths(2, seq_lens)
    assert seq_lens.tolist() == [103, 71]
    table.clear_row(1)
    assert not rows.any(4)
