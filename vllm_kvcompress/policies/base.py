"""What every policy shares: the observation it sees, the protocols, and selection.

A policy answers one question per layer: *which prompt tokens keep their KV, in each KV head?* It
never moves memory (that is the engine's and the kernels' job), so everything here is pure torch
and runs on any device, with no vLLM import.

A policy is a *scorer* (how much each token is worth, per KV head) inside a *selector* (which
tokens to keep given the scores: ``TopK``, ``ChunkKV``, ``PyramidKV``). Scorers declare the inputs
they need; the engine provides exactly those, on every kernel path.

Conventions used throughout (``L`` = prompt length, ``w`` = observation window, ``s`` = sinks,
``H`` = KV heads of the layer):

* ``queries``: ``[num_q_heads, w, head_dim]``, the last ``w`` prompt tokens' queries after RoPE.
* ``keys`` / ``values``: ``[H, L, head_dim]``, every prompt token's key (after RoPE) / value.
* ``window_attention``: ``[H, L]`` float32, the attention mass each key receives from the window
  queries (summed over window rows and the query heads of the KV head's group).
* scores: ``[H, L]`` float32, higher = more worth keeping.
* kept indices: ``[H, budget]`` int64; each row sorted ascending, unique, always containing the
  ``s`` sinks ``[0, s)`` and the window ``[L - w, L)``. In ``shared`` mode all rows are equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .params import HEAD_SELECT_MODES

#: Inputs a scorer may declare (``Scorer.inputs``).
QUERIES = "queries"
KEYS = "keys"
VALUES = "values"
WINDOW_ATTENTION = "window_attention"
MODEL_DATA = "model_data"
ROTARY = "rotary"
#: KVzip's scores: the engine runs the context-reconstruction forward (``policies/kvzip.py``).
RECONSTRUCTION_ATTENTION = "reconstruction_attention"
INPUTS = frozenset({QUERIES, KEYS, VALUES, WINDOW_ATTENTION, MODEL_DATA, ROTARY,
                    RECONSTRUCTION_ATTENTION})


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

    Only the inputs the policy declared are filled in; the others are ``None``.

    Attributes:
        seq_len: prompt length ``L``.
        budget: number of tokens this layer must keep per KV head (clamped to ``[s + w, L]``).
        sink_tokens: ``s``, leading tokens always kept.
        window: ``w``, trailing tokens always kept (they are also the observation window).
        layer_idx: index of the layer, ``0 <= layer_idx < num_layers``.
        num_layers: number of attention layers of the model.
        num_kv_heads: ``H``, KV heads of this layer (on this rank).
        queries: ``[num_q_heads, w, head_dim]`` window queries after RoPE.
        keys: ``[H, L, head_dim]`` after RoPE.
        values: ``[H, L, head_dim]``.
        window_attention: ``[H, L]`` float32, computed by the engine (kernel or reference).
        model_data: the policy's per-model data (see ``model_data.ModelDataHook``).
        rotary: the model's RoPE (``rotary.Rotary``), for scorers that move queries between
            positions.
        kernels: device kernels for selection steps, or ``None`` for the torch references.
        attn_scale: the attention layer's softmax scale (``None``: ``1 / sqrt(head_dim)``).
        attn_softcap: the layer's logit soft-cap, 0 for none.
        kv_head_offset: global index of this rank's first KV head (tensor parallelism; per-head
            model data is indexed by global head).
        shared_total: ``[L]`` float32, the scores summed over ALL KV heads of the layer (every
            tensor-parallel rank), set by the engine under tensor parallelism; ``shared``
            selection then uses it instead of the local sum, so every rank keeps the same tokens.
        reconstruction_attention: ``[H, L]`` float32, the largest attention weight each context
            token received while the model reconstructed the context (KVzip), computed by the
            engine after the prompt's forward.
        logical_len: the sequence's logical length (positions ``0 .. logical_len-1`` seen so
            far) when earlier compactions evicted tokens (decode time); ``None``: ``seq_len``.
            The last ``window`` tokens always sit at positions ``logical_len - window ..``.
    """

    seq_len: int
    budget: int
    sink_tokens: int
    window: int
    layer_idx: int = 0
    num_layers: int = 1
    num_kv_heads: int = 1
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    window_attention: torch.Tensor | None = None
    model_data: Any = None
    rotary: Any = None
    kernels: SelectionKernels | None = None
    attn_scale: float | None = None
    attn_softcap: float = 0.0
    kv_head_offset: int = 0
    shared_total: torch.Tensor | None = None
    logical_len: int | None = None
    reconstruction_attention: torch.Tensor | None = None

    @property
    def positions_end(self) -> int:
        """One past the logical position of the last token (RoPE positions)."""
        return self.seq_len if self.logical_len is None else self.logical_len

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
        if self.logical_len is not None and self.logical_len < self.seq_len:
            raise ValueError(f"logical_len {self.logical_len} < seq_len {self.seq_len}")
        if not 0 <= self.layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {self.layer_idx} outside [0, {self.num_layers})")
        if self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be >= 1, got {self.num_kv_heads}")

    def require(self, name: str) -> Any:
        """The input ``name`` or a clear error if the caller did not provide it."""
        value = getattr(self, name)
        if value is None and name == WINDOW_ATTENTION and self.queries is not None and \
                self.keys is not None:
            # Pure use (tests, notebooks): derive it with the torch reference, as the engine's
            # torch path does.
            from .window_scoring import window_attention_scores

            if self.window < 1 or self.queries.shape[1] < self.window:
                raise ValueError(f"scoring needs window >= 1 queries, got window={self.window} "
                                 f"and {self.queries.shape[1]} queries")
            return window_attention_scores(self.queries[:, -self.window:, :], self.keys,
                                           self.attn_scale, self.attn_softcap)
        if value is None:
            raise ValueError(f"this scorer needs {name!r}, which was not provided (declare it "
                             "in the scorer's `inputs`)")
        return value

    @property
    def device(self) -> torch.device:
        for tensor in (self.window_attention, self.keys, self.queries, self.values):
            if tensor is not None:
                return tensor.device
        return torch.device("cpu")


