"""Every method x kept ratio, ours and kvpress side by side, one plot per method family, and
the best method at 0.1 kept paired against ChunkKV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cells import ScoreKey, cell, ci_text, entry_label, order, paired_difference, read_scores

FAMILIES: dict[str, tuple[str, ...]] = {
    "window attention": ("snapkv", "chunkkv", "pyramidkv", "tova", "sagekv"),
    "query-agnostic": ("expected_attention", "knorm", "keydiff", "qfilters"),
    "positional": ("streamingllm",),
}


def family_of(policy: str) -> str:
    return next((name for name, members in FAMILIES.items() if policy in members), "other")


def methods_section(result: dict[str, Any], images: Path, run: Path) -> list[str]:
    """Every method x kept ratio, ours and kvpress side by side (needles at 4k, all tasks,
    multi-turn turn 2), one plot per method family, and which method is best at 0.1."""
    summary = [s for s in result["summary"] if not s.get("variant")]
    ours = sorted((s for s in summary if s["backend"] == "vllm" and s["policy"] != "none"),
                  key=lambda s: (list(FAMILIES).index(family_of(s["policy"]))
                                 if family_of(s["policy"]) in FAMILIES else 99, *order(s)))
    if not ours:
        return []
    peers = {(s["policy"], s["ratio"]): s for s in summary if s["backend"] == "kvpress"}
    pairs = {(c["policy"], c["ratio"], c["head_select"]): c
             for c in result.get("comparison", [])
             if c["match"] == "nominal" and not c.get("variant")}
    full = {s["backend"]: s for s in summary if s["policy"] == "none"}
    lines = ["## Every method, ours and kvpress", "",
             "Each method in its default selection mode (`--head-select default`), every kept "
             "ratio, on the same prompts; mean [bootstrap 95% CI]. \"ours - kvpress\" is the "
             "paired difference over all tasks' turn-1 prompts; `-` where kvpress has no such "
             "press (SAGE-KV). Full KV (`none`): ours "
             f"{cell(full.get('vllm'), 'needle_4k')} on needles at 4k, kvpress "
             f"{cell(full.get('kvpress'), 'needle_4k')}; turn 2 "
             f"{cell(full.get('vllm'), 'turn2')} / {cell(full.get('kvpress'), 'turn2')}.", "",
             "| family | method | kept ratio | needles 4k, ours | needles 4k, kvpress | "
             "all tasks, ours | all tasks, kvpress | ours - kvpress | multi-turn t2, ours | "
             "multi-turn t2, kvpress |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in ours:
        peer = peers.get((s["policy"], s["ratio"]))
        pair = pairs.get((s["policy"], s["ratio"], s.get("head_select") or "shared"))
        diff = "-" if pair is None else (
            ci_text(pair["diff"], pair["diff_ci"], 3) + ("" if pair["ge"] else " **(<)**"))
        lines.append(f"| {family_of(s['policy'])} | {entry_label(s)} | {s['ratio']:g} | "
                     f"{cell(s, 'needle_4k')} | {cell(peer, 'needle_4k')} | "
                     f"{cell(s, 'accuracy')} | {cell(peer, 'accuracy')} | {diff} | "
                     f"{cell(s, 'turn2')} | {cell(peer, 'turn2')} |")
    lines += ["", *best_at_ratio(read_scores(run), ours, 0.1), ""]
    for family in [f for f in FAMILIES if any(family_of(s["policy"]) == f for s in ours)]:
        name = "methods_" + family.replace(" ", "_").replace("-", "_") + ".png"
        images.mkdir(parents=True, exist_ok=True)
        plot_family(family, ours, peers, full, images / name)
        lines += [f"![{family} methods, ours vs kvpress](img/results/{name})", ""]
    return lines


def best_at_ratio(scores: dict[ScoreKey, dict[str, float]], ours: list[dict[str, Any]],
                  ratio: float) -> list[str]:
    """Which of our methods is best on the needles at ``ratio``, paired against ChunkKV."""
    base_key = ("vllm", "chunkkv", ratio, "shared", "", 1)
    base = scores.get(base_key, {})
    rows = []
    for s in ours:
        if s["ratio"] != ratio or (s["policy"], s.get("head_select")) == ("chunkkv", "shared"):
            continue
        mine = scores.get(("vllm", s["policy"], ratio, s.get("head_select") or "shared", "", 1),
                          {})
        result = paired_difference(mine, base, needles_4k=True)
        if result is not None:
            rows.append((result[0], entry_label(s), result[1], result[2]))
    if not rows:
        return [f"_No paired needle prompts at kept ratio {ratio:g} against ChunkKV._"]
    rows.sort(reverse=True)
    diff, label, ci, n = rows[0]
    beats = ci is not None and ci[0] > 0
    verdict = ("beats ChunkKV (the interval excludes 0)" if beats else
               "does not beat ChunkKV measurably (the interval reaches 0 or below)")
    others = "; ".join(f"{lab} {ci_text(d, c, 3)}" for d, lab, c, _ in rows[1:])
    return [f"**Best at kept ratio {ratio:g} on the needles at 4k, paired against our ChunkKV** "
            f"(n = {n} prompts): {label}, {ci_text(diff, ci, 3)}: "
            f"{verdict}. The others: {others}."]


def plot_family(family: str, ours: list[dict[str, Any]],
                peers: dict[tuple[str, float], dict[str, Any]],
                full: dict[str, dict[str, Any]], path: Path) -> None:
    """Needle accuracy vs kept ratio with 95% error bars: ours solid, kvpress dashed."""
    from ..artifacts import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = sorted({entry_label(s) for s in ours if family_of(s["policy"]) == family})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        mine = sorted((s for s in ours if entry_label(s) == label), key=lambda s: s["ratio"])
        color = colors[i % len(colors)]
        for series, style, name in (
                (mine, "-o", f"{label} (ours)"),
                ([p for p in (peers.get((s["policy"], s["ratio"])) for s in mine) if p],
                 "--s", f"{mine[0]['policy']} (kvpress)")):
            series = [s for s in series if s.get("needle_4k") is not None]
            if not series:
                continue
            x = [s["ratio"] for s in series]
            y = [s["needle_4k"] for s in series]
            bounds = [s.get("needle_4k_ci") or [v, v] for v, s in zip(y, series, strict=True)]
            err = [[max(v - lo, 0) for v, (lo, _) in zip(y, bounds, strict=True)],
                   [max(hi - v, 0) for v, (_, hi) in zip(y, bounds, strict=True)]]
            ax.errorbar(x, y, yerr=err, fmt=style, color=color, capsize=3, label=name,
                        alpha=0.9 if style.startswith("-") else 0.6)
    if full.get("vllm") and full["vllm"].get("needle_4k") is not None:
        ax.axhline(full["vllm"]["needle_4k"], color="black", linestyle=":", label="full KV")
    ax.set_xscale("log")
    ratios = sorted({s["ratio"] for s in ours if family_of(s["policy"]) == family})
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.set_xlabel("kept ratio (log)")
    ax.set_ylabel("needle accuracy at 4k")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{family} methods: ours (solid) vs kvpress (dashed), 95% CIs")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
