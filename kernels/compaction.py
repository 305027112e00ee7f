"""Paged compaction: move kept tokens to their physical destination slots (Triton).

Each KV head ``h`` moves the K and V of its ``n`` kept tokens from ``src_slots[h, j]`` to
``dst_slots[j]`` (``src_slots`` of shape ``[n]`` is shared by every head). Physical slot =
``block_id * block_size + offset``. Reference: gather every head's kept tokens, then write them
to ``dst_slots`` (``FlashLayoutCache.read``/``write`` for ``flash``).

Layouts (``LAYOUTS``), both ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``:

* ``flash``: FLASH_ATTN / TRITON_ATTN. Token ``t`` of a (block, head) keeps K in
  ``[..., t, :head_dim]`` and V in ``[..., t, head_dim:]`` (one contiguous lane per token).
* ``cpu_vec`` (alias ``vec``): CPU_ATTN with ``isa == "vec"``. Each (block, head) plane of
  ``2 * block_size * head_dim`` elements holds K column-major ``[head_dim, block_size]`` (element
  ``(t, d)`` at ``d * block_size + t``), then V row-major ``[block_size, head_dim]`` (element
  ``(t, d)`` at ``block_size * head_dim + t * head_dim + d``); see
  ``vllm_kvcompress.engine.cpu_paged_cache``. The name matches ``window_scores.KEY_LAYOUTS`` and
  ``CpuAttnCache.kernel_layout``.

The kernels address K and V with separate (base, token, dim) strides inside one (block, head), so
one kernel serves both layouts.

* Fresh destination blocks (``in_place=False``): no overlap; grid ``(cdiv(n, BLOCK_T), heads)``.
* In place (destination = the first blocks of the source row): one program per head walks the
  tiles in ascending order (see ``_compact_in_place_kernel`` for why that is race-free).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Cache layouts the compaction kernels address.
LAYOUTS = ("flash", "cpu_vec")
#: Other accepted names (the CPU_ATTN ISA name) -> the ``LAYOUTS`` entry.
LAYOUT_ALIASES = {"vec": "cpu_vec"}


@triton.jit
def _copy_tile(Cache, Src, Dst, tile_start, n, head, s_src_h, s_src_j, sb, sh,
               k_tok, k_dim, v_base, v_tok, v_dim,
               BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_D: tl.constexpr, IN_PLACE: tl.constexpr):
    """Moves kept tokens ``tile_start .. tile_start + BLOCK_T`` of one head (K and V)."""
    head = head.to(tl.int64)  # head * sh in int64: large caches pass 2**31 elements
    j = tile_start + tl.arange(0, BLOCK_T)
    ok = j < n
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = ok[:, None] & (dims[None, :] < HEAD_DIM)
    # Slots are int64, so every address below is computed in int64.
    src = tl.load(Src + head * s_src_h + j.to(tl.int64) * s_src_j, mask=ok, other=0)
    dst = tl.load(Dst + j, mask=ok, other=0)
    src_plane = (src // BLOCK_SIZE) * sb + head * sh
    dst_plane = (dst // BLOCK_SIZE) * sb + head * sh
    src_t = src % BLOCK_SIZE
    dst_t = dst % BLOCK_SIZE
    keys = tl.load(Cache + (src_plane + src_t * k_tok)[:, None] + dims[None, :] * k_dim,
                   mask=mask)
    values = tl.load(Cache + (v_base + src_plane + src_t * v_tok)[:, None]
                     + dims[None, :] * v_dim, mask=mask)
    if IN_PLACE:
        # A store of token j may hit the slot that token j' < j of this tile reads, held by
        # another thread: every thread's loads must finish before any thread stores.
        tl.debug_barrier()
    tl.store(Cache + (dst_plane + dst_t * k_tok)[:, None] + dims[None, :] * k_dim, keys,
             mask=mask)
    tl.store(Cache + (v_base + dst_plane + dst_t * v_tok)[:, None] + dims[None, :] * v_dim,
             values, mask=mask)


@triton.jit
def _compact_parallel_kernel(Cache, Src, Dst, n, s_src_h, s_src_j, sb, sh,
                             k_tok, k_dim, v_base, v_tok, v_dim,
                             BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fresh destination blocks: no destination is a source, so tiles run in any order."""
    _copy_tile(Cache, Src, Dst, tl.program_id(0) * BLOCK_T, n, tl.program_id(1),
               s_src_h, s_src_j, sb, sh, k_tok, k_dim, v_base, v_tok, v_dim,
               BLOCK_SIZE, HEAD_DIM, BLOCK_T, BLOCK_D, False)


