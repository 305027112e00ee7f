"""SnapKV's scorer: the tokens the observation window attends to most.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024),
https://arxiv.org/abs/2404.14469

Scoring: the last ``w`` prompt queries attend causally to all prompt keys (fp32 softmax); the
weights are summed over the window and over the query heads of each KV head's group, then
average-pooled along tokens with kernel ``pool_kernel`` (``count_include_pad``, as SnapKV).
Selection is generic (``TopK``): ``shared`` sums the scores over KV heads (one token set per
layer), ``per_head`` lets each KV head keep its own tokens (the paper's original form).

Inputs: ``window_attention [H, L]``. Output: scores ``[H, L]`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import WINDOW_ATTENTION, LayerObservation
from .params import Param
from .window_scoring import pool_scores

POOL_KERNEL = Param("pool_kernel", int, 5, "SnapKV average-pooling width over tokens (odd).",
                    minimum=1, odd=True, bound="max_model_len", request_max=63)


@dataclass(frozen=True)
class SnapKV:
    """Window-attention scorer.

    Attributes:
        pool_kernel: odd width of the average pooling over tokens (SnapKV: pooling; kvpress: 5).
    """

    pool_kernel: int = 5
    inputs: ClassVar[frozenset[str]] = frozenset({WINDOW_ATTENTION})

    def __post_init__(self) -> None:
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd integer, got {self.pool_kernel}")

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[H, L]`` float32 pooled window-attention scores, per KV head."""
        return pool_scores(obs.require(WINDOW_ATTENTION).float(), self.pool_kernel)
