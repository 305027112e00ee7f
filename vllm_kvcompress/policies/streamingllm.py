"""StreamingLLM's scorer: attention sinks plus the most recent tokens.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024),
https://arxiv.org/abs/2309.17453

The score of token ``t`` is ``t`` itself (later = better), so top-k selection keeps the sinks
(always protected) and the most recent ``budget - sink_tokens`` tokens. Reads nothing from the
model: every layer and head keeps the same tokens, and prefix-cache hits need no recompute.

Inputs: none. Output: scores ``[H, L]`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import LayerObservation


@dataclass(frozen=True)
class StreamingLLM:
    """Recency scorer; parameter-free beyond the shared ``sink_tokens`` and budget."""

    inputs: ClassVar[frozenset[str]] = frozenset()

    def score(self, obs: LayerObservation) -> torch.Tensor:
        positions = torch.arange(obs.seq_len, dtype=torch.float32, device=obs.device)
        return positions.expand(obs.num_kv_heads, -1)
