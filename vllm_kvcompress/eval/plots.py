"""Plots of ``kvcompress eval``: accuracy vs kept ratio, and depth x length needle heatmaps."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from ..bench.artifacts import pyplot

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")


def plot_accuracy_vs_ratio(summary: list[dict[str, Any]], path: Path,
                           settings: dict[str, Any]) -> None:
    """One line per (backend, policy): mean accuracy over all samples vs kept ratio.

    The ``none`` baseline of each backend is every policy's point at ratio 1.0.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"vllm": "-", "kvpress": "--"}
    colors = {"streamingllm": "tab:gray", "snapkv": "tab:blue", "chunkkv": "tab:red",
              "pyramidkv": "tab:green"}
    for backend in sorted({s["backend"] for s in summary}):
        mine = [s for s in summary if s["backend"] == backend]
        base = next((s for s in mine if s["policy"] == "none"), None)
        for policy in sorted({s["policy"] for s in mine} - {"none"}):
            points = sorted((s["ratio"], s["accuracy"]) for s in mine if s["policy"] == policy)
            if base is not None:
                points.append((1.0, base["accuracy"]))
            xs, ys = zip(*sorted(points), strict=True)
            label = f"{policy} ({'ours, vLLM' if backend == 'vllm' else 'kvpress, HF'})"
            ax.plot(xs, ys, styles.get(backend, ":"), marker="o", color=colors.get(policy),
                    label=label)
    ax.set_xscale("log")
    ax.set_xticks([0.05, 0.1, 0.25, 0.5, 1.0])
    ax.set_xticklabels(["0.05", "0.1", "0.25", "0.5", "1.0"])
    ax.set_xlabel("kept ratio (fraction of prompt KV kept)")
    ax.set_ylabel("accuracy (all tasks)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    first = next(iter(settings.values()), {})
    machine = first.get("machine", {})
    ax.set_title(f"{first.get('model', '')}: {first.get('samples', '?')} prompts, "
                 f"{machine.get('date', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmaps(rows: list[dict[str, Any]], path: Path, backend: str) -> None:
    """Needle accuracy (the three NIAH tasks), depth x length, one panel per policy and ratio."""
    plt = pyplot()
    needles = [r for r in rows if r["task"] in NEEDLE_TASKS]
    if not needles:
        return
    depths = sorted({r["depth"] for r in needles})
    lengths = sorted({r["length"] for r in needles})
    configs = sorted({(r["policy"], r["ratio"]) for r in needles},
                     key=lambda c: (c[0] != "none", c[0], -c[1]))
    policies = [p for p in dict.fromkeys(c[0] for c in configs)]
    ratios = sorted({c[1] for c in configs if c[0] != "none"}, reverse=True) or [1.0]
    cells: dict[tuple[str, float, float, int], list[float]] = defaultdict(list)
    for r in needles:
        cells[(r["policy"], r["ratio"], r["depth"], r["length"])].append(r["score"])
    fig, axes = plt.subplots(len(policies), len(ratios), squeeze=False, layout="constrained",
                             figsize=(2.2 * len(ratios) + 1.2, 1.9 * len(policies) + 0.6))
    image = None
    for i, policy in enumerate(policies):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            if policy == "none" and j > 0:
                ax.axis("off")
                continue
            use_ratio = 1.0 if policy == "none" else ratio
            grid = [[mean(cells[(policy, use_ratio, d, n)]) if cells[(policy, use_ratio, d, n)]
                     else float("nan") for n in lengths] for d in depths]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)))
            ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths],
                               fontsize=7)
            ax.set_yticks(range(len(depths)))
            ax.set_yticklabels([f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_title(f"{policy} {use_ratio:g}", fontsize=8)
            if j == 0:
                ax.set_ylabel("depth", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="needle accuracy")
    who = "ours, vLLM" if backend == "vllm" else "kvpress, HF"
    fig.suptitle(f"needle accuracy by depth x length ({who})", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
