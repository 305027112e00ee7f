"""Plots of ``kvcompress eval``: accuracy vs kept ratio (all tasks; per task and setting), and
depth x length needle heatmaps. One colour per method everywhere (``method_color``), ours solid,
kvpress dashed."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from ..bench.artifacts import pyplot

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")
#: The methods in a fixed order: method i gets colour i of matplotlib's tab10.
METHODS = ("streamingllm", "snapkv", "chunkkv", "pyramidkv", "tova", "sagekv", "knorm",
           "keydiff", "expected_attention", "qfilters")
#: Backend -> line style and legend name.
BACKEND_STYLES = {"vllm": ("-", "ours, vLLM"), "kvpress": ("--", "kvpress, HF")}


def method_color(policy: str) -> str:
    """The policy's colour (tab10 in ``METHODS`` order; black for others and ``none``)."""
    return f"C{METHODS.index(policy)}" if policy in METHODS else "black"


def plot_accuracy_vs_ratio(summary: list[dict[str, Any]], path: Path,
                           settings: dict[str, Any]) -> None:
    """One line per (backend, policy, head selection, variant): mean accuracy vs kept ratio, with
    the bootstrap 95% intervals as error bars (ChunkKV's grid variants dash-dotted / dotted).

    Left: all tasks (turn 1). Right, when the run has multi-turn samples: their turn-2
    accuracy. The ``none`` baseline of each backend is every policy's point at ratio 1.0.
    Points of one ratio are spread a little along x so their error bars stay apart.
    """
    plt = pyplot()
    panels = [("accuracy", "accuracy (all tasks, turn 1)")]
    if any(s.get("turn2") is not None for s in summary):
        panels.append(("turn2", "multi-turn: turn-2 accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    lines = sorted({(s["backend"], s["policy"], s.get("head_select", "shared"),
                     s.get("variant", "")) for s in summary if s["policy"] != "none"})
    dashes = {"": "-", "grid0": "-.", "sink0": ":"}
    for ax, (column, ylabel) in zip(axes[0], panels, strict=True):
        for n, (backend, policy, mode, variant) in enumerate(lines):
            mine = [s for s in summary if s["backend"] == backend]
            base = next((s for s in mine if s["policy"] == "none"), None)
            points = [s for s in mine if s["policy"] == policy
                      and s.get("head_select", "shared") == mode
                      and s.get("variant", "") == variant and s.get(column) is not None]
            if base is not None and base.get(column) is not None:
                points.append(base)
            if not points:
                continue
            points.sort(key=lambda s: 1.0 if s["policy"] == "none" else s["ratio"])
            shift = 1.0 + 0.012 * (n - len(lines) / 2)
            xs = [(1.0 if s["policy"] == "none" else s["ratio"]) * shift for s in points]
            ys = [s[column] for s in points]
            cis = [s.get(f"{column}_ci") or [s[column], s[column]] for s in points]
            yerr = [[y - ci[0] for y, ci in zip(ys, cis, strict=True)],
                    [ci[1] - y for y, ci in zip(ys, cis, strict=True)]]
            who = BACKEND_STYLES[backend][1]
            label = f"{points[0]['label'] if points[0]['policy'] != 'none' else policy} ({who})"
            if backend == "kvpress":
                label = f"{policy} [{mode}] ({who})"
            fmt = BACKEND_STYLES[backend][0] if backend != "vllm" else dashes.get(variant, "-")
            ax.errorbar(xs, ys, yerr=yerr, fmt=fmt, marker="o" if not variant else "^",
                        markersize=4, capsize=2, elinewidth=0.8, color=method_color(policy),
                        alpha=0.6 if mode == "per_head" and backend == "vllm" else 1.0,
                        label=label)
        ax.set_xscale("log")
        ax.set_xticks([0.05, 0.1, 0.25, 0.5, 1.0])
        ax.set_xticklabels(["0.05", "0.1", "0.25", "0.5", "1.0"])
        ax.set_xlabel("kept ratio (nominal fraction of prompt KV kept)")
        ax.set_ylabel(ylabel + ", 95% CI")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # full KV alone draws no line
            ax.legend(fontsize=6)
    first = next(iter(settings.values()), {})
    machine = first.get("machine", {})
    fig.suptitle(f"{first.get('model', '')}: {first.get('samples', '?')} prompts, "
                 f"{machine.get('date', '')}; error bars: bootstrap 95% CI over prompts",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_by_task(summary: list[dict[str, Any]], path: Path, setting: str,
                          settings: dict[str, Any]) -> None:
    """One panel per task (turn 1; multi-turn's turn 2 its own panel): mean accuracy vs kept
    ratio with bootstrap 95% error bars, one colour per method, ours solid, kvpress dashed,
    each backend's full KV (``none``) as every line's point at ratio 1.0.

    Args:
        summary: ``summary.summarize`` entries of one setting.
        path: the PNG to write.
        setting: the setting's name (title).
        settings: the runs' settings by backend (title: model, date).
    """
    from .tasks import TASKS

    panels = [(t, t) for t in TASKS if any(s.get(t) is not None for s in summary)]
    if any(s.get("turn2") is not None for s in summary):
        panels.append(("turn2", "niah_multiturn, turn 2"))
    if not panels:
        return
    plt = pyplot()
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(10.0, 4.6 * columns),
                                                     3.6 * rows + 1.6), squeeze=False)
    lines = sorted({(s["backend"], s["label"], s["policy"], s.get("head_select", "shared"))
                    for s in summary if s["policy"] != "none" and not s.get("variant")})
    # The nominal ratios (ours where it ran): kvpress's PyramidKV at our held ratios is left out.
    ratios = sorted({s["ratio"] for s in summary if s["backend"] == "vllm"}
                    or {s["ratio"] for s in summary} | {1.0})
    handles: dict[str, Any] = {}
    for ax, (column, title) in zip(axes.flat, panels, strict=False):
        for backend, label, policy, mode in lines:
            points = [s for s in summary if s["backend"] == backend and s["label"] == label
                      and s.get(column) is not None and not s.get("variant")
                      and s["ratio"] in ratios]
            base = next((s for s in summary if s["backend"] == backend
                         and s["policy"] == "none" and s.get(column) is not None), None)
            if not points:
                continue
            points = sorted(points + ([base] if base else []),
                            key=lambda s: 1.0 if s["policy"] == "none" else s["ratio"])
            xs = [1.0 if s["policy"] == "none" else s["ratio"] for s in points]
            ys = [s[column] for s in points]
            cis = [s.get(f"{column}_ci") or [y, y] for s, y in zip(points, ys, strict=True)]
            yerr = [[max(y - ci[0], 0) for y, ci in zip(ys, cis, strict=True)],
                    [max(ci[1] - y, 0) for y, ci in zip(ys, cis, strict=True)]]
            style, who = BACKEND_STYLES[backend]
            name = f"{label} ({who})" if backend == "vllm" else f"{policy} [{mode}] ({who})"
            handles[name] = ax.errorbar(xs, ys, yerr=yerr, fmt=style, marker="o", markersize=3,
                                        capsize=2, elinewidth=0.7, color=method_color(policy),
                                        alpha=0.55 if backend == "vllm" and mode == "per_head"
                                        else 0.9)
        ax.set_xscale("log")
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("kept ratio", fontsize=8)
        ax.set_ylabel("accuracy, 95% CI", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=7)
    first = next(iter(settings.values()), {})
    fig.suptitle(f"{setting.replace('_', '-')}: {first.get('model', '')}, "
                 f"{first.get('machine', {}).get('date', '')}; ours solid, kvpress dashed; "
                 "error bars: bootstrap 95% CI over prompts", fontsize=9)
    legend_inches = 0.45 + 0.2 * -(-len(handles) // 4)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmaps(rows: list[dict[str, Any]], path: Path, backend: str) -> None:
    """Needle accuracy (the three NIAH tasks), depth x length, one panel per configuration
    (policy with its head selection, and ratio)."""
    plt = pyplot()
    needles = [r for r in rows if r["task"] in NEEDLE_TASKS]
    if not needles:
        return
    depths = sorted({r["depth"] for r in needles})
    lengths = sorted({r["length"] for r in needles})
    configs = sorted({(r.get("label", r["policy"]), r["ratio"]) for r in needles},
                     key=lambda c: (c[0] != "none", c[0], -c[1]))
    policies = [p for p in dict.fromkeys(c[0] for c in configs)]
    ratios = sorted({c[1] for c in configs if c[0] != "none"}, reverse=True) or [1.0]
    cells: dict[tuple[str, float, float, int], list[float]] = defaultdict(list)
    for r in needles:
        cells[(r.get("label", r["policy"]), r["ratio"], r["depth"], r["length"])].append(
            r["score"])
    fig, axes = plt.subplots(len(policies), len(ratios), squeeze=False, layout="constrained",
                             figsize=(2.2 * len(ratios) + 1.2, 1.9 * len(policies) + 0.6))
    image = None
    for i, policy in enumerate(policies):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            use_ratio = 1.0 if policy == "none" else ratio
            if (policy == "none" and j > 0) or (policy, use_ratio) not in configs:
                ax.axis("off")
                continue
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
