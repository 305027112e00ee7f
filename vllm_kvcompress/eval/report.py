"""The report of a results store: ``results.json`` (settings, summary, comparison, targets,
what did not run, what the store holds but does not count), ``results.csv`` (one graded row per
prediction), the plots, and the table printed by ``kvcompress eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bench.artifacts import write_json_csv
from .grading import load_rows
from .stats import RESAMPLES
from .store import BACKENDS, Store
from .summary import compare, summarize, targets
from .tasks import TASKS


def report(out: Path, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Grades the predictions the store in ``out`` counts and writes results.json/csv and the
    plots: ``accuracy_vs_ratio.png`` (query-aware, all tasks and turn 2),
    ``accuracy_by_task_<setting>.png`` (per task, every method, ours solid, kvpress dashed)
    and ``heatmap_<backend>.png`` (query-aware needles, depth x length).

    Raises:
        RuntimeError: the store counts no prediction.
    """
    store = Store(out)
    rows, ignored = load_rows(store)
    if not rows:
        raise RuntimeError(f"no predictions in {out}; run `kvcompress eval` first")
    summary = summarize(rows, resamples)
    comparison = compare(rows, summary, resamples)
    settings = {b: s for b in BACKENDS if (s := store.settings(b)) is not None}
    result = {"settings": settings, "bootstrap": {"resamples": resamples, "level": 0.95,
                                                  "unit": "prompt", "seed": 0},
              "summary": summary, "comparison": comparison,
              "targets": targets(summary, comparison), "not_run": not_run(settings),
              "ignored_rows": ignored}
    write_json_csv(out, "results", result, rows)
    from .plots import plot_accuracy_by_task, plot_accuracy_vs_ratio, plot_heatmaps

    aware = [s for s in summary if s["setting"] == "query_aware"]
    if aware:
        plot_accuracy_vs_ratio(aware, out / "accuracy_vs_ratio.png", settings)
    for setting in sorted({s["setting"] for s in summary}):
        plot_accuracy_by_task([s for s in summary if s["setting"] == setting],
                              out / f"accuracy_by_task_{setting}.png", setting, settings)
    for backend in sorted({r["backend"] for r in rows}):
        plot_heatmaps([r for r in rows if r["backend"] == backend and r["turn"] == 1
                       and r["setting"] == "query_aware"], out / f"heatmap_{backend}.png",
                      backend)
    return result


def not_run(settings: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """The (backend, setting) pairs the latest runs were asked for and did not run, with why."""
    return [{"backend": backend, "setting": setting, "why": why}
            for backend, mine in settings.items()
            for setting, why in (mine.get("settings_not_run") or {}).items()]


def format_ci(value: float | None, ci: list[float] | None, digits: int = 2) -> str:
    """``0.62 [0.51, 0.72]``; ``-`` for no value."""
    if value is None:
        return "-"
    if ci is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def print_report(result: dict[str, Any]) -> None:
    summary = result["summary"]
    print("accuracy, mean [bootstrap 95% CI over prompts]")
    print(f"{'backend':<8}{'setting':<15}{'config':<22}{'ratio':>6}{'held':>6}{'n':>5}  "
          f"{'all tasks':<19}{'needles 4k':<19}{'multi-turn t1':<19}{'multi-turn t2':<19}")
    for s in summary:
        cells = "".join(f"{format_ci(s[c], s[f'{c}_ci']):<19}"
                        for c in ("accuracy", "needle_4k", "niah_multiturn", "turn2"))
        print(f"{s['backend']:<8}{s['setting']:<15}{s['label']:<22}{s['ratio']:>6.3g}"
              f"{s['held_ratio']:>6.2f}{s['samples']:>5}  {cells}")
    tasks = [t for t in TASKS if any(s[t] is not None for s in summary)]
    print("\nper task (mean)")
    # Full names: niah_multikey and niah_multikey_uuid must not both read "niah_multike".
    width = max([12, *(len(t) for t in tasks)]) + 1
    print(f"{'backend':<8}{'setting':<15}{'config':<22}{'ratio':>6}"
          + "".join(f"{t:>{width}}" for t in tasks))
    for s in summary:
        cells = "".join(f"{'-' if s[t] is None else format(s[t], '.3f'):>{width}}"
                        for t in tasks)
        print(f"{s['backend']:<8}{s['setting']:<15}{s['label']:<22}{s['ratio']:>6.3g}{cells}")
    if result.get("comparison"):
        print("\nours - kvpress, paired over prompts [95% CI]")
        for c in result["comparison"]:
            print(f"  {c['setting']:<15}{c['label']:<20} {c['ratio']:<5g} vs kvpress "
                  f"{c['kvpress_ratio']:<6g}({c['kvpress_mode']}, {c['match']}): "
                  f"{format_ci(c['diff'], c['diff_ci'], 3)} -> "
                  f"{'>= holds' if c['ge'] else 'MISSES'}"
                  f"{'' if c.get('enough', True) else ' (too few prompts to say)'}")
    for item in result.get("not_run", []):
        print(f"not run: {item['backend']}, {item['setting']}: {item['why']}")
    for t in result["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        misses = f" (misses at {', '.join(t['misses'])})" if t.get("misses") else ""
        print(f"target: {t['target']}: {value} -> {'met' if t['met'] else 'NOT met'}{misses}")
