"""What every policy shares: the observation it sees, the protocols, and ``select``.

A policy answers one question per layer: *which prompt tokens keep their KV?* It never moves
memory (that is the engine's and the kernels' job), so everything here is pure torch and runs
on any device, with no vLLM import.

Conventions used throughout (``L`` = prompt length, ``w`` = observation window, ``s`` = sinks):

* ``queries``: ``[num_q_heads, w, head_dim]``, the last ``w`` prompt tokens' queries after RoPE.
* ``keys``: ``[num_kv_heads, L, head_dim]``, every prompt token's key after RoPE.
* scores: ``[L]`` float32, higher = more worth keeping.
* kept indices: ``[budget]`` int64, sorted ascending, unique, always containing the ``s`` sinks
  ``[0, s)`` and the window ``[L - w, L)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SelectionKernels:
    """Device kernels a policy may use in place of its torch reference (same contracts).

    Attributes:
        chunk_means: ``(scores [n], chunk_size) -> (means, sizes)``, see ``chunk_means``.
        descending_order: ``values [n] -> indices best first, ties by index``.
    """

    chunk_means: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
    descending_order: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerObservation:
    """Everything a policy may look at for one layer of one request.

    Attributes:
        seq_len: prompt length ``L``.
        budget: number of tokens this layer must keep (already clamped to ``[s + w, L]``).
        sink_tokens: ``s``, leading tokens always kept.
        window: ``w``, trailing tokens always kept (they are also the observation window).
        layer_idx: index of the layer, ``0 <= layer_idx < num_layers``.
        num_layers: number of attention layers of the model.
        queries: ``[num_q_heads, w, head_dim]`` or ``None`` for policies that need no scores.
        keys: ``[num_kv_heads, L, head_dim]`` or ``None`` for policies that need no scores.
        window_scores: ``[num_kv_heads, L]`` float32 window-attention mass already computed from
            the paged cache by a kernel; scorers use it instead of queries and keys.
        kernels: device kernels for selection steps, or ``None`` for the torch references.
    """

    seq_len: int
    budget: int
    sink_tokens: int
    window: int
    layer_idx: int = 0
    num_layers: int = 1
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    window_scores: torch.Tensor | None = None
    kernels: SelectionKernels | None = None

    def __post_init__(self) -> None:
        if self.sink_tokens < 0 or self.window < 0:
            raise ValueError(f"sink_tokens and window must be >= 0, got {self.sink_tokens}, "
                             f"{self.window}")
        if not self.sink_tokens + self.window <= self.budget <= self.seq_len:
            raise ValueError(
                f"need 0 <= sink_tokens + window <= budget <= seq_len, got sink_tokens="
                f"{self.sink_tokens}, window={self.window}, budget={self.budget}, "
                f"seq_len={self.seq_len}"
            )
        if not 0 <= self.layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {self.layer_idx} outside [0, {self.num_layers})")

    def require_qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(queries, keys)`` or raises if the caller did not provide them."""
        if self.queries is None or self.keys is None:
            raise ValueError("this policy scores tokens and needs queries and keys")
        return self.queries, self.keys


@runtime_checkable
class Scorer(Protocol):
    """Turns one layer's observation into a per-token importance score ``[L]`` (float32)."""

    def score(self, obs: LayerObservation) -> torch.Tensor: ...


@runtime_checkable
class KVPolicy(Protocol):
    """Chooses the kept tokens of one layer.

    ``layer_budget`` lets a policy spread a request's budget unevenly over layers (PyramidKV);
    ``protected`` is the count of always-kept tokens (sinks + window) inside ``budget``;
    ``selection_layer`` lets a layer reuse another layer's selection (ChunkKV index reuse).
    """

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int: ...

    def selection_layer(self, layer_idx: int) -> int: ...

    def keep_indices(self, obs: LayerObservation) -> torch.Tensor: ...


def protected_mask(seq_len: int, sink_tokens: int, window: int, device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
    """Boolean ``[L]`` mask of the tokens every policy keeps: sinks and the observation window."""
    mask = torch.zeros(seq_len, dtype=torch.bool, device=device)
    mask[: min(sink_tokens, seq_len)] = True
    if window > 0:
        mask[max(seq_len - window, 0):] = True
    return mask


def select(scores: torch.Tensor, budget: int, sink_tokens: int, window: int) -> torch.Tensor:
    """Keeps sinks, the window, and the best-scoring other tokens, ``budget`` in all.

    Ties are broken towards the earlier token (stable sort), so the result is deterministic and a
    kernel can reproduce it bit for bit.

    Args:
        scores: ``[L]`` importance per token; the scores of sinks and window are ignored.
        budget: total tokens to keep, ``sink_tokens + window <= budget <= L``.
        sink_tokens: leading tokens always kept.
        window: trailing tokens always kept.

    Returns:
        ``[budget]`` int64 indices, sorted ascending and unique.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [seq_len], got shape {tuple(scores.shape)}")
    seq_len = scores.shape[0]
    protected = protected_mask(seq_len, sink_tokens, window, scores.device)
    n_protected = int(protected.sum())
    if not n_protected <= budget <= seq_len:
        raise ValueError(f"budget {budget} outside [{n_protected}, {seq_len}]")
    free = budget - n_protected
    candidates = (~protected).nonzero().squeeze(1)
    cand_scores = scores.float()[candidates]
    order = torch.argsort(cand_scores, descending=True, stable=True)[:free]
    kept = torch.cat([protected.nonzero().squeeze(1), candidates[order]])
    return torch.sort(kept).values


def middle_range(seq_len: int, sink_tokens: int, window: int) -> tuple[int, int]:
    """``[start, end)`` of the tokens a policy may drop (between the sinks and the window)."""
    start = min(sink_tokens, seq_len)
    end = max(seq_len - window, start)
    return start, end
