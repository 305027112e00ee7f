"""Observation-window attention scores: the torch reference of the scoring kernel.

The last ``w`` prompt queries attend (causally, softmax in fp32) to every prompt key; the
attention weights are summed over those queries and over the query heads that share a KV head
(GQA). This is the scoring step of SnapKV, ChunkKV and PyramidKV.
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import avg_pool1d


def window_attention_scores(queries: torch.Tensor, keys: torch.Tensor,
                            scale: float | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Attention mass each key receives from the observation window, per KV head.

    Args:
        queries: ``[num_q_heads, w, head_dim]``, the queries of the last ``w`` prompt tokens.
        keys: ``[num_kv_heads, L, head_dim]``, all prompt keys, ``L >= w``.
        scale: softmax scale (the attention layer's own), ``1 / sqrt(head_dim)`` when ``None``.
        softcap: the layer's logit soft-cap (Gemma-2 style ``c * tanh(s / c)``); 0 disables it.

    Returns:
        ``[num_kv_heads, L]`` float32: for each KV head and key, the sum over the window queries
        and the query heads of its group of the causal softmax weight.
    """
    if queries.dim() != 3 or keys.dim() != 3:
        raise ValueError(f"queries and keys must be 3-D, got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    num_q_heads, window, head_dim = queries.shape
    num_kv_heads, seq_len, key_dim = keys.shape
    if key_dim != head_dim:
        raise ValueError(f"head_dim mismatch: queries {head_dim}, keys {key_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} not a multiple of num_kv_heads {num_kv_heads}")
    if window > seq_len:
        raise ValueError(f"window {window} longer than the prompt {seq_len}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    group = num_q_heads // num_kv_heads
    q = queries.float().reshape(num_kv_heads, group * window, head_dim)
    logits = torch.bmm(q, keys.float().transpose(1, 2)) * scale  # [kv, group*w, L]
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    # Window query i sits at position L - w + i and may not see later keys.
    q_pos = torch.arange(seq_len - window, seq_len, device=keys.device).repeat(group)
    k_pos = torch.arange(seq_len, device=keys.device)
    logits.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=1)


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pools scores along tokens so a chosen token brings its neighbours (SnapKV).

    Args:
        scores: ``[..., L]`` float32.
        kernel: odd pooling width; 1 disables pooling.

    Returns:
        ``[..., L]`` float32, zero-padded at both ends (``count_include_pad``, as SnapKV does).
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool kernel must be a positive odd integer, got {kernel}")
    if kernel == 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    return avg_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(shape)
