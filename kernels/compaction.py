"""Paged compaction: move kept tokens to their physical destination slots (Triton).

Layout: FLASH_ATTN / TRITON_ATTN, ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` (a
token's K and V are one contiguous ``2 * head_dim`` lane per head). Reference: gather the tokens
at ``src_slots`` then write them to ``dst_slots`` (``FlashLayoutCache.read``/``write``).

* Fresh destination blocks (``in_place=False``): no overlap; grid ``(cdiv(n, BLOCK_T), heads)``.
* In place (destination = the first blocks of the source row): kept positions are sorted and
  ``dst[j] = j <= src[j]``, so walking tiles in ascending order, loading a whole tile before
  storing it, never overwrites a slot that a later tile still has to read. One program per head
  walks the tiles sequentially.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_tile(Cache, Src, Dst, tile_start, n, head, sb, sh, st, sd,
               BLOCK_SIZE: tl.constexpr, LANE: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_L: tl.constexpr):
    toks = tile_start + tl.arange(0, BLOCK_T)
    ok = toks < n
    lanes = tl.arange(0, BLOCK_L)
    lane_ok = lanes < LANE
    src = tl.load(Src + toks, mask=ok, other=0)
    dst = tl.load(Dst + toks, mask=ok, other=0)
    src_base = (src // BLOCK_SIZE) * sb + head * sh + (src % BLOCK_SIZE) * st
    dst_base = (dst // BLOCK_SIZE) * sb + head * sh + (dst % BLOCK_SIZE) * st
    values = tl.load(Cache + src_base[:, None] + lanes[None, :] * sd,
                     mask=ok[:, None] & lane_ok[None, :])
    tl.store(Cache + dst_base[:, None] + lanes[None, :] * sd, values,
             mask=ok[:, None] & lane_ok[None, :])


@triton.jit
def _compact_parallel_kernel(Cache, Src, Dst, n, sb, sh, st, sd, BLOCK_SIZE: tl.constexpr,
                             LANE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr):
    _copy_tile(Cache, Src, Dst, tl.program_id(0) * BLOCK_T, n, tl.program_id(1), sb, sh, st, sd,
               BLOCK_SIZE, LANE, BLOCK_T, BLOCK_L)


@triton.jit
def _compact_in_place_kernel(Cache, Src, Dst, n, sb, sh, st, sd, BLOCK_SIZE: tl.constexpr,
                             LANE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr):
    for tile_start in range(0, n, BLOCK_T):
        _copy_tile(Cache, Src, Dst, tile_start, n, tl.program_id(0), sb, sh, st, sd,
                   BLOCK_SIZE, LANE, BLOCK_T, BLOCK_L)


def compact_paged(cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                  in_place: bool, block_t: int = 32) -> None:
    """Copies every head's K and V from ``src_slots[i]`` to ``dst_slots[i]``.

    Args:
        cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``, last dim contiguous.
        src_slots: ``[n]`` int64 physical slots, strictly increasing for ``in_place``.
        dst_slots: ``[n]`` int64 physical slots; for ``in_place``, ``dst_slots[i] <= src``
            position-wise within the same row (the engine's in-place fallback).
        in_place: whether destinations may overlap sources.
        block_t: tokens per tile.

    Raises:
        ValueError: shapes, dtypes or devices do not fit.
    """
    if cache.dim() != 4 or cache.stride(3) != 1:
        raise ValueError("cache must be 4-D with a contiguous last dim")
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 1:
        raise ValueError("src_slots and dst_slots must be 1-D and the same length")
    if src_slots.dtype != torch.int64 or dst_slots.dtype != torch.int64:
        raise ValueError("slots must be int64 (large pools overflow int32)")
    if len({cache.device, src_slots.device, dst_slots.device}) != 1:
        raise ValueError("cache and slots must be on one device")
    n = src_slots.shape[0]
    if n == 0:
        return
    num_blocks, heads, block_size, lane = cache.shape
    if int(torch.maximum(src_slots.max(), dst_slots.max())) >= num_blocks * block_size:
        raise ValueError("slot out of range")
    args = (cache, src_slots.contiguous(), dst_slots.contiguous(), n, *cache.stride())
    meta = dict(BLOCK_SIZE=block_size, LANE=lane, BLOCK_T=block_t,
                BLOCK_L=triton.next_power_of_2(lane))
    if in_place:
        _compact_in_place_kernel[(heads,)](*args, **meta)
    else:
        _compact_parallel_kernel[(triton.cdiv(n, block_t), heads)](*args, **meta)
