"""Expected attention: the attention *future* queries are expected to pay each key.

Reference: NVIDIA kvpress's ``ExpectedAttentionPress`` (Devoto et al., "Expected Attention: KV
cache compression by estimating attention from future queries distribution", 2025,
https://arxiv.org/abs/2510.00636). Training-free and query-agnostic.

Scoring, per query head (fp32):

1. The window's queries (post-RoPE, positions ``L-w .. L-1``) are rotated back to pre-RoPE with
   the model's own RoPE table; their mean ``mu`` and covariance ``S`` model the next queries.
2. ``R`` is the average RoPE rotation over the next ``future_positions`` positions
   ``L .. L+n-1`` (clipped to the model's maximum position); ``mu' = R mu``, ``S' = R S R^T``.
3. For a Gaussian query ``q ~ N(mu', S')`` and scale ``c``, ``E[exp(c q.k)] =
   exp(c mu'.k + c^2 k^T S' k / 2)``; a softmax of that logit over the non-sink keys is the
   expected attention.
4. Averaged over the query heads of each KV head's group and multiplied by ``||v||_2`` (a key
   that is attended but carries a small value matters less).

Design difference from kvpress: kvpress takes the statistics of *every* prompt query except the
sinks; the engine keeps only the last ``window`` queries (chunked prefill discards the others),
so the statistics come from the observation window. Logit soft-capping is not modelled (the
Gaussian moment has no closed form under ``tanh``). Default selection ``per_head`` (kvpress's
scorer presses pick per head).

Inputs: ``queries [Hq, w, D]``, ``keys [H, L, D]``, ``values [H, L, D]``, ``rotary``.
Output: scores ``[H, L]`` float32 (sinks scored 0: they are always kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KEYS, QUERIES, ROTARY, VALUES, LayerObservation
from .params import Param

FUTURE_POSITIONS = Param("future_positions", int, 512, "expected_attention: how many future "
                         "query positions the RoPE rotation is averaged over.", minimum=1,
                         maximum=1 << 20, request_max=8192)


@dataclass(frozen=True)
class ExpectedAttention:
    """Expected-attention scorer.

    Attributes:
        future_positions: number of future positions whose RoPE rotation is averaged.
    """

    future_positions: int = 512
    inputs: ClassVar[frozenset[str]] = frozenset({QUERIES, KEYS, VALUES, ROTARY})

    def __post_init__(self) -> None:
        if self.future_positions < 1:
            raise ValueError(f"future_positions must be >= 1, got {self.future_positions}")

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[H, L]`` float32 expected attention times value norm; sinks 0."""
        queries = obs.require(QUERIES).float()  # [Hq, w, D]
        keys = obs.require(KEYS).float()  # [H, L, D]
        values = obs.require(VALUES).float()
        rotary = obs.require(ROTARY)
        num_q_heads, window, head_dim = queries.shape
        num_kv_heads, seq_len, _ = keys.shape
        device = keys.device
        # Logical positions: after earlier evictions (decode time) they run past seq_len.
        end = obs.positions_end
        positions = torch.arange(end - window, end, device=device)
        pre_rope = rotary.rotate(queries, positions, inverse=True)  # [Hq, w, D]
        mean = pre_rope.mean(dim=1)  # [Hq, D]
        centered = pre_rope - mean[:, None, :]
        cov = centered.transpose(1, 2) @ centered / window  # [Hq, D, D]
        first = min(end, rotary.max_positions - 1)
        last = min(end + self.future_positions, rotary.max_positions)
        future = torch.arange(first, max(last, first + 1))
        rotation = rotary.mean_rotation(future).to(device)  # [D, D]
        mean = mean @ rotation.T
        cov = rotation @ cov @ rotation.T
        scale = obs.attn_scale if obs.attn_scale is not None else 1.0 / math.sqrt(head_dim)
        group = num_q_heads // num_kv_heads
        sinks = min(obs.sink_tokens, seq_len - 1)
        k = keys[:, sinks:, :].repeat_interleave(group, dim=0)  # [Hq, L-s, D]
        logits = scale * (k @ mean[:, :, None]).squeeze(-1)
        logits = logits + 0.5 * scale * scale * ((k @ cov) * k).sum(-1)
        expected = torch.softmax(logits, dim=-1).view(num_kv_heads, group, -1).mean(dim=1)
        scores = torch.zeros(num_kv_heads, seq_len, dtype=torch.float32, device=device)
        scores[:, sinks:] = expected * torch.linalg.vector_norm(values[:, sinks:], dim=-1)
        return scores
