"""ChunkKV's chunk aggregation and exact top-k ranking (Triton).

Reference: ``vllm_kvcompress.policies.chunkkv.chunk_means`` and the stable descending argsort in
``chunk_select``. Kept indices must match the reference exactly, so:

* ``_chunk_means_kernel`` adds each chunk's float32 scores left to right, the order
  ``chunk_means`` fixes, giving bit-identical means;
* ``_chunk_rank_kernel`` ranks by counting: ``rank[c] = #{j : mean_j > mean_c or
  (mean_j == mean_c and j < c)}``, i.e. the position of ``c`` in a stable descending sort.

``chunk_select_triton`` then runs the reference's own epilogue (whole chunks while they fit, one
trimmed boundary chunk), so the result equals ``chunk_select`` index for index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.policies.chunkkv import chunk_select


@triton.jit
def _chunk_means_kernel(S, Means, n, n_chunks, chunk, BLOCK_C: tl.constexpr):
    # ``chunk`` is a runtime argument, not a constexpr: it comes from a request
    # (kv_chunk_size), and a constexpr would compile a new kernel for every distinct value a
    # client sends.
    chunks = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = chunks < n_chunks
    acc = tl.zeros([BLOCK_C], tl.float32)
    for i in range(chunk):  # left to right, as the reference
        idx = chunks * chunk + i
        acc += tl.load(S + idx, mask=ok & (idx < n), other=0.0)
    size = tl.minimum(n - chunks * chunk, chunk).to(tl.float32)
    # IEEE round-to-nearest division: Triton's `/` on float32 compiles to the approximate
    # div.full.f32 on NVIDIA GPUs (up to 2 ulp off), which broke bit-identity with the
    # reference's means there (seen on an H200; the CPU interpreter divides exactly).
    tl.store(Means + chunks, tl.math.div_rn(acc, size), mask=ok)


@triton.jit
def _chunk_rank_kernel(Means, Rank, n_chunks, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    chunks = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = chunks < n_chunks
    mine = tl.load(Means + chunks, mask=ok, other=0.0)
    rank = tl.zeros([BLOCK_C], tl.int32)
    for start in range(0, n_chunks, BLOCK_J):
        others = start + tl.arange(0, BLOCK_J)
        theirs = tl.load(Means + others, mask=others < n_chunks, other=float("-inf"))
        before = (theirs[None, :] > mine[:, None]) | (
            (theirs[None, :] == mine[:, None]) & (others[None, :] < chunks[:, None]))
        before = before & (others[None, :] < n_chunks)
        rank += tl.sum(before.to(tl.int32), axis=1)
    tl.store(Rank + chunks, rank, mask=ok)


def chunk_means_triton(scores: torch.Tensor, chunk_size: int, block_c: int = 128
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``chunk_means``: ``(means [n_chunks], sizes [n_chunks])`` float32."""
    if scores.dim() != 1 or scores.dtype != torch.float32:
        raise ValueError("scores must be a 1-D float32 tensor")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = scores.shape[0]
    n_chunks = triton.cdiv(n, chunk_size)
    means = torch.empty(n_chunks, dtype=torch.float32, device=scores.device)
    if n_chunks:
        _chunk_means_kernel[(triton.cdiv(n_chunks, block_c),)](
            scores.contiguous(), means, n, n_chunks, chunk_size, BLOCK_C=block_c)
    sizes = torch.full((n_chunks,), float(chunk_size), device=scores.device)
    if n_chunks:
        sizes[-1] = n - (n_chunks - 1) * chunk_size
    return means, sizes


def stable_descending_order(values: torch.Tensor, block_c: int = 64, block_j: int = 128
                            ) -> torch.Tensor:
    """Drop-in for ``torch.argsort(values, descending=True, stable=True)`` (1-D float32)."""
    if values.dim() != 1 or values.dtype != torch.float32:
        raise ValueError("values must be a 1-D float32 tensor")
    if torch.isnan(values).any():
        raise ValueError("values must not contain NaN")
    n = values.shape[0]
    rank = torch.empty(n, dtype=torch.int32, device=values.device)
    if n:
        _chunk_rank_kernel[(triton.cdiv(n, block_c),)](values.contiguous(), rank, n,
                                                       BLOCK_C=block_c, BLOCK_J=block_j)
    order = torch.empty(n, dtype=torch.int64, device=values.device)
    order[rank.long()] = torch.arange(n, device=values.device)
    return order


def chunk_select_triton(scores: torch.Tensor, budget: int, sink_tokens: int, window: int,
                        chunk_size: int) -> torch.Tensor:
    """``chunk_select`` with the aggregation and ranking on the kernels; identical output."""
    return chunk_select(scores, budget, sink_tokens, window, chunk_size,
                        aggregate=chunk_means_triton, order=stable_descending_order)