@runtime_checkable
class Scorer(Protocol):
    """Per-token importance of one layer, per KV head.

    Attributes:
        inputs: what ``score`` reads, a subset of ``INPUTS``; the engine provides exactly these.
    """

    inputs: frozenset[str]

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[num_kv_heads, L]`` float32 scores, higher = keep."""
        ...


@runtime_checkable
class KVPolicy(Protocol):
    """Chooses the kept tokens of one layer, per KV head, in two steps.

    ``inputs`` is what the policy's scorer reads; ``layer_budget`` lets a policy spread a
    request's budget unevenly over layers (PyramidKV); ``protected`` is the count of always-kept
    tokens (sinks + window) inside ``budget``; ``selection_layer`` lets a layer reuse another
    layer's selection (ChunkKV index reuse). ``score`` then ``select``: the engine sits between
    the two under tensor parallelism (it all-reduces the head-summed scores so every rank selects
    the same tokens in ``shared`` mode).
    """

    inputs: frozenset[str]
    head_select: str

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int: ...

    def selection_layer(self, layer_idx: int) -> int: ...

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[num_kv_heads, L]`` float32 scores."""
        ...

    def select(self, obs: LayerObservation, scores: torch.Tensor) -> torch.Tensor:
        """Returns ``[num_kv_heads, budget]`` int64 kept indices, each row sorted and unique."""
        ...

    def keep_indices(self, obs: LayerObservation) -> torch.Tensor:
        """``select(obs, score(obs))``."""
        ...


class ScorerSelector:
    """What every selector around a scorer shares (``TopK``, ``ChunkKV``, ``PyramidKV``): its
    inputs are the scorer's, ``score`` delegates, the budget is uniform unless overridden, and
    ``keep_indices`` is ``select(score)``. Subclasses are frozen dataclasses with ``scorer`` and
    ``head_select`` fields and implement ``select`` and ``selection_layer``."""

    scorer: Scorer
    head_select: str

    def _check_selector(self) -> None:
        check_head_select(self.head_select)
        check_inputs(self.scorer.inputs)

    @property
    def inputs(self) -> frozenset[str]:
        return self.scorer.inputs

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int:
        return budget

    def score(self, obs: LayerObservation) -> torch.Tensor:
        return self.scorer.score(obs)

    def select(self, obs: LayerObservation, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def keep_indices(self, obs: LayerObservation) -> torch.Tensor:
        return self.select(obs, self.score(obs))


def needs_queries(policy: KVPolicy) -> bool:
    """Whether the policy reads the window's queries (a prefix-cache hit cannot supply them)."""
    return bool(policy.inputs & {QUERIES, WINDOW_ATTENTION})


def check_inputs(inputs: frozenset[str]) -> frozenset[str]:
    """Validates a scorer's declared inputs."""
    unknown = set(inputs) - INPUTS
    if unknown:
        raise ValueError(f"unknown scorer inputs {sorted(unknown)}; allowed: {sorted(INPUTS)}")
    return frozenset(inputs)


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


def select_per_mode(scores: torch.Tensor, head_select: str,
                    pick: Callable[[torch.Tensor], torch.Tensor],
                    shared_total: torch.Tensor | None = None) -> torch.Tensor:
    """Applies a 1-D selection rule in ``shared`` or ``per_head`` mode.

    Args:
        scores: ``[H, L]`` float32 per-head scores.
        head_select: ``shared`` (scores summed over heads, one selection for every head) or
            ``per_head`` (each head ranks its own scores; every row keeps the same count).
        pick: ``scores [L] -> kept [budget]`` (``select``, ``chunk_select``, ...).
        shared_total: ``[L]`` head-summed scores of every rank (tensor parallelism); ``shared``
            mode ranks these instead of the local sum.

    Returns:
        ``[H, budget]`` int64 kept indices, rows sorted.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_kv_heads, L], got shape {tuple(scores.shape)}")
    if head_select == "shared":
        total = scores.float().sum(dim=0) if shared_total is None else shared_total.float()
        kept = pick(total)
        return kept.unsqueeze(0).expand(scores.shape[0], -1).contiguous()
    if head_select == "per_head":
        return torch.stack([pick(row) for row in scores.float()])
    raise ValueError(f"head_select must be one of {', '.join(HEAD_SELECT_MODES)}, got "
                     f"{head_select!r}")


def check_head_select(head_select: str) -> None:
    if head_select not in HEAD_SELECT_MODES:
        raise ValueError(f"head_select must be one of {', '.join(HEAD_SELECT_MODES)}, got "
                         f"{head_select!r}")
