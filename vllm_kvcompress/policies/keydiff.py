"""KeyDiff's scorer: keys least similar to the layer's mean key direction are kept.

Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments" (2025), https://arxiv.org/abs/2504.15364

Per KV head, the anchor is the mean of the L2-normalised prompt keys; a key's score is minus its
cosine similarity to the anchor (distinctive keys are kept). Keys only: no queries, no attention,
so prefix-cache hits need no recompute. The paper evicts block by block while prefilling; here it
is one-shot after prefill (as kvpress's ``KeyDiffPress``). Default selection ``per_head``.

Inputs: ``keys [H, L, D]``. Output: scores ``[H, L]`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn.functional import cosine_similarity, normalize

from .base import KEYS, LayerObservation


@dataclass(frozen=True)
class KeyDiff:
    """Negative cosine similarity to the mean normalised key (no parameters)."""

    inputs: ClassVar[frozenset[str]] = frozenset({KEYS})

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[H, L]`` float32, ``-cos(k, mean(k / ||k||))`` per KV head and token."""
        keys = obs.require(KEYS).float()  # [H, L, D]
        anchor = normalize(keys, p=2, dim=-1).mean(dim=1, keepdim=True)  # [H, 1, D]
        return -cosine_similarity(keys, anchor, dim=-1)
