"""KVzip: query-agnostic scores from the model reconstructing its own context.

Paper: Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
(2025), https://arxiv.org/abs/2505.23416; reference implementation: kvpress's ``KVzipPress``.

After the context (``L`` tokens) is prefilled, the model is run over reconstruction inputs, one
per context chunk ``[start, end)`` of ``chunk_size`` tokens: the repeat prompt
(``"\\n\\nRepeat the previous context exactly."`` for the first chunk, ``"\\n\\nRepeat the part of
the previous context exactly, starting with"`` + the previous chunk's last 8 ids for later ones),
the chat template's suffix (end of the user turn, start of the assistant turn), then the chunk's
own ids, teacher-forced. The reconstruction sits at positions ``L ..`` and attends to the whole
cached context and (causally) to itself; its own KV is discarded. A context token's score, per
layer and KV head, is the largest softmax weight it receives from any reconstruction query of
the KV head's group, where (as kvpress) the softmax for scoring runs over the first
``sink_tokens`` keys, the chunk's own keys and the reconstruction's keys only.

Selection is generic (``TopK``) and per layer: one physical length per request means one budget
per layer (kvpress's ``layerwise=True``), not kvpress's default global budget across layers.
``shared`` sums the scores over KV heads (one token set per layer); ``per_head`` gives each KV head
its own top-k of the same count (kvpress's ``layerwise=True`` ranks all heads of a layer jointly,
so its heads keep different counts: memory it cannot free).

The engine computes the scores (``engine/reconstruction.py``); this module holds the pure parts:
the repeat prompt, the chunk plan and the score of one chunk.

Inputs: ``reconstruction_attention [H, L]``. Output: scores ``[H, L]`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import RECONSTRUCTION_ATTENTION, LayerObservation
from .params import Param

# No deployment bound (`max_model_len`): a chunk longer than the context is one pass over the
# whole context, so the default stays valid on a server whose max_model_len is below it.
KVZIP_CHUNK_SIZE = Param("kvzip_chunk_size", int, 2048, "kvzip: context tokens reconstructed by "
                         "each scoring pass (bounds the extra memory).", minimum=1,
                         request_max=4096)

#: Repeat prompt of the first chunk and of later ones (kvpress's text, verbatim).
FIRST_CHUNK_PROMPT = "\n\nRepeat the previous context exactly."
LATER_CHUNK_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
#: Ids of the previous chunk repeated after ``LATER_CHUNK_PROMPT``.
PREVIOUS_TAIL = 8


@dataclass(frozen=True)
class RepeatPrompt:
    """The token ids around each reconstructed chunk, from the model's tokenizer.

    Attributes:
        first_ids: ids of ``FIRST_CHUNK_PROMPT``.
        later_ids: ids of ``LATER_CHUNK_PROMPT``.
        suffix_ids: the chat template's end of user turn + start of assistant turn (``"\\n"``
            for a tokenizer without a chat template), as kvpress derives it.
    """

    first_ids: tuple[int, ...]
    later_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> RepeatPrompt:
        """Builds the ids as kvpress does (no special tokens added)."""
        if getattr(tokenizer, "chat_template", None) is None:
            suffix = "\n"
        else:
            dummy = "dummy context"
            separator = "\n" + "#" * len(dummy)
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": dummy + separator}], add_generation_prompt=True,
                tokenize=False, enable_thinking=False)
            suffix = text.split(separator)[1]

        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        return cls(encode(FIRST_CHUNK_PROMPT), encode(LATER_CHUNK_PROMPT), encode(suffix))


@dataclass(frozen=True)
class ReconstructionChunk:
    """One scoring pass.

    Attributes:
        start: first context index reconstructed.
        end: one past the last.
        input_ids: the pass's ids: repeat prompt + suffix + ``context[start:end]``.
    """

    start: int
    end: int
    input_ids: tuple[int, ...]


def reconstruction_chunks(context_ids: list[int] | tuple[int, ...], prompt: RepeatPrompt,
                          chunk_size: int) -> list[ReconstructionChunk]:
    """The scoring passes over a context, chunked as kvpress chunks it (from index 0: the
    engine's context is the whole prompt).

    Args:
        context_ids: ``[L]`` the context's token ids.
        prompt: the repeat prompt's ids.
        chunk_size: context tokens per pass.
    """
    if chunk_size < 1:
        raise ValueError(f"kvzip_chunk_size must be >= 1, got {chunk_size}")
    context = tuple(context_ids)
    chunks = []
    for start in range(0, len(context), chunk_size):
        end = min(start + chunk_size, len(context))
        if start == 0:
            lead = prompt.first_ids
        else:
            lead = prompt.later_ids + context[max(start - PREVIOUS_TAIL, 0):start]
        chunks.append(ReconstructionChunk(start, end, lead + prompt.suffix_ids
                                          + context[start:end]))
    return chunks


def chunk_scores(queries: torch.Tensor, context_keys: torch.Tensor, own_keys: torch.Tensor,
                 start: int, end: int, sink_tokens: int, scale: float) -> torch.Tensor:
    """KVzip's score of the context tokens ``[start, end)`` from one reconstruction pass.

    Args:
        queries: ``[Hq, q, D]`` the pass's post-RoPE queries.
        context_keys: ``[H, L, D]`` the cached context's post-RoPE keys.
        own_keys: ``[H, q, D]`` the pass's own post-RoPE keys.
        start: first context index the pass reconstructs.
        end: one past the last.
        sink_tokens: leading keys inside the scoring softmax (``min(sink_tokens, start)``).
        scale: the layer's softmax scale.

    Returns:
        ``[H, end - start]`` float32: per KV head, the largest weight over the group's query
        heads and the pass's queries, softmax over [sinks, chunk, own keys] (causal on own).
    """
    head_dim = queries.shape[-1]
    num_kv_heads, context_len, _ = context_keys.shape
    keys = torch.cat([context_keys, own_keys], dim=1).float()  # [H, L + q, D]
    grouped = queries.float().reshape(num_kv_heads, -1, head_dim)  # [H, G * q, D]
    logits = scale * grouped @ keys.transpose(1, 2)  # [H, G * q, L + q]
    return scores_from_logits(logits, context_len, start, end, sink_tokens)


def scores_from_logits(logits: torch.Tensor, context_len: int, start: int, end: int,
                       sink_tokens: int) -> torch.Tensor:
    """``chunk_scores`` from a pass's attention logits over [context, own keys].

    Args:
        logits: ``[H, G * q, L + q]`` float32 (query heads of a KV head's group outer, queries
            inner), causal mask on the own keys not yet applied (it is applied here, in place).
        context_len: ``L``.
        start: first context index the pass reconstructs.
        end: one past the last.
        sink_tokens: leading keys inside the scoring softmax.

    Returns:
        ``[H, end - start]`` float32.
    """
    num_kv_heads, rows, _ = logits.shape
    q_len = logits.shape[-1] - context_len
    own = logits[:, :, context_len:].view(num_kv_heads, rows // q_len, q_len, q_len)
    own.masked_fill_(torch.ones(q_len, q_len, dtype=torch.bool, device=logits.device).triu(1),
                     float("-inf"))
    sinks = min(sink_tokens, start)
    if start == 0 and end == context_len:
        subset = logits  # one pass over the whole context: the subset is every key
    else:
        subset = torch.cat([logits[:, :, :sinks], logits[:, :, start:end],
                            logits[:, :, context_len:]], dim=-1)
    weights = torch.softmax(subset, dim=-1)
    return weights[:, :, sinks:sinks + end - start].amax(dim=1)


@dataclass(frozen=True)
class KVzip:
    """KVzip scorer: the engine's reconstruction scores, as they are.

    Attributes:
        chunk_size: context tokens reconstructed per pass (the engine reads it).
    """

    chunk_size: int = 2048
    inputs: ClassVar[frozenset[str]] = frozenset({RECONSTRUCTION_ATTENTION})

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"kvzip_chunk_size must be >= 1, got {self.chunk_size}")

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[H, L]`` float32 reconstruction scores."""
        return obs.require(RECONSTRUCTION_ATTENTION).float()
