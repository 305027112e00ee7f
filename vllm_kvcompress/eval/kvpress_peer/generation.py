"""Prefill and greedy decoding on HF transformers with a kvpress press, as kvpress's own
pipeline does it: the press active during the prefill of the prompt (query-aware) or of the
context alone (query-agnostic, then the question prefilled on the compressed cache without it),
decoding without the press, RoPE positions continuing from the original length."""

from __future__ import annotations

import contextlib
import time
from typing import Any


def eos_token_ids(model: Any) -> set[int]:
    """EOS ids from the model's generation_config and config (either may hold an int or a list)."""
    ids: set[int] = set()
    for source in (model.generation_config, model.config):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return ids


def attention_layers(model: Any) -> list[Any]:
    """The attention modules kvpress hooks (``BasePress.__call__``'s choice), in forward order."""
    language_model = getattr(model.model, "language_model", model.model)
    return [layer.self_attn for layer in language_model.layers]


def clear_masks(model: Any) -> None:
    """Drops the evictions a masking press (KVzipPress) left on the attention modules
    (``masked_key_indices``, read by kvpress's attention patch while the cache is longer than
    the queries): kvpress clears them only at the next full prefill, which a replayed job
    never runs."""
    for attn in attention_layers(model):
        if getattr(attn, "masked_key_indices", None) is not None:
            attn.masked_key_indices = None


def kept_per_layer(cache: Any, model: Any = None) -> list[float]:
    """Cached tokens per layer; with ``model``, less the entries a masking press (KVzipPress,
    which evicts by masking keys, not by shortening the cache) masked, averaged over the KV
    heads (an int when every head keeps the same count)."""
    kept: list[float] = [int(layer.keys.shape[-2]) for layer in cache.layers]
    if model is None:
        return kept
    for i, attn in enumerate(attention_layers(model)):
        masked = getattr(attn, "masked_key_indices", None)
        if masked is not None and i < len(kept):
            batch, heads = cache.layers[i].keys.shape[:2]
            held = kept[i] - len(masked[0]) / (batch * heads)
            kept[i] = int(held) if held == int(held) else held
    return kept


def decode(
    model: Any, cache: Any, token: int, prompt_len: int, max_tokens: int, eos: set[int]
) -> list[int]:
    """Greedy decoding without a press from a (possibly compressed) prefilled cache.

    Args:
        model: the HF causal LM.
        cache: the DynamicCache after the prefill (and its compression); grown in place.
        token: the first generated token (argmax of the last prompt token's logits).
        prompt_len: the ORIGINAL prompt length: decoded tokens get RoPE positions from there.
        max_tokens: most new tokens, ``token`` included; stops after an EOS token (included, as
            HF generate does).
        eos: EOS token ids.

    Returns:
        The generated ids, ``token`` first.
    """
    output_ids = [token]
    position = prompt_len
    while len(output_ids) < max_tokens and token not in eos:
        token = int(_step(model, cache, token, position).argmax())
        position += 1
        output_ids.append(token)
    return output_ids


def _step(model: Any, cache: Any, token: int, position: int) -> Any:
    """One token's forward pass on ``cache`` (grown in place), no press: RoPE ``position`` (the
    original numbering); ``cache_position`` indexes the (compressed) cache, one step at a time.
    A single query needs no causal mask, so layers of different lengths are fine.

    Returns:
        The token's logits, ``[vocab]``.
    """
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[token]], dtype=torch.long),
                    past_key_values=cache,
                    position_ids=torch.tensor([[position]], dtype=torch.long),
                    cache_position=torch.tensor([cache.get_seq_length()], dtype=torch.long),
                    use_cache=True)
    return out.logits[0, -1]


def prefill(model: Any, press: Any, input_ids: list[int]) -> tuple[Any, Any, float]:
    """One prefill of the whole prompt with ``press`` active (the per-config path).

    Args:
        model: a HF causal LM (Llama family) with SDPA attention.
        press: a kvpress press or None.
        input_ids: the complete prompt.

    Returns:
        The (compressed) DynamicCache, the last prompt token's logits and the seconds taken.
    """
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        ids = torch.tensor([input_ids], dtype=torch.long)
        start = time.perf_counter()
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - start
    return cache, out.logits[0, -1], seconds


