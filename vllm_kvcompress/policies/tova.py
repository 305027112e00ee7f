"""TOVA's scorer: the attention of the last prompt token.

Paper: Oren et al., "Transformers are Multi-State RNNs" (TOVA, Token Omission Via Attention,
2024), https://arxiv.org/abs/2401.06104

Scoring: the last prompt token's query attends (fp32 softmax, the layer's own scale and soft-cap)
to every prompt key; the weights are summed over the query heads of each KV head's group. TOVA
averages over *all* heads and keeps one token set per layer, which is ``shared`` selection here
(the sum over KV heads ranks tokens exactly as the mean over heads does), so ``shared`` is its
default; ``per_head`` is the SAGE-KV variant (see ``sagekv``).

Inputs: ``queries [Hq, w, D]`` (only the last row is read), ``keys [H, L, D]``.
Output: scores ``[H, L]`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KEYS, QUERIES, LayerObservation
from .window_scoring import window_attention_scores


def last_queries_attention(obs: LayerObservation, count: int) -> torch.Tensor:
    """``[H, L]`` float32: attention the last ``count`` prompt queries pay each key, summed over
    those queries and over the query heads of each KV head's group."""
    queries = obs.require(QUERIES)
    if queries.shape[1] < count:
        raise ValueError(f"need the last {count} queries, the observation has "
                         f"{queries.shape[1]} (window={obs.window})")
    return window_attention_scores(queries[:, -count:, :], obs.require(KEYS), obs.attn_scale,
                                   obs.attn_softcap)


@dataclass(frozen=True)
class TOVA:
    """Last-token attention scorer (no parameters beyond the common settings)."""

    inputs: ClassVar[frozenset[str]] = frozenset({QUERIES, KEYS})

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[H, L]`` float32: the last prompt token's attention, per KV head."""
        return last_queries_attention(obs, 1)
