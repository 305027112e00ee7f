"""Our configurations as kvpress presses: which press, which parameters, which selection mode.

The mapping imports nothing of kvpress (``build_press`` does, when called), so the main venv
reads ``KVPRESS_MODES`` and ``press_spec`` from here too.
"""

from __future__ import annotations

from typing import Any

POLICIES = ("none", "streamingllm", "snapkv", "chunkkv", "pyramidkv", "tova", "knorm",
            "keydiff", "expected_attention", "qfilters", "kvzip")
DEFAULT_PARAMS: dict[str, Any] = {
    "window": 32,
    "pool_kernel": 5,
    # Our policies' defaults (tests/test_kvpress_peer.py checks they agree with the registry).
    "chunk_size": 20,
    "sink_tokens": 4,
    "future_positions": 512,
    "qfilters_path": None,
    # Our engine's default (policies/kvzip.py KVZIP_CHUNK_SIZE) and KVzipPress's own.
    "kvzip_chunk_size": 2048,
}
#: ``snapkv+merge``: kvpress's ``MergingPress`` around the policy's press (a ScorerPress).
MERGE_SUFFIX = "+merge"
MERGEABLE = ("streamingllm", "snapkv", "pyramidkv", "tova", "knorm", "keydiff",
             "expected_attention", "qfilters")
#: How each press selects tokens: ``per_head`` (ScorerPress: top-k over each KV head's scores),
#: ``shared`` (ChunkKVPress: scores summed over heads, one token set per layer) or
#: ``joint_heads`` (KVzipPress: one top-k per layer over all its heads' tokens together, so the
#: heads keep different counts). StreamingLLM's scores are positional, so its per-head top-k keeps
#: the same tokens in every head.
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
    # KVzipPress.compress_post (kvpress 0.5.5 presses/kvzip_press.py:369-405): with
    # layerwise=True every layer prunes the same int(kv_heads * L * compression_ratio) entries,
    # chosen by ONE bottom-k over the layer's (KV head, token) scores flattened
    # (``scores.reshape(bsz, -1)``), then masked (``masked_key_indices``): neither one top-k per
    # head (heads keep different counts) nor one token set per layer.
    "kvzip": "joint_heads",
}

# A press spec: kvpress class name and constructor kwargs; a kwarg may itself be a spec (ChunkKV
# wraps a scorer press).
PressSpec = tuple[str, dict[str, Any]]


class InputError(ValueError):
    """Bad input (file, JSON, field); the runner prints it on one line and exits with status 2."""


def press_spec(policy: str, ratio: float, params: dict[str, Any]) -> PressSpec | None:
    """Map one of our configs to a kvpress press, without importing kvpress.

    Args:
        policy: one of ``POLICIES``.
        ratio: fraction of prompt tokens whose KV is kept, in (0, 1]; kvpress's
            ``compression_ratio`` is the fraction removed, ``1 - ratio``.
        params: ``window``, ``pool_kernel``, ``chunk_size``, ``sink_tokens``,
            ``future_positions``, ``qfilters_path``, ``kvzip_chunk_size`` (missing keys take
            ``DEFAULT_PARAMS``).

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
    if policy == "kvzip":
        # layerwise=True: our engine keeps the same budget in every layer (one physical length
        # per request: policies/kvzip.py's docstring, docs/ARCHITECTURE.md "Per-layer budgets"),
        # which is KVzipPress's layerwise=True (the same int(H * L * compression_ratio) pruned in
        # every layer); its default, False, spreads one budget over all layers by score.
        return "KVzipPress", {"compression_ratio": compression_ratio, "layerwise": True,
                              "n_sink": p["sink_tokens"], "chunk_size": p["kvzip_chunk_size"]}
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


#: Presses that cannot be replayed on a shared prefill's recorded layer calls: KVzipPress scores
#: by running the model again (its reconstruction passes, after the ``with`` block), so it needs
#: the per-config path, a real prefill with the press active (``generation.generate``).
NOT_REPLAYABLE = frozenset({"KVzipPress"})


def replayable(spec: PressSpec | None) -> bool:
    """Whether ``replay.replay_press`` gives the cache a prefill with this press would leave
    (every press whose work is its ``forward_hook``; a wrapper is replayable if its press is).

    Args:
        spec: a ``press_spec`` result.
    """
    if spec is None:
        return True
    name, kwargs = spec
    if name in NOT_REPLAYABLE:
        return False
    inner = kwargs.get("press")
    return replayable(inner) if isinstance(inner, tuple) else True


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

