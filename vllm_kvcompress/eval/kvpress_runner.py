#!/usr/bin/env python
"""Peer backend of the accuracy study: NVIDIA kvpress presses on HF transformers, CPU, greedy.

A standalone script for the `.kvpress-venv` (``make kvpress-venv``), which holds kvpress 0.5.5 and a
transformers it accepts (< 5.3). It imports only the standard library, torch, transformers, kvpress
and tqdm, never ``vllm_kvcompress``, so it runs from its path::

    .kvpress-venv/bin/python vllm_kvcompress/eval/kvpress_runner.py --model models/smollm2 \\
        --samples samples.jsonl --configs configs.json --out predictions.jsonl

Inputs:

- ``samples.jsonl``: ``{"id": str, "input_ids": [int, ...], "max_tokens": int}`` per line; the
  ids are the complete chat-templated prompt (context, question, answer prefix) and are used as is.
  An optional ``"followup": {"suffix_ids": [int, ...], "stop_ids": [int, ...], "max_tokens":
  int}`` (a multi-turn sample) adds a second turn per config, see below.
- ``configs.json``: ``{"configs": [{"policy": ..., "ratio": ...}], "params": {"window": 32,
  "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4}}``. ``ratio`` is the fraction of prompt
  tokens whose KV is KEPT; kvpress's ``compression_ratio`` is the fraction removed (1 - ratio).

Semantics (query-aware, as the vLLM engine): the whole prompt, question included, is prefilled
with the press active, so SnapKV's observation window covers the question. Greedy decoding then
runs without the press; decoded tokens get RoPE positions continuing from the ORIGINAL prompt
length (kvpress keeps the original positions baked into the kept keys) while ``cache_position``
follows the compressed cache, as kvpress's own pipeline does.

Shared prefill (the default; ``--no-shared-prefill`` runs one prefill per config with the press
active): a press does not change the prefill's forward pass (its hook runs after each attention
layer and only replaces that layer's cached keys/values), so each sample is prefilled ONCE without
a press while every attention layer's hook arguments are recorded; per config, the press's own
``forward_hook`` is then replayed layer by layer on a fresh cache holding the full keys/values.
The compressed caches, hence the outputs, are bit-identical to the per-config prefill's (tested);
the prefill is paid once per sample instead of once per config.

Multi-turn (samples with ``followup``): after a config's turn 1, turn 2's prompt is turn 1's
prompt, turn 1's generated ids (trailing ``stop_ids`` dropped) and ``suffix_ids`` (the chat
template's end of turn 1, the new question, the start of the answer), as the vLLM backend builds
it. Turn 2 is a fresh query-aware run of the same press on the full turn-2 ids: the whole turn-2
prompt is prefilled with the press active (turn 2's question in the observation window); nothing
of turn 1's compressed cache is reused. Configs whose turn-1 answers are the same share one
turn-2 prefill (shared prefill). Records carry ``"turn": 1`` or ``2``.

Token selection (``kvpress_mode`` in every record, ``KVPRESS_MODES``): kvpress's ScorerPress
presses (SnapKV, PyramidKV, StreamingLLM) keep a top-k per KV head (each head its own tokens);
ChunkKVPress sums the scores over heads and keeps one token set per layer (shared).

Output: one JSON line per (sample, config, turn), appended and flushed as soon as it is done;
lines already in ``--out`` (same id, policy, ratio, turn) are skipped, so an interrupted run
resumes. With
shared prefill, ``prefill_s`` is the shared prefill's seconds plus this config's replay (comparable
with a per-config prefill's) and ``shared_prefill`` is true. Bad input prints one error line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

POLICIES = ("none", "streamingllm", "snapkv", "chunkkv", "pyramidkv", "tova", "knorm",
            "keydiff", "expected_attention", "qfilters")
DEFAULT_PARAMS: dict[str, Any] = {
    "window": 32,
    "pool_kernel": 5,
    "chunk_size": 10,
    "sink_tokens": 4,
    "future_positions": 512,
    "qfilters_path": None,
}
#: ``snapkv+merge``: kvpress's ``MergingPress`` around the policy's press (a ScorerPress).
MERGE_SUFFIX = "+merge"
MERGEABLE = ("streamingllm", "snapkv", "pyramidkv", "tova", "knorm", "keydiff",
             "expected_attention", "qfilters")
#: Integer params and their smallest allowed value.
INT_PARAMS = {"window": 1, "pool_kernel": 1, "chunk_size": 1, "sink_tokens": 0,
              "future_positions": 1}
EXIT_BAD_INPUT = 2
#: How each press selects tokens: ``per_head`` (ScorerPress: top-k over each KV head's scores) or
#: ``shared`` (ChunkKVPress: scores summed over heads, one token set per layer). StreamingLLM's
#: scores are positional, so its per-head top-k keeps the same tokens in every head.
KVPRESS_MODES = {
    "none": "shared",
    "streamingllm": "per_head",
    "snapkv": "per_head",
    "chunkkv": "shared",
    "pyramidkv": "per_head",
    # TOVAPress averages the scores over all heads and repeats them per KV head: every head's
    # top-k is the same token set.
    "tova": "shared",
    "knorm": "per_head",
    "keydiff": "per_head",
    "expected_attention": "per_head",
    "qfilters": "per_head",
}

# A press spec: kvpress class name and constructor kwargs; a kwarg may itself be a spec (ChunkKV
# wraps a scorer press).
PressSpec = tuple[str, dict[str, Any]]


class InputError(ValueError):
    """Bad input (file, JSON, field); main() prints it on one line and exits with status 2."""


def press_spec(policy: str, ratio: float, params: dict[str, Any]) -> PressSpec | None:
    """Map one of our configs to a kvpress press, without importing kvpress.

    Args:
        policy: one of ``POLICIES``.
        ratio: fraction of prompt tokens whose KV is kept, in (0, 1]; kvpress's
            ``compression_ratio`` is the fraction removed, ``1 - ratio``.
        params: ``window``, ``pool_kernel``, ``chunk_size``, ``sink_tokens``,
            ``future_positions``, ``qfilters_path`` (missing keys take ``DEFAULT_PARAMS``).

    Returns:
        ``(class_name, kwargs)`` for ``build_press``, or None when nothing is compressed
        (policy ``none`` or ratio 1.0).

    Raises:
        InputError: unknown policy or a ratio outside (0, 1].
    """
    base, merge = policy.removesuffix(MERGE_SUFFIX), policy.endswith(MERGE_SUFFIX)
    if merge:
        if base not in MERGEABLE:
            raise InputError(f"{policy!r}: kvpress's MergingPress wraps a ScorerPress; "
                             f"allowed: {', '.join(p + MERGE_SUFFIX for p in MERGEABLE)}")
        inner = press_spec(base, ratio, params)
        return None if inner is None else ("MergingPress", {"press": inner})
    if policy not in POLICIES:
        raise InputError(f"unknown policy {policy!r}; allowed: {', '.join(POLICIES)} (and "
                         f"POLICY{MERGE_SUFFIX} for {', '.join(MERGEABLE)})")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise InputError(f"ratio must be a number in (0, 1], got {ratio!r} (policy {policy!r})")
    if policy == "none" or ratio == 1:
        return None
    p = {**DEFAULT_PARAMS, **params}
    compression_ratio = 1.0 - float(ratio)
    snapkv = {
        "compression_ratio": compression_ratio,
        "window_size": p["window"],
        "kernel_size": p["pool_kernel"],
    }
    if policy == "streamingllm":
        return "StreamingLLMPress", {
            "compression_ratio": compression_ratio,
            "n_sink": p["sink_tokens"],
        }
    if policy == "snapkv":
        return "SnapKVPress", snapkv
    if policy == "chunkkv":
        return "ChunkKVPress", {"press": ("SnapKVPress", snapkv), "chunk_length": p["chunk_size"]}
    if policy == "pyramidkv":
        return "PyramidKVPress", snapkv
    if policy == "tova":
        return "TOVAPress", {"compression_ratio": compression_ratio}
    if policy == "knorm":
        return "KnormPress", {"compression_ratio": compression_ratio}
    if policy == "keydiff":
        return "KeyDiffPress", {"compression_ratio": compression_ratio}
    if policy == "expected_attention":
        return "ExpectedAttentionPress", {"compression_ratio": compression_ratio,
                                          "n_future_positions": p["future_positions"],
                                          "n_sink": p["sink_tokens"]}
    # qfilters: kvpress's press with OUR calibrated filters (its own come from a model hub).
    if not p["qfilters_path"]:
        raise InputError("policy 'qfilters' needs params.qfilters_path (kvcompress calibrate)")
    return "QFilterPress", {"compression_ratio": compression_ratio,
                            "qfilters_path": p["qfilters_path"]}


def build_press(spec: PressSpec | None) -> Any:
    """Instantiate a ``press_spec`` result with kvpress (imported here, not at module import).

    Args:
        spec: ``(class_name, kwargs)``, kwargs possibly holding nested specs, or None.

    Returns:
        The kvpress press, or None for None.
    """
    if spec is None:
        return None
    import kvpress

    name, kwargs = spec
    built = {k: build_press(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    qfilters_path = built.pop("qfilters_path", None)
    press = getattr(kvpress, name)(**built)
    if qfilters_path is not None:
        # QFilterPress loads its filters from a model hub in post_init_from_model; give it
        # ours (the same convention: score = -<k, f>, f [layers, kv_heads, head_dim]).
        from safetensors.torch import load_file

        press.q_filters = load_file(qfilters_path)["q_filters"]
        press.post_init_from_model = lambda model: None
    return press


def min_prompt_len(spec: PressSpec | None) -> int:
    """Shortest prompt a press accepts (kvpress asserts on shorter ones).

    Args:
        spec: a ``press_spec`` result.

    Returns:
        SnapKV-based presses need more tokens than the window, StreamingLLM more than the sinks.
    """
    if spec is None:
        return 1
    _name, kwargs = spec
    if "press" in kwargs:
        return min_prompt_len(kwargs["press"])
    if "window_size" in kwargs:
        return kwargs["window_size"] + 1
    return kwargs.get("n_sink", 0) + 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_configs(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read and check configs.json.

    Args:
        path: the file.

    Returns:
        The configs (``policy``, ``ratio``, ``spec``) and the merged params.

    Raises:
        InputError: missing file, bad JSON, or a bad field (named in the message).
    """
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"--configs {path}: cannot read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"--configs {path}: bad JSON: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"--configs {path}: expected a JSON object")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise InputError(f"--configs {path}: 'params' must be an object")
    for key, lowest in INT_PARAMS.items():
        value = params.get(key, DEFAULT_PARAMS[key])
        if not _is_int(value) or value < lowest:
            raise InputError(
                f"--configs {path}: params.{key} must be an int >= {lowest}, got {value!r}"
            )
    if params.get("pool_kernel", DEFAULT_PARAMS["pool_kernel"]) % 2 == 0:
        raise InputError(f"--configs {path}: params.pool_kernel must be odd")
    qfilters_path = params.get("qfilters_path")
    if qfilters_path is not None and not (isinstance(qfilters_path, str) and
                                          Path(qfilters_path).is_file()):
        raise InputError(f"--configs {path}: params.qfilters_path must be an existing file, got "
                         f"{qfilters_path!r}")
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if k in DEFAULT_PARAMS}}
    configs = data.get("configs")
    if not isinstance(configs, list) or not configs:
        raise InputError(f"--configs {path}: 'configs' must be a non-empty list")
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, float]] = set()
    for i, cfg in enumerate(configs):
        where = f"--configs {path}: configs[{i}]"
        if not isinstance(cfg, dict) or "policy" not in cfg or "ratio" not in cfg:
            raise InputError(f"{where}: expected an object with 'policy' and 'ratio'")
        policy, ratio = cfg["policy"], cfg["ratio"]
        try:
            spec = press_spec(policy, ratio, merged)
        except InputError as e:
            raise InputError(f"{where}: {e}") from e
        key = (policy, float(ratio))
        if key in seen:
            raise InputError(f"{where}: duplicate config {policy} {ratio}")
        seen.add(key)
        out.append({"policy": policy, "ratio": float(ratio), "spec": spec})
    return out, merged


