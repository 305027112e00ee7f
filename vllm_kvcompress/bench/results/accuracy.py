"""The SmolLM2 study's accuracy table: our policies x ratios with intervals, and its plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cells import TASK_COLUMNS, cell, copy_image, entry_label, fmt, order, settings_line


def accuracy_section(result: dict[str, Any], images: Path, run: Path) -> list[str]:
    """Our policies x ratios: the accuracy table (with intervals) and the two plots."""
    lines = ["## Accuracy vs kept ratio (ours, in the engine)", ""]
    settings = result["settings"]
    for backend in [b for b in ("vllm",) if b in settings] or list(settings):
        lines.append(f"Command: {settings_line(settings[backend])}.")
    ours = sorted((s for s in result["summary"] if s["backend"] == "vllm"), key=order)
    tasks = [t for t in TASK_COLUMNS if any(s.get(t) is not None for s in ours)]
    columns = [c for c in ("accuracy", "needle_4k", "niah_multiturn", "turn2")
               if any(s.get(c) is not None for s in ours)]
    names = {"accuracy": "all tasks", "needle_4k": "needles at 4k",
             "niah_multiturn": "multi-turn t1", "turn2": "multi-turn t2"}
    lines += ["", "Mean score [bootstrap 95% CI over prompts]. \"held\" is the prompt KV held "
              "per layer as a fraction of the prompt (PyramidKV holds its largest layer budget "
              "in every layer). Multi-turn: turn 1 and turn 2 of the same prompts (turn 2 asks "
              "about the other needle).", "",
              "| config | kept ratio | held | n | " + " | ".join(
                  [names[c] for c in columns] + tasks) + " |",
              "|---|---:|---:|---:|" + "---:|" * (len(columns) + len(tasks))]
    for s in ours:
        cells = " | ".join(cell(s, c) for c in (*columns, *tasks))
        lines.append(f"| {entry_label(s)} | {s['ratio']:g} | {fmt(s.get('held_ratio'))} | "
                     f"{s['samples']} | {cells} |")
    for src, name, alt in (("accuracy_vs_ratio.png", "accuracy_vs_ratio.png",
                            "accuracy vs kept ratio"),
                           ("heatmap_vllm.png", "heatmap_vllm.png", "needle heatmaps")):
        path = copy_image(run / src, images, name)
        if path:
            lines += ["", f"![{alt}]({path})"]
    return [*lines, ""]
