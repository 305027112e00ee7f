"""SAGE-KV's scorer: one-shot, per-head top-k from the final prompt tokens' attention.

Paper: Wang et al., "LLMs Know What to Drop: Self-Attention Guided KV Cache Eviction for
Efficient Long-Context Inference" (SAGE-KV, 2025), https://arxiv.org/abs/2503.08879

After prefill the cache is split into sinks, candidates, a recent window and the last token; the
last token's query selects the top-k candidates *per head* (token level and head level), and
decoding continues over sinks + selected + recent. Here: the sinks and the window are the common
``sink_tokens`` / ``window`` settings (always kept), the score is the attention the last
``sage_queries`` prompt queries pay each key, summed over the query heads of each KV head's group
(the paper uses the last token: ``sage_queries = 1``), and the default selection is
``per_head`` (the paper's head level). With ``sage_queries = 1`` and ``shared`` selection it ranks
tokens as ``tova`` does. Unlike SnapKV there is no pooling.

Inputs: ``queries [Hq, w, D]`` (the last ``sage_queries`` rows), ``keys [H, L, D]``.
Output: scores ``[H, L]`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KEYS, QUERIES, LayerObservation
from .params import Param
from .tova import last_queries_attention

SAGE_QUERIES = Param("sage_queries", int, 1, "SAGE-KV: how many final prompt tokens' queries "
                     "score the keys (the paper: 1; values above window use the whole window).",
                     minimum=1, bound="max_model_len", request_max=1024)


@dataclass(frozen=True)
class SageKV:
    """Final-queries attention scorer.

    Attributes:
        sage_queries: number of final prompt queries whose attention is summed (capped at
            ``window``).
    """

    sage_queries: int = 1
    inputs: ClassVar[frozenset[str]] = frozenset({QUERIES, KEYS})

    def __post_init__(self) -> None:
        if self.sage_queries < 1:
            raise ValueError(f"sage_queries must be >= 1, got {self.sage_queries}")

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[H, L]`` float32 attention of the last ``sage_queries`` queries."""
        return last_queries_attention(obs, min(self.sage_queries, obs.window))
