"""StreamingLLM: attention sinks plus the most recent tokens.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024),
https://arxiv.org/abs/2309.17453

No scoring: keep the first ``sink_tokens`` tokens and the last ``budget - sink_tokens`` tokens.
Needs no queries or keys. Kept indices ``[budget]`` int64, sorted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerObservation


@dataclass(frozen=True)
class StreamingLLM:
    """Sinks + recent tokens; parameter-free beyond the shared ``sink_tokens`` and budget."""

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int:
        return budget

    def selection_layer(self, layer_idx: int) -> int:
        # Every layer keeps the same tokens: compute once, reuse everywhere.
        return 0

    def keep_indices(self, obs: LayerObservation) -> torch.Tensor:
        device = obs.keys.device if obs.keys is not None else "cpu"
        recent = obs.budget - obs.sink_tokens
        return torch.cat([
            torch.arange(obs.sink_tokens, device=device),
            torch.arange(obs.seq_len - recent, obs.seq_len, device=device),
        ])