@triton.jit
def _compact_in_place_kernel(Cache, Src, Dst, n, s_src_h, s_src_j, sb, sh,
                             k_tok, k_dim, v_base, v_tok, v_dim,
                             BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """In place: one program per head walks its tiles in ascending order.

    Why this cannot race (the interpreter runs tiles sequentially and cannot show a race, so the
    argument is written here). Let ``p_h[0] < p_h[1] < ... < p_h[n-1]`` be the row positions
    of head ``h``'s kept tokens; ``src_slots[h, j]`` is the slot of row position ``p_h[j]`` and
    ``dst_slots[j]`` the slot of row position ``j`` (the destination blocks are the first blocks
    of the same row). Strictly increasing integers from 0 give ``j <= p_h[j]``.

    1. Distinct (row position, head) pairs are distinct memory: a row lists distinct blocks, so
       positions map to distinct (block, offset); a (block, head, offset) owns its
       ``2 * head_dim`` elements in both layouts (``flash``: one lane; ``cpu_vec``: column
       ``offset`` of the K plane and row ``offset`` of the V plane, and the (block, head)
       planes do not overlap). Hence different heads touch disjoint memory and the programs
       of different heads never interact, whatever order the GPU runs them in.
    2. Within one head, tile ``k`` (``j`` in ``[kT, (k+1)T)``) reads positions
       ``p_h[j] >= j >= kT`` and writes positions ``j < (k+1)T``. Every later tile reads
       positions ``>= (k+1)T``: no tile reads what an earlier tile wrote (RAW across tiles).
       Tile ``k`` may read positions that a later tile writes (WAR); those stores come after
       tile ``k``'s barrier in program order, so after every thread's tile-``k`` loads.
       Hoisting a later tile's loads earlier (software pipelining) stays safe, since it only
       moves reads that never overlap earlier writes.
    3. Inside a tile, token ``j`` may write the position token ``j' < j`` reads (``p_h[j'] =
       j``), possibly from another thread: the whole tile (K and V) is loaded, then
       ``tl.debug_barrier()``, then stored. A slot is either a source the tile still needs
       (read before the barrier) or a destination (written after it).
    4. Positions ``p_h[j] = j`` copy a slot onto itself: harmless.
    """
    for tile_start in range(0, n, BLOCK_T):
        _copy_tile(Cache, Src, Dst, tile_start, n, tl.program_id(0),
                   s_src_h, s_src_j, sb, sh, k_tok, k_dim, v_base, v_tok, v_dim,
                   BLOCK_SIZE, HEAD_DIM, BLOCK_T, BLOCK_D, True)


def _kv_strides(cache: torch.Tensor, layout: str) -> tuple[int, int, int, int, int]:
    """``(k_token, k_dim, v_base, v_token, v_dim)`` in elements inside one (block, head)."""
    _, _, block_size, two_d = cache.shape
    head_dim = two_d // 2
    if layout == "flash":
        st, sd = cache.stride(2), cache.stride(3)
        return st, sd, head_dim * sd, st, sd
    # cpu_vec: K [head_dim, block_size] column-major, then V [block_size, head_dim] row-major.
    return 1, block_size, block_size * head_dim, head_dim, 1


def check_compaction_inputs(cache: torch.Tensor, src_slots: torch.Tensor,
                            dst_slots: torch.Tensor, layout: str, block_t: int = 32) -> str:
    """Validates the inputs of ``compact_paged`` (this module's and the CUDA C++ one's); returns
    the canonical layout name.

    Raises:
        ValueError: names the argument and what it must be.
    """
    layout = LAYOUT_ALIASES.get(layout, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted([*LAYOUTS, *LAYOUT_ALIASES])}, "
                         f"got {layout!r}")
    if cache.dim() != 4 or cache.shape[3] % 2:
        raise ValueError("cache must be [num_blocks, num_kv_heads, block_size, 2 * head_dim], "
                         f"got {tuple(cache.shape)}")
    _, heads, block_size, two_d = cache.shape
    if cache.stride(3) != 1:
        raise ValueError("cache must have a contiguous last dim")
    if layout == "cpu_vec" and cache.stride(2) != two_d:
        # The plane offsets (K column-major, then V) assume one dense plane per (block, head).
        raise ValueError("cpu_vec cache must be contiguous inside each (block, head) plane")
    if dst_slots.dim() != 1:
        raise ValueError(f"dst_slots must be [n], got {tuple(dst_slots.shape)}")
    n = dst_slots.shape[0]
    if src_slots.shape not in ((n,), (heads, n)):
        raise ValueError(f"src_slots must be [n] or [num_kv_heads, n] = [{heads}, {n}] "
                         f"(n from dst_slots), got {tuple(src_slots.shape)}")
    if src_slots.dtype != torch.int64 or dst_slots.dtype != torch.int64:
        raise ValueError(f"slots must be int64 (large pools overflow int32), got "
                         f"{src_slots.dtype} and {dst_slots.dtype}")
    if len({cache.device, src_slots.device, dst_slots.device}) != 1:
        raise ValueError(f"cache and slots must be on one device, got {cache.device}, "
                         f"{src_slots.device}, {dst_slots.device}")
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    if n:
        # One host sync for all four bounds; an out-of-range slot would read or write outside
        # the cache.
        lo_s, hi_s, lo_d, hi_d = torch.stack([src_slots.min(), src_slots.max(),
                                              dst_slots.min(), dst_slots.max()]).tolist()
        limit = cache.shape[0] * block_size
        if min(lo_s, lo_d) < 0 or max(hi_s, hi_d) >= limit:
            raise ValueError(f"slot out of range [0, {limit}): src_slots in [{lo_s}, {hi_s}], "
                             f"dst_slots in [{lo_d}, {hi_d}]")
    return layout


