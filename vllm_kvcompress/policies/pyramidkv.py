"""PyramidKV: more KV for lower layers, less for upper layers, same total.

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (2024), https://arxiv.org/abs/2406.02069

Wraps a token scorer (SnapKV by default). The droppable part of a uniform budget ``m`` (budget
minus sinks and window) is spread over layers as an arithmetic sequence from ``max`` at layer 0
down to ``min = m / beta`` at the top layer, with ``max + min = 2 m`` so the total over layers
equals the uniform total exactly (integer remainders go to the lowest layers; no layer exceeds
the prompt). Within a layer, selection is top-k (``select``), shared over KV heads or per head.

Serving note: a request has one block table, so its physical KV length is set by the LARGEST
layer budget, and the engine fills every layer to it (the lower-budget layers keep their
next-best tokens): in memory PyramidKV holds layer 0's budget. See docs/ARCHITECTURE.md.

Shapes: scores ``[H, L]`` float32; kept indices ``[H, layer_budget]`` int64, rows sorted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import LayerObservation, Scorer, ScorerSelector, select, select_per_mode
from .params import Param
from .snapkv import SnapKV

BETA = Param("beta", float, 20.0, "PyramidKV: ratio between the mean and the top layer's "
             "droppable budget.", minimum=1, maximum=1000)


@dataclass(frozen=True)
class PyramidKV(ScorerSelector):
    """Per-layer budget schedule around a token scorer.

    Attributes:
        scorer: any ``Scorer`` used for the per-layer top-k.
        beta: ratio between the mean and the top layer's droppable budget (paper: 20).
        head_select: ``shared`` or ``per_head``.
    """

    scorer: Scorer = field(default_factory=SnapKV)
    beta: float = 20.0
    head_select: str = "shared"

    def __post_init__(self) -> None:
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")
        self._check_selector()

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int:
        schedule = pyramid_schedule(budget - protected, num_layers, seq_len - protected, self.beta)
        return protected + schedule[layer_idx]

    def selection_layer(self, layer_idx: int) -> int:
        return layer_idx

    def select(self, obs: LayerObservation, scores: torch.Tensor) -> torch.Tensor:
        return select_per_mode(scores, self.head_select, lambda row: select(
            row, obs.budget, obs.sink_tokens, obs.window), obs.shared_total)


def pyramid_schedule(mean_free: int, num_layers: int, max_free: int, beta: float) -> list[int]:
    """Droppable-token budgets per layer: decreasing, summing to ``mean_free * num_layers``.

    Args:
        mean_free: the uniform per-layer budget beyond sinks and window,
            ``0 <= mean_free <= max_free``.
        num_layers: number of layers.
        max_free: most droppable tokens a layer can keep (prompt minus sinks and window).
        beta: ``mean / min`` ratio of the schedule.

    Returns:
        ``num_layers`` ints, non-increasing, each in ``[0, max_free]``.
    """
    if not 0 <= mean_free <= max_free:
        raise ValueError(f"mean_free {mean_free} outside [0, {max_free}]")
    if num_layers == 1:
        return [mean_free]
    low = max(mean_free / beta, 2 * mean_free - max_free)
    high = 2 * mean_free - low
    step = (high - low) / (num_layers - 1)
    budgets = [min(int(high - i * step), max_free) for i in range(num_layers)]
    remainder = mean_free * num_layers - sum(budgets)
    for i in range(num_layers):
        if remainder == 0:
            break
        room = min(max_free - budgets[i], remainder)
        budgets[i] += room
        remainder -= room
    return budgets
