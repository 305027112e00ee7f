"""Shared prefill: one press-free prefill of a prompt (or of a context) records every attention
layer's hook call; any press is then replayed on it, giving the cache a prefill with that press
would leave, bit for bit (tested), for one prefill per prompt instead of one per config."""

from __future__ import annotations

import contextlib
import time
from typing import Any, NamedTuple

from .generation import attention_layers, decode_row, kept_per_layer, prefill_question


class LayerCall(NamedTuple):
    """What kvpress's ``forward_hook(module, input, kwargs, output)`` saw for one attention layer.

    ``kwargs`` is the layer's own kwargs dict (hidden_states, position_embeddings,
    cache_position, attention_mask, ..., past_key_values: the prefill's cache, replaced on
    replay). ``keys``/``values`` are what the layer wrote into the empty cache (the full
    prompt's post-RoPE keys and values); DynamicLayer.update builds them with ``torch.cat`` and
    nothing writes to them afterwards (the next layer's input is computed out of place), so no
    clone is needed.
    """

    module: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    keys: Any
    values: Any


class SharedPrefill(NamedTuple):
    """One press-free prefill of a prompt, enough to replay any press on it."""

    prompt_len: int
    logits: Any  # the last prompt token's
    calls: list[LayerCall]
    seconds: float


def shared_prefill(model: Any, input_ids: list[int]) -> SharedPrefill:
    """Prefill the prompt once, without a press, recording every attention layer's hook call.

    A kvpress press changes nothing in the prefill's forward pass: its forward hook runs after
    each attention layer, returns the layer's output unchanged and only replaces that layer's
    cached keys/values; the next layer's input comes from the uncompressed attention output. So
    the hidden states, the kwargs and the attention outputs are the same for every press, and so
    are the last prompt token's logits.

    Args:
        model: a HF causal LM (Llama family) with SDPA attention.
        input_ids: the complete prompt.

    Returns:
        The recorded calls (forward order), the last prompt token's logits and the seconds taken.
    """
    import torch
    from transformers import DynamicCache

    calls: list[LayerCall] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        calls.append(LayerCall(module, args, dict(kwargs), output, layer.keys, layer.values))

    hooks = [
        attn.register_forward_hook(record, with_kwargs=True) for attn in attention_layers(model)
    ]
    try:
        with torch.inference_mode():
            ids = torch.tensor([input_ids], dtype=torch.long)
            start = time.perf_counter()
            out = model(
                input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1
            )
            seconds = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    return SharedPrefill(len(input_ids), out.logits[0, -1], calls, seconds)


def replay_press(model: Any, press: Any, shared: SharedPrefill) -> tuple[Any, float]:
    """The cache a prefill with ``press`` active would leave, rebuilt from a shared prefill.

    Layer by layer, in forward order, as the prefill does: the layer's keys/values go into a
    fresh DynamicCache (``update``, as the attention layer does), then kvpress's own
    ``press.forward_hook`` runs with the recorded input, kwargs (``past_key_values`` pointing at
    the new cache) and output: its scoring, chunking, per-layer budget and cache write are
    kvpress's code. It runs inside ``with press(model)``, as the prefill does, for
    ``post_init_from_model`` and the rotary_emb it attaches (no forward pass runs inside).

    Args:
        model: the model ``shared`` was computed with.
        press: a kvpress press or None (the full cache).
        shared: a ``shared_prefill`` result.

    Returns:
        The (compressed) DynamicCache and the seconds taken.
    """
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    with torch.inference_mode(), press(model) if press is not None else contextlib.nullcontext():
        for call in shared.calls:
            cos, sin = call.kwargs["position_embeddings"]
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": call.kwargs["cache_position"]}
            cache.update(call.keys, call.values, call.module.layer_idx, cache_kwargs)
            if press is not None:
                kwargs = {**call.kwargs, "past_key_values": cache}
                press.forward_hook(call.module, call.args, kwargs, call.output)
    return cache, time.perf_counter() - start


def generate_shared(
    model: Any, press: Any, shared: SharedPrefill, max_tokens: int, eos: set[int],
    question_ids: list[int] | None = None,
) -> dict[str, Any]:
    """``generate``'s result from a shared prefill: replay ``press``, then greedy-decode.

    Args:
        model: the model ``shared`` was computed with.
        press: a kvpress press or None.
        shared: a ``shared_prefill`` result for the prompt, or (query-agnostic) for its context.
        max_tokens: most new tokens; stops after an EOS token (included, as HF generate does).
        eos: EOS token ids.
        question_ids: query-agnostic: the ids after the context, prefilled on the compressed
            cache without the press (``prefill_question``); None: ``shared`` is the whole prompt.

    Returns:
        As ``generate``; ``prefill_s`` is the shared prefill's seconds plus this press's replay
        (and the question's prefill): what a prefill with the press would cost, comparable with
        the per-config path's.
    """
    cache, prefill_s = replay_press(model, press, shared)
    prefill_s += shared.seconds
    prompt_len, logits = shared.prompt_len, shared.logits
    if question_ids is not None:
        start = time.perf_counter()
        logits = prefill_question(model, cache, question_ids, shared.prompt_len)
        prefill_s += time.perf_counter() - start
        prompt_len += len(question_ids)
    return decode_row(model, cache, logits, prompt_len, max_tokens, eos, prefill_s,
                      kept_per_layer(cache))