def load_samples(path: Path) -> list[dict[str, Any]]:
    """Read and check samples.jsonl (keys other than id, input_ids, max_tokens, followup are
    ignored).

    Args:
        path: the file.

    Returns:
        ``{"id", "input_ids", "max_tokens", "followup"}`` per sample, in file order
        (``followup`` None for a single-turn sample).

    Raises:
        InputError: missing file, bad JSON, or a bad field (named with its line number).
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"--samples {path}: cannot read: {e.strerror or e}") from e
    samples: list[dict[str, Any]] = []
    ids: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--samples {path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: bad JSON: {e}") from e
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object")
        sid, input_ids, max_tokens = obj.get("id"), obj.get("input_ids"), obj.get("max_tokens")
        if not isinstance(sid, str) or not sid:
            raise InputError(f"{where}: 'id' must be a non-empty string, got {sid!r}")
        if sid in ids:
            raise InputError(f"{where}: duplicate id {sid!r}")
        if (
            not isinstance(input_ids, list)
            or not input_ids
            or not all(_is_int(t) and t >= 0 for t in input_ids)
        ):
            raise InputError(f"{where}: 'input_ids' must be a non-empty list of ints >= 0")
        if not _is_int(max_tokens) or max_tokens < 1:
            raise InputError(f"{where}: 'max_tokens' must be an int >= 1, got {max_tokens!r}")
        followup = _check_followup(obj.get("followup"), where)
        ids.add(sid)
        samples.append(
            {"id": sid, "input_ids": input_ids, "max_tokens": max_tokens, "followup": followup}
        )
    if not samples:
        raise InputError(f"--samples {path}: no samples")
    return samples


def _check_followup(value: Any, where: str) -> dict[str, Any] | None:
    """A sample's ``followup`` (None when absent), checked; errors name the field."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError(f"{where}: 'followup' must be an object")
    for key in ("suffix_ids", "stop_ids"):
        ids = value.get(key)
        if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
            raise InputError(f"{where}: 'followup.{key}' must be a list of ints >= 0")
    if not value["suffix_ids"]:
        raise InputError(f"{where}: 'followup.suffix_ids' must not be empty")
    max_tokens = value.get("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise InputError(
            f"{where}: 'followup.max_tokens' must be an int >= 1, got {max_tokens!r}"
        )
    return {"suffix_ids": value["suffix_ids"], "stop_ids": value["stop_ids"],
            "max_tokens": max_tokens}  # fmt: skip


