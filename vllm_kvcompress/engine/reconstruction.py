"""KVzip's reconstruction forward, run by the worker over a request's cached context.

After the step's model forward returns (the prompt's KV is in the paged cache), the worker runs
the reconstruction passes (``policies.kvzip.reconstruction_chunks``) through vLLM's own decoder
layers of a Llama/Qwen2-style model (``model.model.layers[i]`` with ``self_attn.attn``), with each
layer's vLLM ``Attention`` swapped for ``ReconstructionAttention``: eager torch attention over
[the layer's cached context K/V, read from the paged cache, + the pass's own K/V] (causal on its
own), with the layer's own scale, that records KVzip's per-chunk scores. Nothing is written to
the paged cache and the pass's own K/V is dropped when the pass ends; the original modules are
restored in ``finally``. The layers are called directly (eager even where the model's forward is
compiled), so no vLLM forward context or attention metadata is involved.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ..policies.kvzip import RepeatPrompt, reconstruction_chunks, scores_from_logits

logger = logging.getLogger("vllm.kvcompress")


@functools.lru_cache(maxsize=8)
def repeat_prompt(tokenizer_path: str) -> RepeatPrompt:
    """The model's repeat prompt, built once per tokenizer."""
    from transformers import AutoTokenizer

    return RepeatPrompt.from_tokenizer(AutoTokenizer.from_pretrained(tokenizer_path))


class ReconstructionAttention(torch.nn.Module):
    """Stands in for one layer's vLLM ``Attention`` during a reconstruction pass.

    Args:
        num_heads: query heads of the layer (this rank).
        num_kv_heads: KV heads of the layer.
        head_size: ``D``.
        scale: the layer's softmax scale.
        context_keys: ``[H, L, D]`` the cached context's keys (post-RoPE).
        context_values: ``[H, L, D]``.
        sink_tokens: sinks inside KVzip's scoring softmax.
        scores: ``[H, L]`` float32, receives this layer's scores of each pass's chunk.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 context_keys: torch.Tensor, context_values: torch.Tensor, sink_tokens: int,
                 scores: torch.Tensor) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.context_keys = context_keys
        self.context_values = context_values
        self.sink_tokens = sink_tokens
        self.scores = scores
        #: ``(start, end)`` of the context chunk the current pass reconstructs.
        self.chunk = (0, 0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        """``query [T, Hq*D]``, ``key``/``value [T, H*D]`` -> ``[T, Hq*D]`` (input dtype)."""
        num_tokens = query.shape[0]
        heads, size = self.num_kv_heads, self.head_size
        # [H, G * T, D]: a KV head's query heads are consecutive (vLLM's GQA layout).
        queries = query.view(num_tokens, self.num_heads, size).transpose(0, 1).reshape(
            heads, -1, size).float()
        own_keys = key.view(num_tokens, heads, size).transpose(0, 1)
        own_values = value.view(num_tokens, heads, size).transpose(0, 1)
        keys = torch.cat([self.context_keys, own_keys], dim=1).float()  # [H, L + T, D]
        values = torch.cat([self.context_values, own_values], dim=1).float()
        # One logits matrix serves the output (softmax over every key) and the scores
        # (softmax over the sinks, the chunk and the own keys); the causal mask is applied in
        # place by ``scores_from_logits``.
        logits = self.scale * queries @ keys.transpose(1, 2)  # [H, G * T, L + T]
        start, end = self.chunk
        self.scores[:, start:end] = scores_from_logits(
            logits, self.context_keys.shape[1], start, end, self.sink_tokens)
        out = torch.softmax(logits, dim=-1) @ values  # [H, G * T, D]
        out = out.view(self.num_heads, num_tokens, size).transpose(0, 1)
        return out.reshape(num_tokens, -1).to(query.dtype)


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers, checked to be Llama/Qwen2-style (one pipeline stage).

    Raises:
        ValueError: the model has another structure (kvzip cannot run on it).
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "embed_input_ids"):
        raise ValueError(f"kvzip needs a Llama/Qwen2-style model (model.model.layers); "
                         f"{type(model).__name__} is not one")
    if getattr(inner, "start_layer", 0) != 0 or getattr(inner, "end_layer", len(layers)) != len(
            layers):
        raise ValueError("kvzip does not run under pipeline parallelism")
    for layer in layers:
        attn = getattr(getattr(layer, "self_attn", None), "attn", None)
        if attn is None or not all(hasattr(attn, name) for name in
                                   ("num_heads", "num_kv_heads", "head_size", "layer_name")):
            raise ValueError(f"kvzip needs Llama/Qwen2-style decoder layers (self_attn.attn, a "
                             f"vLLM Attention); {type(layer).__name__} is not one")
    return list(layers)


@contextlib.contextmanager
def swapped_attention(layers: list[Any], replacements: list[torch.nn.Module]) -> Iterator[None]:
    """Each layer's ``self_attn.attn`` replaced for the block, restored in ``finally``."""
    originals = [layer.self_attn.attn for layer in layers]
    try:
        for layer, replacement in zip(layers, replacements, strict=True):
            layer.self_attn.attn = replacement
        yield
    finally:
        for layer, original in zip(layers, originals, strict=True):
            layer.self_attn.attn = original


def reconstruction_scores(model: Any, context_ids: list[int], contexts: list[tuple[
        torch.Tensor, torch.Tensor]], prompt: RepeatPrompt, chunk_size: int, sink_tokens: int,
        scales: list[float]) -> list[torch.Tensor]:
    """KVzip's scores of every layer from the reconstruction passes over a cached context.

    Args:
        model: the runner's loaded model (Llama/Qwen2-style).
        context_ids: ``[L]`` the context's ids (the request's prompt).
        contexts: per layer, ``(keys, values)`` ``[H, L, D]`` read from the paged cache.
        prompt: the model's repeat prompt.
        chunk_size: context tokens per pass.
        sink_tokens: sinks inside the scoring softmax.
        scales: per layer, the attention's softmax scale.

    Returns:
        per layer, ``[H, L]`` float32 scores.
    """
    layers = decoder_layers(model)
    if len(contexts) != len(layers):
        raise ValueError(f"{len(contexts)} cached layers for {len(layers)} decoder layers")
    context_len = len(context_ids)
    device = contexts[0][0].device
    replacements = []
    for layer, (keys, values), scale in zip(layers, contexts, scales, strict=True):
        attn = layer.self_attn.attn
        replacements.append(ReconstructionAttention(
            attn.num_heads, attn.num_kv_heads, attn.head_size, scale, keys, values, sink_tokens,
            torch.zeros(keys.shape[0], context_len, dtype=torch.float32, device=device)))
    inner = model.model
    with swapped_attention(layers, replacements):
        for chunk in reconstruction_chunks(context_ids, prompt, chunk_size):
            ids = torch.tensor(chunk.input_ids, dtype=torch.int64, device=device)
            positions = torch.arange(context_len, context_len + ids.shape[0], device=device)
            for replacement in replacements:
                replacement.chunk = (chunk.start, chunk.end)
            hidden, residual = inner.embed_input_ids(ids), None
            for layer in layers:
                hidden, residual = layer(positions, hidden, residual)
    return [replacement.scores for replacement in replacements]
