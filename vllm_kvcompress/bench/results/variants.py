"""Variants of a method on the same prompts: merging evicted tokens vs dropping them (ours and
kvpress's MergingPress), ChunkKV's chunk grid (the ablation), compression while prefilling vs at
the prompt's end, and the defaults ablation (one factor at a time around the server's defaults)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .cells import (
    ScoreKey,
    cell,
    ci_text,
    copy_image,
    entry_label,
    fmt,
    order,
    paired_difference,
    paired_text,
    read_scores,
)


def merge_section(result: dict[str, Any], run: Path) -> list[str]:
    """``merge: on`` vs off, ours and kvpress's MergingPress, paired on the same prompts."""
    summary = result["summary"]
    merged = sorted((s for s in summary if s.get("variant") == "merge"),
                    key=lambda s: (s["backend"] != "vllm", *order(s)))
    if not merged:
        return []
    scores = read_scores(run)

    def paired(a_key: ScoreKey, b_key: ScoreKey) -> str:
        return paired_text(paired_difference(scores.get(a_key, {}), scores.get(b_key, {})))

    def find(backend: str, policy: str, ratio: float, variant: str) -> dict[str, Any] | None:
        return next((s for s in summary if (s["backend"], s["policy"], s["ratio"],
                                            s.get("variant", "")) ==
                     (backend, policy, ratio, variant)), None)

    lines = ["## Merging evicted tokens (`merge: on`) vs dropping them", "",
             "All tasks, turn 1, mean [bootstrap 95% CI]; differences paired over the same "
             "prompts. kvpress's peer is its `MergingPress` around the same press (value "
             "folding into the most similar survivor, similarity and value-norm weighted); ours "
             "folds with window-attention weights (docs/ARCHITECTURE.md). Neither raises the "
             "merged slot's attention logit.", "",
             "| method | kept ratio | ours | ours, merge | merge - drop (ours) | kvpress | "
             "kvpress, merge | merge - drop (kvpress) | ours merge - kvpress merge |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in (m for m in merged if m["backend"] == "vllm"):
        policy, ratio, mode = s["policy"], s["ratio"], s.get("head_select") or "shared"
        plain = find("vllm", policy, ratio, "")
        peer_plain = find("kvpress", policy, ratio, "")
        peer_merge = find("kvpress", policy, ratio, "merge")
        peer_mode = (peer_merge or peer_plain or {}).get("head_select") or "shared"
        ours_key, peer_key = ("vllm", policy, ratio, mode), ("kvpress", policy, ratio, peer_mode)
        ours_gain = paired((*ours_key, "merge", 1), (*ours_key, "", 1))
        peer_gain = paired((*peer_key, "merge", 1), (*peer_key, "", 1))
        versus = paired((*ours_key, "merge", 1), (*peer_key, "merge", 1))
        lines.append(
            f"| {entry_label(plain or s)} | {ratio:g} | {cell(plain, 'accuracy')} | "
            f"{cell(s, 'accuracy')} | {ours_gain} | {cell(peer_plain, 'accuracy')} | "
            f"{cell(peer_merge, 'accuracy')} | {peer_gain} | {versus} |")
    return [*lines, ""]


GRID_VARIANTS = (("grid0", "grid from token 0, 4 sinks (`kv_chunk_grid=from_zero`)"),
                 ("sink0", "grid from token 0, no sinks (`kv_sink_tokens=0`)"))


def ablation_section(peer: dict[str, Any], run: Path) -> list[str]:
    """ChunkKV's chunk grid: the default (after the sinks) next to the grid from token 0 (with
    the sinks kept, and without sinks) and kvpress, on the same (jittered) prompts in the same
    engine run, with intervals and each variant's paired difference to the default."""
    def table(backend: str, variant: str) -> dict[float, dict[str, Any]]:
        return {s["ratio"]: s for s in peer["summary"]
                if s["backend"] == backend and s["policy"] == "chunkkv"
                and s.get("variant", "") == variant
                and (backend != "vllm" or s.get("head_select", "shared") == "shared")}

    variants = [(v, name) for v, name in GRID_VARIANTS if table("vllm", v)]
    if not variants:
        return []
    scores = read_scores(run)
    ours, kvpress = table("vllm", ""), table("kvpress", "")
    lines = ["## Ablation: where ChunkKV's chunk grid starts", "",
             "Same prompts and engine run as above (`--chunk-grid-ablation`: the variants are "
             "extra configurations of the same run). Needle offsets are jittered, so no grid is "
             "favoured by construction. The default grid starts after the 4 sink tokens; "
             "`grid0` starts it at token 0 as kvpress's does and keeps the sinks; `sink0` (the "
             "first cut's ablation, `--sink-tokens 0`) also starts it at token 0 but drops the "
             "sinks, which changes two things at once. Mean [bootstrap 95% CI]; \"- default\" "
             "is paired over prompts.", ""]
    for column, title in (("accuracy", "All tasks, turn 1"), ("needle_4k", "Needles at 4k")):
        if all(s.get(column) is None for s in ours.values()):
            continue
        header = ["kept ratio", "default (after the sinks)"]
        for _, name in variants:
            header += [name, "- default"]
        header.append("kvpress")
        lines += [f"{title}:", "", "| " + " | ".join(header) + " |",
                  "|" + "---:|" * len(header)]
        for ratio in sorted(ours, reverse=True):
            cells = [f"{ratio:g}", cell(ours.get(ratio), column)]
            for variant, _ in variants:
                cells += [cell(table("vllm", variant).get(ratio), column),
                          paired_grid(scores, variant, ratio, column == "needle_4k")]
            cells.append(cell(kvpress.get(ratio), column))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def paired_grid(scores: dict[ScoreKey, dict[str, float]], variant: str, ratio: float,
            needles_4k: bool) -> str:
    """Paired ``variant - default`` of our shared ChunkKV at ``ratio`` (turn 1)."""
    return paired_text(paired_difference(
        scores.get(("vllm", "chunkkv", ratio, "shared", variant, 1), {}),
        scores.get(("vllm", "chunkkv", ratio, "shared", "", 1), {}), needles_4k))


def prefill_section(result: dict[str, Any], run: Path, tasks: tuple[str, ...] = ()
                    ) -> list[str]:
    """Compressed while prefilling (the ``prefill`` variant: ``kv_prefill_budget`` at the
    configuration's own final budget) vs at the prompt's end, same prompts and engine store,
    paired over prompts; the per-task means of both next to each other.

    Args:
        result: a query-aware report (``results.json`` of an eval store).
        run: its folder (``results.csv`` for the paired intervals).
        tasks: the task columns to break down (those with a value in the report).
    """
    summary = result["summary"]
    prefill = sorted((s for s in summary if s["backend"] == "vllm"
                      and s.get("variant") == "prefill"), key=order)
    if not prefill:
        return []
    scores = read_scores(run)

    def plain_of(entry: dict[str, Any]) -> dict[str, Any] | None:
        return next((s for s in summary if s["backend"] == "vllm"
                     and (s["policy"], s["ratio"], s.get("head_select"), s.get("variant", ""))
                     == (entry["policy"], entry["ratio"], entry.get("head_select"), "")), None)

    lines = ["| method | kept ratio | prompts | at the prompt's end | while prefilling | "
             "while - end (paired) | turn 2: end | turn 2: while |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in prefill:
        plain = plain_of(s)
        key = ("vllm", s["policy"], s["ratio"], s.get("head_select") or "shared")
        diff = paired_text(paired_difference(scores.get((*key, "prefill", 1), {}),
                                             scores.get((*key, "", 1), {})))
        lines.append(f"| {entry_label(plain or s).removesuffix('(prefill)')} | {s['ratio']:g} | "
                     f"{s['samples']} | {cell(plain, 'accuracy')} | {cell(s, 'accuracy')} | "
                     f"{diff} | {cell(plain, 'turn2')} | {cell(s, 'turn2')} |")
    columns = [t for t in tasks if any(s.get(t) is not None for s in prefill)]
    if columns:
        lines += ["", "Per task (at the prompt's end / while prefilling):", "",
                  "| method | kept ratio | " + " | ".join(columns) + " |",
                  "|---|---:|" + "---:|" * len(columns)]
        for s in prefill:
            plain = plain_of(s) or {}
            cells = [f"{fmt(plain.get(t))} / {fmt(s.get(t))}" for t in columns]
            lines.append(f"| {s['policy']} | {s['ratio']:g} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def head_modes_section(result: dict[str, Any], run: Path) -> list[str]:
    """Each method in both head modes (``--head-select shared per_head``): ``shared`` and
    ``per_head`` side by side, ``per_head - shared`` paired over the prompts both answered
    (turn 1, and multi-turn's turn 2), the method's default marked. Nothing when no method ran
    in both modes."""
    from ...policies.registry import get_policy_info

    summary = [s for s in result["summary"] if s["backend"] == "vllm" and not s.get("variant")]
    by_key = {(s["policy"], s["ratio"], s.get("head_select") or "shared"): s for s in summary}
    pairs = sorted({(p, r) for p, r, m in by_key if m == "per_head" and (p, r, "shared") in by_key},
                   key=lambda k: (k[0], -k[1]))
    if not pairs:
        return []
    scores = read_scores(run)
    lines = ["| method | kept ratio | default | shared | per_head | per_head - shared (paired) | "
             "turn 2: per_head - shared |", "|---|---:|---|---:|---:|---:|---:|"]
    for policy, ratio in pairs:
        shared, per_head = by_key[(policy, ratio, "shared")], by_key[(policy, ratio, "per_head")]
        diff = [paired_text(paired_difference(
            scores.get(("vllm", policy, ratio, "per_head", "", turn), {}),
            scores.get(("vllm", policy, ratio, "shared", "", turn), {}))) for turn in (1, 2)]
        lines.append(f"| {policy} | {ratio:g} | {get_policy_info(policy).default_head_select} | "
                     f"{cell(shared, 'accuracy')} | {cell(per_head, 'accuracy')} | {diff[0]} | "
                     f"{diff[1]} |")
    return [*lines, ""]


#: ``scripts/defaults_ablation.py`` folders, in the order they ran (each around the defaults of
#: its day, which its ``ablation.json`` records).
DEFAULTS_ABLATION_RUNS = ("qwen-ablation", "qwen-ablation-c20")


def defaults_ablation_section(runs: Path, images: Path) -> list[str]:
    """One table (and plot) per defaults ablation under ``runs``: each configuration's accuracy
    and its paired difference to the default it departs from; nothing when none ran."""
    lines: list[str] = []
    for name in DEFAULTS_ABLATION_RUNS:
        path = runs / name / "ablation.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        params = report.get("params", {})
        if not lines:
            lines += ["## Defaults ablation (`scripts/defaults_ablation.py`)", "",
                      "One factor at a time around the server's defaults of the day, our engine, "
                      "the same prompts (all tasks, both turns); the difference is paired with "
                      "the default configuration (`chunkkv`, shared) at the same ratio. "
                      "`(w16)`: window 16, `(c40)`: chunk size 40, `[per_head]`: head mode.", ""]
        defaults = ", ".join(f"{k} {v}" for k, v in params.items())
        lines += [f"`runs/{name}`: defaults {defaults}; {report.get('model', '?')}, "
                  f"{report.get('dtype', '?')}, {report.get('machine', {}).get('date', '?')}.", "",
                  "| config | kept ratio | n | accuracy [95% CI] | - default (paired) |",
                  "|---|---:|---:|---|---|"]
        for row in report.get("rows", []):
            lines.append(f"| {row['label']} | {row['ratio']:g} | {row['n']} | "
                         f"{ci_text(row['mean'], row['ci'])} | "
                         f"{ci_text(row['diff'], row['diff_ci'], 3)} |")
        lines.append("")
        image = copy_image(runs / name / "ablation.png", images, f"{name}.png")
        if image:
            lines += [f"![{name}]({image})", ""]
    return lines
