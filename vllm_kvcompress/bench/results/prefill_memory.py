"""The results page's peak-memory section (issue 25): peak KV blocks against prompt length,
compressed while prefilling vs ``none``, from ``kvcompress bench prefill-memory``'s JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cells import copy_image

#: The folder under ``runs/`` that ``make bench-prefill-memory`` writes.
PREFILL_MEMORY_RUN = "bench-prefill-memory"


def prefill_memory_section(report: dict[str, Any] | None, images: Path, runs: Path
                           ) -> list[str]:
    """One table row per prompt length: ``none``'s peak blocks (linear in the prompt) next to
    the budgeted request's (flat at budget + chunk) and the pool's peak, the cuts, TTFT.

    Args:
        report: ``prefill_memory.json`` (``settings``, ``machine``, ``rows``), or ``None``.
        images: where the plot is copied (``docs/img/results``).
        runs: the ``runs/`` folder.
    """
    path = runs / PREFILL_MEMORY_RUN / "prefill_memory.json"
    if report is None:
        return [f"_{path} is missing: run `make bench-prefill-memory`._", ""]
    s, m = report["settings"], report["machine"]
    by_length: dict[int, dict[str, dict[str, Any]]] = {}
    for row in report["rows"]:
        kind = "none" if row["config"] == "none" else "budget"
        by_length.setdefault(row["prompt_len"], {})[kind] = row
    lines = ["### Peak KV against prompt length (`prefill_budget`, issue 25)", "",
             f"Made by `make bench-prefill-memory`: one request alone per prompt length, "
             f"stepped to its first token; `{s['policy']}` with `prefill_budget` {s['budget']:,} "
             f"and window {s['window']}, chunked prefill of {s['chunk']:,}, blocks of "
             f"{s['block_size']}, {s['dtype']}, model `{Path(s['model']).name}` ({m['cpu']}, "
             f"{m['cores']} cores, {m['date']}; one run per cell, so TTFT is indicative). "
             "Peak blocks: the most the request's block table held at any step; pool peak: "
             "the pool's, which adds the first cut's fresh destination blocks for one step. "
             f"Raw data: {path}.", "",
             "| prompt tokens | `none`: peak blocks | budget: peak blocks (pool peak) | bound "
             "(budget + chunk) | cuts | TTFT `none` s | TTFT budget s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for length in sorted(by_length):
        none, budget = by_length[length].get("none"), by_length[length].get("budget")
        if none is None or budget is None:
            continue
        lines.append(f"| {length:,} | {none['peak_blocks']} | {budget['peak_blocks']} "
                     f"({budget['peak_pool_blocks']}) | {budget['bound_blocks']} | "
                     f"{budget['cuts']} | {none['ttft_s']:.1f} | {budget['ttft_s']:.1f} |")
    flat = all(r["peak_blocks"] <= r["bound_blocks"] for r in report["rows"]
               if r["config"] != "none")
    lines += ["", f"The budgeted request {'never exceeds' if flat else '**exceeds**'} its bound "
              "at any length; `none` grows with the prompt."]
    image = copy_image(runs / PREFILL_MEMORY_RUN / "prefill_memory.png", images,
                       "prefill_memory.png")
    if image:
        lines += ["", f"![peak KV blocks and TTFT against prompt length]({image})"]
    return [*lines, ""]
