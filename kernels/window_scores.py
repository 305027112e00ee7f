"""Observation-window scores read straight from the paged KV cache (Triton).

Reference: ``vllm_kvcompress.policies.window_scoring.window_attention_scores`` on the keys
gathered from the cache. Two passes, both fp32:

1. ``_window_stats_kernel``, grid ``(num_q_heads, cdiv(w, BLOCK_W), splits)``: online-softmax row
   max and normalizer of each window query over one split of the causal keys, read through the
   block table; the splits' partial ``(m, l)`` are combined in torch (``[splits, H, w]``, tiny).
   Splitting the key range keeps every SM busy at long prompts: with one program per (head,
   window tile) an H200 ran 64 programs over 128k keys each (70 ms per Llama-8B layer).
2. ``_window_mass_kernel``, grid ``(num_kv_heads, cdiv(L, BLOCK_N))``: each key's attention
   mass, ``sum over the group's query heads and window rows of exp(s - m) / l``.

Logits: where queries and cache share a 16-bit dtype on a GPU, ``tl.dot`` runs on the tensor
cores in that dtype with fp32 accumulation. The products of two bf16/fp16 numbers are exact in
fp32, so this differs from the fp32 reference (which upcasts first) only in the order of the fp32
additions; elsewhere (fp32 caches, the CPU interpreter) the operands are upcast and multiplied in
IEEE fp32.

Keys are addressed with four strides (block, head, token, dim), which covers the FLASH_ATTN /
TRITON_ATTN layout and CPU_ATTN's ``vec`` layout (K stored column-major per block and head).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

#: Target number of key-range splits of the statistics pass (see the module docstring).
STATS_SPLITS = 32

#: name -> function(cache) giving key strides (block, head, token, dim) in elements.
KEY_LAYOUTS = {
    # [num_blocks, H, block_size, 2*D]; K = [..., :D]
    "flash": lambda c: (c.stride(0), c.stride(1), c.stride(2), c.stride(3)),
    # CPU_ATTN vec: each (block, head) plane holds K as [D, block_size] then V.
    "cpu_vec": lambda c: (c.stride(0), c.stride(1), 1, c.shape[2]),
}


@triton.jit
def _cap(s, softcap):
    """Logit soft-cap ``c * tanh(s / c)`` (tanh via the sigmoid); ``c = 0`` leaves ``s``."""
    if softcap > 0:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
    return s


@triton.jit
def _logits(q, k, scale, softcap, NATIVE_DOT: tl.constexpr):
    """``[rows, keys]`` fp32 logits of queries ``q [rows, D]`` against keys ``k [keys, D]``."""
    if NATIVE_DOT:  # fp16/bf16 tensor cores, fp32 accumulation (see the module docstring)
        s = tl.dot(q, tl.trans(k))
    else:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return _cap(s * scale, softcap)


@triton.jit
def _window_stats_kernel(Q, K, BT, M, Lsum, seq_len, window, split_len, scale, softcap,
                         sqh, sqw, sqd, skb, skh, skt, skd,
                         GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         NATIVE_DOT: tl.constexpr):
    head = tl.program_id(0)
    kv_head = head // GROUP
    rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    split = tl.program_id(2)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < window
    q = tl.load(Q + head * sqh + rows[:, None] * sqw + dims[None, :] * sqd,
                mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    q_pos = seq_len - window + rows
    m = tl.full([BLOCK_W], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_W], tl.float32)
    end = tl.minimum(seq_len, (split + 1) * split_len)
    for start in range(split * split_len, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        block = tl.load(BT + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        base = block * skb + kv_head * skh + (keys % BLOCK_SIZE).to(tl.int64) * skt
        k = tl.load(K + base[:, None] + dims[None, :] * skd,
                    mask=key_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        s = _logits(q, k, scale, softcap, NATIVE_DOT)
        ok = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row with no causal key in this split yet keeps m = -inf: exp(-inf - -inf) is NaN,
        # so its rescale factor is pinned to 0 (lsum is still 0 there).
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        m = m_new
    out = (split * tl.num_programs(0) + head) * window + rows
    tl.store(M + out, m, mask=row_ok)
    tl.store(Lsum + out, lsum, mask=row_ok)


@triton.jit
def _window_mass_kernel(Q, K, BT, M, Lsum, Out, seq_len, window, scale, softcap,
                        sqh, sqw, sqd, skb, skh, skt, skd,
                        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        NATIVE_DOT: tl.constexpr):
    kv_head = tl.program_id(0)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < seq_len
    block = tl.load(BT + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    base = block * skb + kv_head * skh + (keys % BLOCK_SIZE).to(tl.int64) * skt
    k = tl.load(K + base[:, None] + dims[None, :] * skd,
                mask=key_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for start in range(0, window, BLOCK_W):
            rows = start + tl.arange(0, BLOCK_W)
            row_ok = rows < window
            q = tl.load(Q + head * sqh + rows[:, None] * sqw + dims[None, :] * sqd,
                        mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
            m = tl.load(M + head * window + rows, mask=row_ok, other=0.0)
            lsum = tl.load(Lsum + head * window + rows, mask=row_ok, other=1.0)
            s = _logits(q, k, scale, softcap, NATIVE_DOT)
            q_pos = seq_len - window + rows
            ok = row_ok[:, None] & key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
            p = tl.where(ok, tl.exp(s - m[:, None]) / lsum[:, None], 0.0)
            acc += tl.sum(p, axis=0)
    tl.store(Out + kv_head * seq_len + keys, acc, mask=key_ok)


def paged_window_scores(queries: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor,
                        seq_len: int, layout: str = "flash", scale: float | None = None,
                        softcap: float = 0.0, block_w: int = 16, block_n: int = 64
                        ) -> torch.Tensor:
    """Attention mass each cached key receives from the observation window, per KV head.

    Args:
        queries: ``[num_q_heads, w, head_dim]`` post-RoPE window queries (fp16/bf16/fp32).
        cache: one layer's paged cache ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``.
        block_ids: ``[>= cdiv(seq_len, block_size)]`` the request's block row (int32/int64).
        seq_len: prompt length ``L`` (``w <= L``).
        layout: a key of ``KEY_LAYOUTS``.
        scale: softmax scale, ``1 / sqrt(head_dim)`` when ``None``.
        softcap: logit soft-cap of the attention layer, 0 for none.
        block_w: window rows per tile (>= 16, power of two).
        block_n: keys per tile (>= 16, power of two).

    Returns:
        ``[num_kv_heads, L]`` float32, as ``window_attention_scores`` on the gathered keys.

    Raises:
        ValueError: shapes, dtypes, devices or layout do not fit.
    """
    if queries.dim() != 3 or cache.dim() != 4:
        raise ValueError(f"queries must be 3-D and cache 4-D, got {tuple(queries.shape)}, "
                         f"{tuple(cache.shape)}")
    num_q_heads, window, head_dim = queries.shape
    _, num_kv_heads, block_size, two_d = cache.shape
    if two_d != 2 * head_dim:
        raise ValueError(f"cache last dim {two_d} != 2 * head_dim {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads not a multiple of {num_kv_heads} KV heads")
    if not 1 <= window <= seq_len:
        raise ValueError(f"need 1 <= window ({window}) <= seq_len ({seq_len})")
    if block_ids.dtype not in (torch.int32, torch.int64) or block_ids.dim() != 1:
        raise ValueError("block_ids must be a 1-D int32/int64 tensor")
    if block_ids.shape[0] * block_size < seq_len:
        raise ValueError(f"{block_ids.shape[0]} blocks of {block_size} hold < {seq_len} tokens")
    for name, t in (("queries", queries), ("cache", cache)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} dtype {t.dtype} not supported")
    if len({queries.device, cache.device, block_ids.device}) != 1:
        raise ValueError("queries, cache and block_ids must be on one device")
    if layout not in KEY_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(KEY_LAYOUTS)}, got {layout!r}")
    if block_w < 16 or block_n < 16:
        raise ValueError("tl.dot needs tiles of at least 16")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # Keys per split: whole tiles, about STATS_SPLITS splits (fewer for short prompts).
    split_len = block_n * triton.cdiv(triton.cdiv(seq_len, STATS_SPLITS), block_n)
    splits = triton.cdiv(seq_len, split_len)
    part_m = torch.empty(splits, num_q_heads, window, dtype=torch.float32,
                         device=queries.device)
    part_l = torch.empty_like(part_m)
    out = torch.empty(num_kv_heads, seq_len, dtype=torch.float32, device=queries.device)
    strides_k = KEY_LAYOUTS[layout](cache)
    native_dot = (queries.is_cuda and queries.dtype == cache.dtype
                  and queries.dtype in (torch.float16, torch.bfloat16))
    common = dict(GROUP=num_q_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
                  BLOCK_W=block_w, BLOCK_N=block_n,
                  BLOCK_D=max(16, triton.next_power_of_2(head_dim)), NATIVE_DOT=native_dot)
    _window_stats_kernel[(num_q_heads, triton.cdiv(window, block_w), splits)](
        queries, cache, block_ids, part_m, part_l, seq_len, window, split_len, scale,
        float(softcap), *queries.stride(), *strides_k, **common)
    # Combine the splits: every window row has a causal key (key 0) in split 0, so m is finite.
    stats_m = part_m.amax(0)
    stats_l = (part_l * torch.exp(part_m - stats_m)).sum(0)
    _window_mass_kernel[(num_kv_heads, triton.cdiv(seq_len, block_n))](
        queries, cache, block_ids, stats_m, stats_l, out, seq_len, window, scale,
        float(softcap), *queries.stride(), *strides_k, **common)
    return out
