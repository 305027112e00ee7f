"""The numbers of a report: per configuration and setting, mean accuracy with bootstrap 95%
intervals (overall, per task, needles at 4k, multi-turn turn 2); ours minus kvpress paired per
prompt; the issue's targets, met or not."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean
from typing import Any, NamedTuple

from .configs import DEFAULT_HEAD_SELECT, QUERY_AWARE, config_label
from .stats import RESAMPLES, bootstrap_ci, paired_bootstrap_ci
from .tasks import TASKS

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")
#: Held-ratio matching: a kvpress PyramidKV run pairs with ours when their held ratios differ by
#: at most this much.
HELD_MATCH_TOLERANCE = 0.02
#: Fewest common prompts for an "ours >= kvpress" verdict: the sizing rule's one task cell
#: (docs/eval-plan.md: at 8 binary prompts the paired half-width is already about 0.34; below
#: it an interval reaching 0 says nothing). Fewer pairs are reported with ``enough`` False and
#: count in no target.
MIN_PAIRED_PROMPTS = 8


class Key(NamedTuple):
    """A summary line: one configuration of one backend in one setting."""

    backend: str
    setting: str
    policy: str
    ratio: float
    head_select: str
    variant: str


def key_of(row: dict[str, Any]) -> Key:
    return Key(row["backend"], row.get("setting") or QUERY_AWARE, row["policy"], row["ratio"],
               row["head_select"], row.get("variant", ""))


def _group(rows: list[dict[str, Any]], turn: int) -> dict[Key, list[dict[str, Any]]]:
    by_config: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["turn"] == turn:
            by_config[key_of(row)].append(row)
    return by_config


def _mean_ci(scores: list[float], resamples: int) -> tuple[float | None, list[float] | None]:
    if not scores:
        return None, None
    ci = bootstrap_ci(scores, resamples=resamples)
    return mean(scores), None if ci is None else [ci[0], ci[1]]


def summarize(rows: list[dict[str, Any]], resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """Mean accuracy and its bootstrap 95% interval per (backend, setting, policy, ratio, head
    select, variant): overall, per task, needles at 4k, and the multi-turn sample's turn 2.

    Turn-1 numbers count each prompt once (``niah_multiturn``'s column is its turn 1); ``turn2``
    is the same prompts' second turn. The ``none`` baseline (ratio 1.0) is also each policy's
    ratio-1.0 point: at ratio 1.0 no policy evicts anything (tested in the engine).

    Each entry counts the prompts its configuration answered (``samples``), so a variant, a
    backend or a method run on a subset (kvpress on fewer prompts, kvzip on one task) shows its
    own numbers without shrinking anyone else's; ``full_kv_prompts`` says whether they are the
    prompts full KV answered in the same backend and setting (what a ranking across entries
    needs). Differences between configurations are paired over common prompts (``compare``,
    the report's variant sections), never taken between two entries' means.
    """
    first, second = _group(rows, 1), _group(rows, 2)
    # Full KV's prompts per (backend, setting): an entry over other prompts says so.
    full = {(k.backend, k.setting): {r["id"] for r in mine}
            for k, mine in first.items() if k.policy == "none"}
    summary = []
    for key, mine in sorted(first.items()):
        ids = {r["id"] for r in mine}
        entry: dict[str, Any] = {**key._asdict(),
                                 "label": config_label(key.policy, key.head_select,
                                                       key.variant),
                                 "samples": len(mine),
                                 "full_kv_prompts": ids == full.get((key.backend, key.setting)),
                                 "held_ratio": mean(r["held_ratio"] for r in mine)}
        entry["accuracy"], entry["accuracy_ci"] = _mean_ci([r["score"] for r in mine],
                                                           resamples)
        for task in TASKS:
            entry[task], entry[f"{task}_ci"] = _mean_ci(
                [r["score"] for r in mine if r["task"] == task], resamples)
        entry["needle_4k"], entry["needle_4k_ci"] = _mean_ci(
            [r["score"] for r in mine if r["task"] in NEEDLE_TASKS and r["length"] == 4096],
            resamples)
        turn2 = [r["score"] for r in second.get(key, [])]
        entry["turn2"], entry["turn2_ci"] = _mean_ci(turn2, resamples)
        entry["turn2_samples"] = len(turn2)
        summary.append(entry)
    return summary


def compare(rows: list[dict[str, Any]], summary: list[dict[str, Any]],
            resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """Ours minus kvpress, paired per prompt, with a paired bootstrap 95% interval, within
    each setting.

    Every (policy, ratio, head selection) of ours pairs with kvpress's (policy, ratio)
    (``match == "nominal"``); our PyramidKV also pairs with kvpress's PyramidKV run at our held
    ratio (``match == "held"``, see ``kvpress_backend.held_matched``). ``ge`` says whether
    "ours >= kvpress" holds: the interval's upper bound is 0 or above; ``enough`` whether at
    least ``MIN_PAIRED_PROMPTS`` prompts back that verdict. Only turn-1 prompts both answered
    count.
    """
    first = _group(rows, 1)
    scores = {key: {r["id"]: r["score"] for r in mine} for key, mine in first.items()}
    table = {key_of(s): s for s in summary}
    # Variants with a kvpress peer: none (the policy) and merge (MergingPress); the chunk-grid
    # variants are ours only (see the ablation).
    ours = [k for k in table if k.backend == "vllm" and k.variant in ("", "merge")]
    peers = [k for k in table if k.backend == "kvpress"]
    result = []
    for key in sorted(ours):
        mine = [p for p in peers if p.setting == key.setting and p.policy == key.policy
                and p.variant == key.variant]
        pairs = [(peer, "nominal") for peer in mine if peer.ratio == key.ratio]
        if key.policy == "pyramidkv":
            held = table[key]["held_ratio"]
            candidates = [p for p in mine if p.ratio != key.ratio
                          and abs(table[p]["held_ratio"] - held) <= HELD_MATCH_TOLERANCE]
            if candidates:
                best = min(candidates, key=lambda p: abs(table[p]["held_ratio"] - held))
                pairs.append((best, "held"))
        for peer, match in pairs:
            ids = sorted(scores[key].keys() & scores[peer].keys())
            if not ids:
                continue
            a = [scores[key][i] for i in ids]
            b = [scores[peer][i] for i in ids]
            ci = paired_bootstrap_ci(a, b, resamples=resamples)
            result.append({
                "setting": key.setting, "policy": key.policy, "ratio": key.ratio,
                "head_select": key.head_select, "variant": key.variant,
                "label": config_label(key.policy, key.head_select, key.variant),
                "match": match, "kvpress_ratio": peer.ratio, "kvpress_mode": peer.head_select,
                "samples": len(ids), "ours": mean(a), "kvpress": mean(b),
                "diff": mean(a) - mean(b), "diff_ci": None if ci is None else [ci[0], ci[1]],
                "ours_held_ratio": table[key]["held_ratio"],
                "kvpress_held_ratio": table[peer]["held_ratio"],
                "ge": ci is not None and ci[1] >= 0.0,
                "enough": len(ids) >= MIN_PAIRED_PROMPTS})
    return result


def targets(summary: list[dict[str, Any]],
            comparison: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The issue's accuracy targets, met or not, from the summary and the comparison; per
    setting (a target of another setting than query-aware names it first)."""
    result = []
    for setting in sorted({s["setting"] for s in summary}, key=lambda s: s != QUERY_AWARE):
        mine = [s for s in summary if s["setting"] == setting]
        pairs = [c for c in comparison or [] if c["setting"] == setting]
        named = [] if setting == QUERY_AWARE else [setting.replace("_", "-")]
        for target in [*_ratio_targets(mine), *_peer_targets(pairs)]:
            target["target"] = ": ".join([*named, target["target"]])
            target["setting"] = setting
            result.append(target)
    return result


def _ratio_targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ChunkKV against full KV: the policy-layer issue's goals (needles at 4k >= 90% of full KV
    at 0.25 kept, >= 75% at 0.1) and turn 2 >= 90% of full KV's turn 2."""
    def find(policy: str, ratio: float, head_select: str = DEFAULT_HEAD_SELECT,
             variant: str = "") -> dict[str, Any] | None:
        # Over full KV's own prompts only: a ratio of two means over different prompts is not
        # a measurement.
        return next((s for s in summary if s["backend"] == "vllm" and
                     s.get("full_kv_prompts", True) and
                     (s["policy"], s["ratio"], s["head_select"], s["variant"]) ==
                     (policy, ratio, head_select, variant)), None)

    result = []
    full = find("none", 1.0)
    kinds = sorted({(s["head_select"], s.get("variant", "")) for s in summary
                    if s["backend"] == "vllm" and s["policy"] == "chunkkv"},
                   key=lambda k: (k[1] != "", k[0] != DEFAULT_HEAD_SELECT, k))
    for mode, variant in kinds:
        for ratio, goal in ((0.25, 0.90), (0.1, 0.75)):
            mine = find("chunkkv", ratio, mode, variant)
            if full and mine and full["needle_4k"] is not None and mine["needle_4k"] is not None:
                value = mine["needle_4k"] / full["needle_4k"] if full["needle_4k"] else None
                result.append({"target": f"{config_label('chunkkv', mode, variant)} {ratio:g} "
                               f"kept: needle accuracy at 4k >= {goal:.0%} of full KV",
                               "value": value, "raw": [mine["needle_4k"], full["needle_4k"]],
                               "raw_ci": [mine["needle_4k_ci"], full["needle_4k_ci"]],
                               "met": value is not None and value >= goal})
            if full and mine and full.get("turn2") and mine.get("turn2") is not None:
                value = mine["turn2"] / full["turn2"]
                result.append({"target": f"{config_label('chunkkv', mode, variant)} {ratio:g} "
                               "kept, multi-turn: turn-2 accuracy >= 90% of full KV's turn 2",
                               "value": value, "raw": [mine["turn2"], full["turn2"]],
                               "raw_ci": [mine["turn2_ci"], full["turn2_ci"]],
                               "met": value >= 0.9})
    return result


def _peer_targets(comparison: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours >= kvpress at every ratio, per method and selection mode."""
    pairs_by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for pair in comparison:
        if pair["policy"] != "none" and pair.get("enough", True):
            pairs_by[(pair["policy"], pair["head_select"])].append(pair)
    result = []
    for (policy, mode), pairs in sorted(pairs_by.items()):
        # PyramidKV: at the same held memory where kvpress ran it, else at the nominal ratio.
        match = "held" if any(p["match"] == "held" for p in pairs) else "nominal"
        pairs = sorted((p for p in pairs if p["match"] == match), key=lambda p: -p["ratio"])
        misses = [p for p in pairs if not p["ge"]]
        where = " at the same held memory" if match == "held" else ""
        result.append({
            "target": f"{config_label(policy, mode)}: ours >= kvpress at every ratio{where} "
                      "(95% paired CI of ours - kvpress reaches 0)",
            "value": min(p["diff_ci"][1] for p in pairs if p["diff_ci"]) if pairs else None,
            "met": not misses,
            "detail": {f"{p['ratio']:g}": [p["ours"], p["kvpress"], p["diff"], p["diff_ci"]]
                       for p in pairs},
            "misses": [f"{p['ratio']:g}" for p in misses]})
    return result
