"""Graded rows: every prediction the store counts, scored against its prompt's answers, in one
flat shape for both backends (the report's and ``results.csv``'s unit)."""

from __future__ import annotations

from typing import Any

from .configs import DEFAULT_HEAD_SELECT, QUERY_AWARE, config_key, config_label
from .kvpress_peer.presses import KVPRESS_MODES, MERGE_SUFFIX
from .store import BACKENDS, Store, say_ignored
from .tasks import score_answer


def held(pred: dict[str, Any]) -> float:
    """Prompt tokens held per layer: ours writes it; kvpress's per-layer counts are averaged."""
    if pred.get("held_tokens") is not None:
        return float(pred["held_tokens"])
    per_layer = pred.get("kept_tokens_per_layer")
    if per_layer:
        return sum(per_layer) / len(per_layer)
    return float(pred.get("kept_tokens") or pred["prompt_tokens"])


def graded_row(backend: str, pred: dict[str, Any], sample: dict[str, Any]
               ) -> dict[str, Any] | None:
    """One prediction graded: its configuration as the report names it, its prompt's task,
    length, depth and needle offset, its score. None for a turn the sample does not have."""
    turn = int(pred.get("turn", 1))
    graded = sample if turn == 1 else sample.get("followup")
    if graded is None:
        return None
    policy, variant = pred["policy"], pred.get("variant", "")
    if backend == "kvpress":
        if policy.endswith(MERGE_SUFFIX):  # kvpress's MergingPress: our merge variant
            policy, variant = policy.removesuffix(MERGE_SUFFIX), "merge"
        mode = pred.get("kvpress_mode") or KVPRESS_MODES.get(policy, "")
    else:
        mode = pred.get("head_select", DEFAULT_HEAD_SELECT)
    config = config_key(policy, pred["ratio"], mode, variant)
    offsets = sample.get("needle_offsets") or []
    offset = offsets[0 if turn == 1 else 1] if len(offsets) >= turn else None
    tokens = held(pred)
    return {"backend": backend, "setting": pred.get("setting") or QUERY_AWARE,
            "id": pred["id"], "turn": turn, "task": sample["task"], "length": sample["length"],
            "depth": sample["depth"], "needle_offset": offset, "policy": config.policy,
            "ratio": config.ratio, "head_select": config.head_select, "variant": config.variant,
            "label": config_label(config.policy, config.head_select, config.variant),
            "prompt_tokens": pred["prompt_tokens"], "kept_tokens": pred.get("kept_tokens"),
            "held_tokens": tokens, "held_ratio": tokens / pred["prompt_tokens"],
            "score": score_answer(pred["text"], graded["answers"], graded["match"]),
            "answers": "|".join(graded["answers"]), "text": pred["text"]}


def load_rows(store: Store) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every backend's counted predictions, graded, and how many each backend's file holds
    that do not count (said on stderr, one line each)."""
    samples = store.samples()
    rows: list[dict[str, Any]] = []
    ignored: dict[str, int] = {}
    for backend in BACKENDS:
        current = store.current(backend)
        say_ignored(backend, current, store.predictions(backend))
        ignored[backend] = current.ignored
        for pred in current.rows:
            row = graded_row(backend, pred, samples[pred["id"]])
            if row is not None:
                rows.append(row)
    return rows, ignored
