"""SnapKV: keep the tokens the observation window attends to most.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024),
https://arxiv.org/abs/2404.14469

Scoring: the last ``w`` prompt queries attend causally to all prompt keys (fp32 softmax); the
weights are summed over the window and over every query head (all heads must keep the same tokens
because a request has one block table), then average-pooled with kernel ``pool_kernel``.
Selection: sinks + window + the top-scoring other tokens (``select``).

Shapes: ``queries [num_q_heads, w, head_dim]``, ``keys [num_kv_heads, L, head_dim]``,
scores ``[L]`` float32, kept indices ``[budget]`` int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerObservation, select
from .window_scoring import pool_scores, window_attention_scores


@dataclass(frozen=True)
class SnapKV:
    """Window-attention scorer and token-level policy.

    Attributes:
        pool_kernel: odd width of the average pooling over tokens (SnapKV: pooling; kvpress: 5).
    """

    pool_kernel: int = 5

    def __post_init__(self) -> None:
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd integer, got {self.pool_kernel}")

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[L]`` float32 pooled window-attention scores summed over KV heads."""
        if obs.window_scores is not None:
            return pool_scores(obs.window_scores.sum(dim=0), self.pool_kernel)
        queries, keys = obs.require_qk()
        if obs.window < 1 or queries.shape[1] < obs.window:
            raise ValueError(f"scoring needs window >= 1 queries, got window={obs.window} and "
                             f"{queries.shape[1]} queries")
        per_head = window_attention_scores(queries[:, -obs.window:, :], keys)
        return pool_scores(per_head.sum(dim=0), self.pool_kernel)

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int:
        return budget

    def selection_layer(self, layer_idx: int) -> int:
        return layer_idx

    def keep_indices(self, obs: LayerObservation) -> torch.Tensor:
        return select(self.score(obs), obs.budget, obs.sink_tokens, obs.window)