def turn2_input_ids(
    input_ids: list[int], output_ids: list[int], suffix_ids: list[int], stop_ids: list[int]
) -> list[int]:
    """Turn 2's prompt: turn 1's prompt, turn 1's answer token for token, the template's rest.

    The same as ``vllm_kvcompress.eval.tasks.turn2_input_ids`` (tested), written again here
    because this script does not import the package.

    Args:
        input_ids: turn 1's prompt.
        output_ids: the ids turn 1 generated.
        suffix_ids: the template's tokens after the answer (end of turn, question, prefix).
        stop_ids: trailing ids dropped from the answer (EOS, end of turn).

    Returns:
        ``input_ids + answer + suffix_ids``.
    """
    answer = list(output_ids)
    stops = set(stop_ids)
    while answer and answer[-1] in stops:
        answer.pop()
    return [*input_ids, *answer, *suffix_ids]


Key = tuple[str, str, float, int]  # id, policy, ratio, turn


def done_records(out: Path) -> dict[Key, dict[str, Any]]:
    """The records already in ``out`` by (id, policy, ratio, turn); unparsable lines are
    reported and ignored. Records without ``turn`` are turn 1.

    Args:
        out: the predictions file (may not exist).

    Returns:
        The records, whose keys are to be skipped (turn-1 ones also give turn 2 its answer).
    """
    records: dict[Key, dict[str, Any]] = {}
    if not out.exists():
        return records
    for n, line in enumerate(out.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key = (obj["id"], obj["policy"], float(obj["ratio"]), int(obj.get("turn", 1)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            print(f"kvpress_runner: {out} line {n} unreadable, ignored", file=sys.stderr)
            continue
        records[key] = obj
    return records


def done_keys(out: Path) -> set[Key]:
    """The (id, policy, ratio, turn) already in ``out`` (see ``done_records``)."""
    return set(done_records(out))


def eos_token_ids(model: Any) -> set[int]:
    """EOS ids from the model's generation_config and config (either may hold an int or a list)."""
    ids: set[int] = set()
    for source in (model.generation_config, model.config):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return ids


def _kept(cache: Any) -> list[int]:
    """Cached tokens per layer."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


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
    import torch

    output_ids = [token]
    # RoPE positions continue from the original prompt length; cache_position indexes the
    # (compressed) cache, whose length grows by one per step.
    position = prompt_len
    with torch.inference_mode():
        while len(output_ids) < max_tokens and token not in eos:
            cache_len = cache.get_seq_length()
            out = model(
                input_ids=torch.tensor([[token]], dtype=torch.long),
                past_key_values=cache,
                position_ids=torch.tensor([[position]], dtype=torch.long),
                cache_position=torch.tensor([cache_len], dtype=torch.long),
                use_cache=True,
            )
            position += 1
            token = int(out.logits[0, -1].argmax())
            output_ids.append(token)
    return output_ids


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


def generate(
    model: Any, press: Any, input_ids: list[int], max_tokens: int, eos: set[int]
) -> dict[str, Any]:
    """Prefill the whole prompt with ``press`` active, then greedy-decode without it.

    The per-config path (``--no-shared-prefill``): one full prefill per (sample, config).

    Args:
        model: a HF causal LM (Llama family) with SDPA attention.
        press: a kvpress press or None.
        input_ids: the complete prompt.
        max_tokens: most new tokens; stops after an EOS token (included, as HF generate does).
        eos: EOS token ids.

    Returns:
        ``output_ids``, ``kept_tokens`` (layer 0), ``kept_tokens_per_layer``, ``prefill_s``,
        ``decode_s``.
    """
    cache, logits, prefill_s = prefill(model, press, input_ids)
    kept = _kept(cache)
    start = time.perf_counter()
    output_ids = decode(model, cache, int(logits.argmax()), len(input_ids), max_tokens, eos)
    decode_s = time.perf_counter() - start
    return {
        "output_ids": output_ids,
        "kept_tokens": kept[0],
        "kept_tokens_per_layer": kept,
        "prefill_s": round(prefill_s, 4),
        "decode_s": round(decode_s, 4),
    }


def _attention_layers(model: Any) -> list[Any]:
    """The attention modules kvpress hooks (``BasePress.__call__``'s choice), in forward order."""
    language_model = getattr(model.model, "language_model", model.model)
    return [layer.self_attn for layer in language_model.layers]


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
        attn.register_forward_hook(record, with_kwargs=True) for attn in _attention_layers(model)
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
    model: Any, press: Any, shared: SharedPrefill, max_tokens: int, eos: set[int]
) -> dict[str, Any]:
    """``generate``'s result from a shared prefill: replay ``press``, then greedy-decode.

    Args:
        model: the model ``shared`` was computed with.
        press: a kvpress press or None.
        shared: a ``shared_prefill`` result for the prompt.
        max_tokens: most new tokens; stops after an EOS token (included, as HF generate does).
        eos: EOS token ids.

    Returns:
        As ``generate``; ``prefill_s`` is the shared prefill's seconds plus this press's replay
        (what a prefill with the press would cost, comparable with the per-config path's).
    """
    cache, replay_s = replay_press(model, press, shared)
    kept = _kept(cache)
    start = time.perf_counter()
    token = int(shared.logits.argmax())
    output_ids = decode(model, cache, token, shared.prompt_len, max_tokens, eos)
    decode_s = time.perf_counter() - start
    return {
        "output_ids": output_ids,
        "kept_tokens": kept[0],
        "kept_tokens_per_layer": kept,
        "prefill_s": round(shared.seconds + replay_s, 4),
        "decode_s": round(decode_s, 4),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (argparse itself exits with status 2 on bad flags)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="HF safetensors model folder")
    ap.add_argument("--samples", required=True, type=Path, help="samples.jsonl")
    ap.add_argument("--configs", required=True, type=Path, help="configs.json")
    ap.add_argument("--out", required=True, type=Path, help="predictions.jsonl (appended)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument(
        "--shared-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefill each sample once and replay every press's hook on it (default); "
        "--no-shared-prefill: one prefill per (sample, config) with the press active",
    )
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


def load_model(path: Path, dtype: str) -> tuple[Any, Any]:
    """Model (SDPA attention, eval mode) and tokenizer from a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # SDPA: kvpress's ChunkKV asserts that the layer returns no attention weights (eager would).
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def run(args: argparse.Namespace) -> int:
    """Check the inputs, then run every (sample, config) not yet in ``--out``."""
    if not (args.model / "config.json").is_file():
        raise InputError(f"--model {args.model}: no config.json (not a HF model folder)")
    configs, _params = load_configs(args.configs)
    samples = load_samples(args.samples)
    for sample in samples:
        for cfg in configs:
            need = min_prompt_len(cfg["spec"])
            if len(sample["input_ids"]) < need:
                raise InputError(
                    f"--samples {args.samples}: sample {sample['id']!r} has "
                    f"{len(sample['input_ids'])} prompt tokens; {cfg['policy']} needs >= {need}"
                )
    done = done_records(args.out)

    def todo(sample: dict[str, Any], cfg: dict[str, Any], turn: int) -> bool:
        return (sample["id"], cfg["policy"], cfg["ratio"], turn) not in done

    try:
        import kvpress  # noqa: F401  (checked here: the mapping above works without it)
    except ImportError as e:
        print(
            f"kvpress_runner: error: cannot import kvpress ({e}); run it with "
            ".kvpress-venv/bin/python (make kvpress-venv)",
            file=sys.stderr,
        )
        return 1
    import importlib.metadata

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    version = importlib.metadata.version("kvpress")
    model, tokenizer = load_model(args.model, args.dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    for sample in samples:
        followup = sample["followup"] or {"suffix_ids": []}
        if max([*sample["input_ids"], *followup["suffix_ids"]]) >= vocab:
            raise InputError(
                f"--samples {args.samples}: sample {sample['id']!r} input_ids has a token id "
                f">= the model's vocabulary size {vocab}"
            )
    eos = eos_token_ids(model)
    presses = {(c["policy"], c["ratio"]): build_press(c["spec"]) for c in configs}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # A line cut short by a crash must not swallow the next record.
    cut_short = False
    if args.out.exists() and args.out.stat().st_size > 0:
        with args.out.open("rb") as raw:
            raw.seek(-1, 2)
            cut_short = raw.read(1) != b"\n"
    turns = sum(1 + (s["followup"] is not None) for s in samples)
    total = turns * len(configs)
    left = sum(
        todo(s, c, 1) + (s["followup"] is not None and todo(s, c, 2))
        for s in samples
        for c in configs
    )

    def write(
        fh: Any, bar: Any, sample_id: str, cfg: dict[str, Any], turn: int, input_ids: list[int],
        result: dict[str, Any],
    ) -> None:
        record = {
            "id": sample_id,
            "turn": turn,
            "policy": cfg["policy"],
            "ratio": cfg["ratio"],
            "text": tokenizer.decode(result["output_ids"], skip_special_tokens=True),
            "output_ids": result["output_ids"],
            "prompt_tokens": len(input_ids),
            "kept_tokens": result["kept_tokens"],
            "kept_tokens_per_layer": result["kept_tokens_per_layer"],
            "prefill_s": result["prefill_s"],
            "decode_s": result["decode_s"],
            "backend": "kvpress",
            "kvpress_version": version,
            "kvpress_mode": KVPRESS_MODES[cfg["policy"].removesuffix(MERGE_SUFFIX)],
            "shared_prefill": args.shared_prefill,
        }
        done[(sample_id, cfg["policy"], cfg["ratio"], turn)] = record
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        bar.update(1)
        bar.set_postfix_str(
            f"{cfg['policy']} {cfg['ratio']:g} t{turn} prefill {result['prefill_s']:.1f}s"
        )

    def run_turn(
        fh: Any, bar: Any, sample_id: str, jobs: list[tuple[dict[str, Any], list[int]]],
        max_tokens: int, turn: int,
    ) -> None:
        """Runs (config, prompt ids) jobs; one shared prefill per distinct prompt."""
        by_prompt: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for cfg, ids in jobs:
            by_prompt.setdefault(tuple(ids), []).append(cfg)
        for ids_key, cfgs in by_prompt.items():
            ids = list(ids_key)
            # Per prompt, not per config: freed before the next prompt's prefill.
            shared = shared_prefill(model, ids) if args.shared_prefill else None
            for cfg in cfgs:
                press = presses[(cfg["policy"], cfg["ratio"])]
                if shared is not None:
                    result = generate_shared(model, press, shared, max_tokens, eos)
                else:
                    result = generate(model, press, ids, max_tokens, eos)
                write(fh, bar, sample_id, cfg, turn, ids, result)
            del shared

    with (
        args.out.open("a") as fh,
        tqdm(total=total, initial=total - left, file=sys.stderr, desc="kvpress") as bar,
    ):
        if cut_short:
            fh.write("\n")
        for sample in samples:
            sid = sample["id"]
            first = [(c, sample["input_ids"]) for c in configs if todo(sample, c, 1)]
            run_turn(fh, bar, sid, first, sample["max_tokens"], 1)
            followup = sample["followup"]
            if followup is None:
                continue
            second = []
            for cfg in configs:
                if not todo(sample, cfg, 2):
                    continue
                answer = done[(sid, cfg["policy"], cfg["ratio"], 1)]["output_ids"]
                ids = turn2_input_ids(
                    sample["input_ids"], answer, followup["suffix_ids"], followup["stop_ids"]
                )
                second.append((cfg, ids))
            run_turn(fh, bar, sid, second, followup["max_tokens"], 2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"kvpress_runner: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