def compact_paged(cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                  in_place: bool, layout: str = "flash", block_t: int = 32) -> None:
    """Copies each head ``h``'s K and V from ``src_slots[h, j]`` to ``dst_slots[j]``.

    Args:
        cache: one layer's cache ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``, any
            dtype, last dim contiguous (``cpu_vec``: each (block, head) plane contiguous).
        src_slots: int64 physical slots, ``[num_kv_heads, n]`` (row ``h`` = head ``h``'s kept
            tokens) or ``[n]`` (shared by every head); any strides. For ``in_place``, each row
            lists slots of strictly increasing row positions.
        dst_slots: ``[n]`` int64 physical slots shared by every head: slot ``j`` receives each
            head's ``j``-th kept token. For ``in_place``, ``dst_slots[j]`` is the slot of row
            position ``j`` of the source row (the destination blocks are its first blocks);
            otherwise the destination blocks must not hold any source slot.
        in_place: whether destinations may overlap sources.
        layout: ``"flash"`` or ``"cpu_vec"`` (alias ``"vec"``), see ``LAYOUTS``.
        block_t: tokens per tile (power of two).

    Raises:
        ValueError: layout, shapes, dtypes, devices, strides or slot range do not fit.
    """
    layout = check_compaction_inputs(cache, src_slots, dst_slots, layout, block_t)
    n = dst_slots.shape[0]
    if n == 0:
        return
    _, heads, block_size, two_d = cache.shape
    # A shared [n] row is a [heads, n] one with head stride 0: one kernel for both.
    s_src_h, s_src_j = (0, src_slots.stride(0)) if src_slots.dim() == 1 else src_slots.stride()
    args = (cache, src_slots, dst_slots.contiguous(), n, s_src_h, s_src_j, cache.stride(0),
            cache.stride(1), *_kv_strides(cache, layout))
    meta = dict(BLOCK_SIZE=block_size, HEAD_DIM=two_d // 2, BLOCK_T=block_t,
                BLOCK_D=triton.next_power_of_2(two_d // 2))
    if in_place:
        _compact_in_place_kernel[(heads,)](*args, **meta)
    else:
        _compact_parallel_kernel[(triton.cdiv(n, block_t), heads)](*args, **meta)
