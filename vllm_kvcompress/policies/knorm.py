"""Key-norm scorer: keys with a small L2 norm are kept.

Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(2024), https://arxiv.org/abs/2406.11430

Keys with a low L2 norm tend to receive high attention, so the score is ``-||k||_2`` (fp32, so
low-precision caches do not tie distinct tokens). Reads keys only: no queries, no attention, so a
prefix-cache hit needs no window recompute. Per KV head by nature; the default selection is
``per_head`` (as the paper and kvpress's ``KnormPress``).

Inputs: ``keys [H, L, D]``. Output: scores ``[H, L]`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KEYS, LayerObservation


@dataclass(frozen=True)
class KeyNorm:
    """Negative key L2 norm scorer (no parameters)."""

    inputs: ClassVar[frozenset[str]] = frozenset({KEYS})

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[H, L]`` float32, ``-||k||_2`` per KV head and token."""
        return -torch.linalg.vector_norm(obs.require(KEYS).float(), dim=-1)
