"""Top-k selection around any scorer: sinks + window + the best-scoring other tokens.

This is the generic selector (kvpress's ``ScorerPress`` convention): the scorer says what each
token is worth per KV head, ``TopK`` keeps the best ``budget`` per layer in ``shared`` mode (scores
summed over KV heads) or per KV head in ``per_head`` mode (same count per head, so it frees the
same memory).

Shapes: scores ``[H, L]`` float32; kept indices ``[H, budget]`` int64, rows sorted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerObservation, Scorer, ScorerSelector, select, select_per_mode


@dataclass(frozen=True)
class TopK(ScorerSelector):
    """Token-level top-k selection.

    Attributes:
        scorer: any ``Scorer``.
        head_select: ``shared`` or ``per_head``.
    """

    scorer: Scorer
    head_select: str = "shared"

    def __post_init__(self) -> None:
        self._check_selector()

    def selection_layer(self, layer_idx: int) -> int:
        # A scorer that reads nothing of the layer scores every layer alike: compute once.
        return 0 if not self.scorer.inputs else layer_idx

    def select(self, obs: LayerObservation, scores: torch.Tensor) -> torch.Tensor:
        return select_per_mode(scores, self.head_select, lambda row: select(
            row, obs.budget, obs.sink_tokens, obs.window), obs.shared_total)
