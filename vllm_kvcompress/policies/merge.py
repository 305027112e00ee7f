"""Merging evicted tokens into kept ones (ZeroMerge's idea, as far as paged attention allows).

Paper: Liu et al., "ZeroMerge: Parameter-Free KV Cache Compression for Memory-Efficient
Long-Context LLMs" (2025), https://arxiv.org/abs/2503.10714

With ``merge: on`` any policy's evicted tokens are not just dropped: per KV head, each evicted
token ``e`` whose key points the same way as some kept key (cosine > 0) is folded into the most
similar kept token ``t``, its value weighted by the attention the observation window paid it::

    v_t' = (a_t v_t + sum_{e -> t} a_e v_e) / (a_t + sum_{e -> t} a_e)

Keys are left as they are (their RoPE phases stay exact). The kept token's attention *logit* is
not raised to account for the mass it absorbs: ZeroMerge adds a per-slot compensation term to the
score, and standard paged attention kernels (vLLM's FlashAttention, CPU_ATTN, Triton) have no
per-slot logit bias, so that part would need a custom attention kernel. What remains is a value
average that keeps the merged tokens' information reachable through their nearest kept key.

Shapes: keys / values ``[H, L, D]``, window attention ``[H, L]``, kept ``[H, n]`` (rows sorted),
merged values ``[H, n, D]`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import normalize

from .base import KEYS, VALUES, WINDOW_ATTENTION, KVPolicy, LayerObservation

#: Evicted tokens compared with the kept keys per matmul (bounds the ``[H, rows, n]`` buffer).
MERGE_ROWS = 2048


def merge_evicted(keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
                  kept: torch.Tensor) -> torch.Tensor:
    """Folds each head's evicted tokens into its most similar kept token.

    Args:
        keys: ``[H, L, D]``.
        values: ``[H, L, D]``.
        weights: ``[H, L]`` float32 attention mass per token (>= 0).
        kept: ``[H, n]`` int64 kept indices per head.

    Returns:
        ``[H, n, D]`` float32 merged values of the kept tokens, in ``kept``'s order.
    """
    num_heads, seq_len, _ = keys.shape
    if kept.dim() != 2 or kept.shape[0] != num_heads:
        raise ValueError(f"kept must be [{num_heads}, n], got {tuple(kept.shape)}")
    device = keys.device
    merged = []
    for head in range(num_heads):
        kept_h = kept[head].to(device)
        evicted = torch.ones(seq_len, dtype=torch.bool, device=device)
        evicted[kept_h] = False
        evicted_h = evicted.nonzero().squeeze(1)
        kept_values = values[head, kept_h].float()
        weight_kept = weights[head, kept_h].float()
        if evicted_h.numel() == 0:
            merged.append(kept_values)
            continue
        kept_dirs = normalize(keys[head, kept_h].float(), dim=-1)  # [n, D]
        value_sum = kept_values * weight_kept[:, None]
        weight_sum = weight_kept.clone()
        for start in range(0, evicted_h.numel(), MERGE_ROWS):
            rows = evicted_h[start:start + MERGE_ROWS]
            similarity = normalize(keys[head, rows].float(), dim=-1) @ kept_dirs.T
            best, target = similarity.max(dim=1)
            take = best > 0
            w = weights[head, rows].float() * take
            value_sum.index_add_(0, target, values[head, rows].float() * w[:, None])
            weight_sum.index_add_(0, target, w)
        safe = torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
        merged.append(torch.where((weight_sum > 0)[:, None], value_sum / safe[:, None],
                                  kept_values))
    return torch.stack(merged)


@dataclass(frozen=True)
class MergeEvicted:
    """Wraps any policy: same selection, and the kept tokens' values absorb the evicted ones.

    Attributes:
        policy: the wrapped policy (its scores and selection are used unchanged).
    """

    policy: KVPolicy

    @property
    def inputs(self) -> frozenset[str]:
        return self.policy.inputs | {KEYS, VALUES, WINDOW_ATTENTION}

    @property
    def head_select(self) -> str:
        return self.policy.head_select

    @property
    def scorer(self) -> object:
        """The wrapped policy's scorer, if it has one."""
        return getattr(self.policy, "scorer", None)

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int:
        return self.policy.layer_budget(budget, layer_idx, num_layers, seq_len, protected)

    def selection_layer(self, layer_idx: int) -> int:
        return self.policy.selection_layer(layer_idx)

    def score(self, obs: LayerObservation) -> torch.Tensor:
        return self.policy.score(obs)

    def select(self, obs: LayerObservation, scores: torch.Tensor) -> torch.Tensor:
        return self.policy.select(obs, scores)

    def keep_indices(self, obs: LayerObservation) -> torch.Tensor:
        return self.select(obs, self.score(obs))

    def merged_values(self, obs: LayerObservation, kept: torch.Tensor) -> torch.Tensor:
        """``[H, n, D]`` float32 values for the kept slots of this layer (its own keys, values
        and window attention; ``kept`` may come from another layer under index reuse)."""
        return merge_evicted(obs.require(KEYS), obs.require(VALUES),
                             obs.require(WINDOW_ATTENTION), kept)