def prefill_question(model: Any, cache: Any, question_ids: list[int], context_len: int) -> Any:
    """The query-agnostic setting's second step, as kvpress's pipeline answers a question: the
    ids after the context (question, template, answer prefix) in one forward pass on the
    (compressed) cache, no press, RoPE positions ``context_len ..`` (the original ones), the
    cache position left to the model (the compressed cache's length).

    A press that leaves layers of different lengths (PyramidKVPress's per-layer budgets;
    ChunkKVPress when some layers keep the short last chunk) cannot take that pass: transformers
    builds one causal mask from layer 0's length, and kvpress's own pipeline fails there
    ("The size of tensor a ... must match"). Such a cache gets the question one token at a
    time instead, as decoding does (a single query needs no mask, each layer attends to its own
    cache): the same attention, computed in Q passes.

    Args:
        model: the HF causal LM.
        cache: the context's DynamicCache after its compression; grown in place.
        question_ids: the ids after the context, ``[Q]``.
        context_len: the context's ORIGINAL length.

    Returns:
        The last question token's logits, ``[vocab]``.
    """
    import torch

    if len({int(layer.keys.shape[-2]) for layer in cache.layers}) > 1:
        return prefill_question_per_token(model, cache, question_ids, context_len)
    with torch.inference_mode():
        positions = torch.arange(context_len, context_len + len(question_ids)).unsqueeze(0)
        out = model(input_ids=torch.tensor([question_ids], dtype=torch.long),
                    past_key_values=cache, position_ids=positions, logits_to_keep=1)
    return out.logits[0, -1]


def prefill_question_per_token(model: Any, cache: Any, question_ids: list[int],
                               context_len: int) -> Any:
    """``prefill_question`` one token at a time (for caches whose layers differ in length).

    Args and returns as ``prefill_question``.
    """
    logits = None
    for offset, token in enumerate(question_ids):
        logits = _step(model, cache, token, context_len + offset)
    return logits


def generate(
    model: Any, press: Any, input_ids: list[int], max_tokens: int, eos: set[int],
    context_len: int | None = None,
) -> dict[str, Any]:
    """Prefill with ``press`` active, then greedy-decode without it.

    The per-config path (``--no-shared-prefill``): one full prefill per (sample, config).

    Args:
        model: a HF causal LM (Llama family) with SDPA attention.
        press: a kvpress press or None.
        input_ids: the complete prompt.
        max_tokens: most new tokens; stops after an EOS token (included, as HF generate does).
        eos: EOS token ids.
        context_len: query-agnostic: the press runs on the first ``context_len`` ids only, the
            rest is prefilled after it without the press (``prefill_question``); None:
            query-aware, the whole prompt under the press.

    Returns:
        ``output_ids``, ``kept_tokens`` (prompt tokens cached in layer 0 before decoding, less
        those a masking press masked: see ``kept_per_layer``), ``kept_tokens_per_layer``,
        ``prefill_s``, ``decode_s``.
    """
    if context_len is None:
        cache, logits, prefill_s = prefill(model, press, input_ids)
    else:
        cache, _, prefill_s = prefill(model, press, input_ids[:context_len])
        start = time.perf_counter()
        logits = prefill_question(model, cache, input_ids[context_len:], context_len)
        prefill_s += time.perf_counter() - start
    return decode_row(model, cache, logits, len(input_ids), max_tokens, eos, prefill_s,
                      kept_per_layer(cache, model))


def decode_row(model: Any, cache: Any, logits: Any, prompt_len: int, max_tokens: int,
               eos: set[int], prefill_s: float, kept: list[float]) -> dict[str, Any]:
    """Decodes greedily from a prefilled ``cache`` and returns a prediction's fields.

    Args:
        logits: ``[vocab]``, the last prompt position's; its argmax is the first new token.
        prompt_len: tokens before the first new one (its position).
        prefill_s: the prefill's seconds, reported as is.
        kept: ``kept_per_layer`` of the cache before decoding.
    """
    start = time.perf_counter()
    output_ids = decode(model, cache, int(logits.argmax()), prompt_len, max_tokens, eos)
    return {
        "output_ids": output_ids,
        "kept_tokens": kept[0],
        "kept_tokens_per_layer": kept,
        "prefill_s": round(prefill_s, 4),
        "decode_s": round(time.perf_counter() - start, 4),
    }
