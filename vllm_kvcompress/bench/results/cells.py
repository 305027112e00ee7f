"""Formatting shared by the results page's sections: numbers with intervals, labels, order,
images, the command line a table came from, and per-prompt scores for paired intervals."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from ...eval.stats import paired_bootstrap_ci

TASK_COLUMNS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking",
                "qa_squad")
#: Sample ids of the needle tasks behind "needles at 4k" start with these (``{task}-{length}-``).
NEEDLE_PREFIXES = ("niah_single-", "niah_multikey-", "niah_multivalue-")


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ci_text(value: float | None, ci: list[float] | None, digits: int = 2) -> str:
    """``0.62 [0.51, 0.72]``; ``-`` for no value."""
    if value is None:
        return "-"
    if not ci:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def cell(entry: dict[str, Any] | None, column: str) -> str:
    if entry is None:
        return "-"
    return ci_text(entry.get(column), entry.get(f"{column}_ci"))


def entry_label(entry: dict[str, Any]) -> str:
    return entry.get("label") or entry["policy"]


def order(entry: dict[str, Any]) -> tuple[bool, str, bool, str, float]:
    mode = entry.get("head_select") or "shared"
    return (entry["policy"] != "none", entry["policy"], mode != "shared", mode, -entry["ratio"])


def copy_image(src: Path, images: Path, name: str) -> str | None:
    if not src.exists():
        return None
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, images / name)
    return f"img/results/{name}"


def settings_line(settings: dict[str, Any]) -> str:
    m = settings.get("machine", {})
    per_cell = settings.get("samples_per_cell", settings.get("per_cell", "?"))
    line = (f"`{settings.get('command', '?')}` ({settings.get('samples', '?')} prompts, "
            f"{per_cell} per task, length and depth, {m.get('cpu', '?')}, "
            f"{m.get('cores', '?')} cores, {m.get('date', '?')})")
    earlier = settings.get("resumed_from", [])
    if earlier:  # a resumed run: its folder already held rows of these earlier runs
        line += "; resumed, keeping the rows of " + "; ".join(
            f"`{run.get('command', '?')}` ({run.get('date', '?')})" for run in earlier)
    return line


ScoreKey = tuple[str, str, float, str, str, int]  # backend, policy, ratio, mode, variant, turn


def read_scores(run: Path) -> dict[ScoreKey, dict[str, float]]:
    """Per-prompt scores from a run's ``results.csv``, query-aware rows only (the SmolLM2
    sections'; rows written before settings existed are query-aware): (backend, policy, ratio,
    head select, variant, turn) -> {sample id: score}; empty when the CSV is missing."""
    path = run / "results.csv"
    scores: dict[ScoreKey, dict[str, float]] = defaultdict(dict)
    if not path.exists():
        return scores
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if (row.get("setting") or "query_aware") != "query_aware":
                continue
            key = (row["backend"], row["policy"], float(row["ratio"]),
                   row.get("head_select") or "shared", row.get("variant") or "",
                   int(row.get("turn") or 1))
            scores[key][row["id"]] = float(row["score"])
    return scores


def needle_ids(ids: set[str]) -> list[str]:
    return sorted(i for i in ids if i.startswith(NEEDLE_PREFIXES) and "-4096-" in i)


def paired_difference(a: dict[str, float], b: dict[str, float], needles_4k: bool = False
                      ) -> tuple[float, list[float] | None, int] | None:
    """Mean of ``a - b`` over the prompts both scored (needles at 4k only if asked), its paired
    bootstrap 95% CI and the prompt count; ``None`` when they share no prompt."""
    ids = sorted(a.keys() & b.keys())
    if needles_4k:
        ids = needle_ids(set(ids))
    if not ids:
        return None
    first, second = [a[i] for i in ids], [b[i] for i in ids]
    ci = paired_bootstrap_ci(first, second)
    return mean(first) - mean(second), None if ci is None else list(ci), len(ids)


def paired_text(result: tuple[float, list[float] | None, int] | None) -> str:
    return "-" if result is None else ci_text(result[0], result[1], 3)
