"""Observation-window scores read straight from the paged KV cache (Triton).

Reference: ``vllm_kvcompress.policies.window_scoring.window_attention_scores`` on the keys
gathered from the cache. Two passes, both fp32:

1. ``_window_stats_kernel``, grid ``(num_q_heads, cdiv(w, BLOCK_W))``: online-softmax row max and
   normalizer of each window query over the causal keys, read through the block table.
2. ``_window_mass_kernel``, grid ``(num_kv_heads, cdiv(L, BLOCK_N))``: each key's attention
   mass, ``sum over the group's query heads and window rows of exp(s - m) / l``.

Keys are addressed with four strides (block, head, token, dim), which covers the FLASH_ATTN /
TRITON_ATTN layout and CPU_ATTN's ``vec`` layout (K stored column-major per block and head).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

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
def _window_stats_kernel(Q, K, BT, M, Lsum, seq_len, window, scale, softcap,
                         sqh, sqw, sqd, skb, skh, skt, skd,
                         GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    kv_head = head // GROUP
    rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < window
    q = tl.load(Q + head * sqh + rows[:, None] * sqw + dims[None, :] * sqd,
                mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
    q_pos = seq_len - window + rows
    m = tl.full([BLOCK_W], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_W], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < seq_len
        block = tl.load(BT + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        base = block * skb + kv_head * skh + (keys % BLOCK_SIZE).to(tl.int64) * skt
        k = tl.load(K + base[:, None] + dims[None, :] * skd,
                    mask=key_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
        s = _cap(tl.dot(q, tl.trans(k), input_precision="ieee") * scale, softcap)
        ok = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        lsum = lsum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    tl.store(M + head * window + rows, m, mask=row_ok)
    tl.store(Lsum + head * window + rows, lsum, mask=row_ok)


@triton.jit
def _window_mass_kernel(Q, K, BT, M, Lsum, Out, seq_len, window, scale, softcap,
                        sqh, sqw, sqd, skb, skh, skt, skd,
                        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    kv_head = tl.program_id(0)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < seq_len
    block = tl.load(BT + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    base = block * skb + kv_head * skh + (keys % BLOCK_SIZE).to(tl.int64) * skt
    k = tl.load(K + base[:, None] + dims[None, :] * skd,
                mask=key_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for start in range(0, window, BLOCK_W):
            rows = start + tl.arange(0, BLOCK_W)
            row_ok = rows < window
            q = tl.load(Q + head * sqh + rows[:, None] * sqw + dims[None, :] * sqd,
                        mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM),
                        other=0.0).to(tl.float32)
            m = tl.load(M + head * window + rows, mask=row_ok, other=0.0)
            lsum = tl.load(Lsum + head * window + rows, mask=row_ok, other=1.0)
            s = _cap(tl.dot(q, tl.trans(k), input_precision="ieee") * scale, softcap)
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
    stats_m = torch.empty(num_q_heads, window, dtype=torch.float32, device=queries.device)
    stats_l = torch.empty_like(stats_m)
    out = torch.empty(num_kv_heads, seq_len, dtype=torch.float32, device=queries.device)
    strides_k = KEY_LAYOUTS[layout](cache)
    common = dict(GROUP=num_q_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
                  BLOCK_W=block_w, BLOCK_N=block_n,
                  BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    _window_stats_kernel[(num_q_heads, triton.cdiv(window, block_w))](
        queries, cache, block_ids, stats_m, stats_l, seq_len, window, scale, float(softcap),
        *queries.stride(), *strides_k, **common)
    _window_mass_kernel[(num_kv_heads, triton.cdiv(seq_len, block_n))](
        queries, cache, block_ids, stats_m, stats_l, out, seq_len, window, scale,
        float(softcap), *queries.stride(), *strides_k, **common)
    return out
