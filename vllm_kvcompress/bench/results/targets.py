"""The issues' targets, one line each, with the measured value and the run it comes from."""

from __future__ import annotations

from typing import Any

from .cells import ci_text
from .serving import peak_verdict


def decode_targets(long_output: dict[str, Any] | None) -> list[str]:
    """The decode-time issue's targets (rows of the targets table)."""
    if long_output is None:
        return []
    lines = []
    base = long_output["rows"][0]
    for r in long_output["rows"][1:]:
        name = f"{r['policy']}, decode_budget {r['decode_budget']}"
        lines.append(f"| KV held by a decode-compressed request <= cdiv(budget + interval, "
                     f"block) blocks, vLLM's usage gauge ({name}; runs/bench-long-output) | "
                     f"{r['solo_max_blocks_by_gauge']} blocks (bound {r['block_bound']}) | "
                     f"{'yes' if r['held_within_bound'] else '**no**'} |")
        ratio = r["output_tokens_per_s_vs_none"]
        lines.append(f"| long-output tok/s >= 1.5x none ({name}) | {ratio:.2f}x | "
                     f"{'yes' if ratio >= 1.5 else '**no**'} |")
        if base["preemptions"]:
            lines.append(f"| 0 preemptions where none has {base['preemptions']} ({name}) | "
                         f"{r['preemptions']} | {'yes' if r['preemptions'] == 0 else '**no**'} "
                         "|")
    x = long_output["plugin_step_work"].get("prompt_compressed_knorm")
    if x is not None:
        lines.append(f"| plugin per-step work (remap included) < 1% of a decode step without "
                     f"compaction work, every request carrying evicted tokens, batch "
                     f"{x['batch']} | {x['plugin_share_p50']:.2%} | "
                     f"{'yes' if x['plugin_share_p50'] < 0.01 else '**no**'} |")
    return lines


def targets_section(evals: dict[str, dict[str, Any]], throughput: dict[str, Any] | None,
                    overhead: dict[str, Any] | None = None,
                    long_output: dict[str, Any] | None = None) -> list[str]:
    """The issue's targets, one line each, with the measured value and the run it comes from."""
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += decode_targets(long_output)
    if overhead is not None:
        for policy, row in overhead["ttft"]["per_policy"].items():
            if policy == "none":
                continue
            share = row["compaction_share_of_ttft"]
            lines.append(f"| {policy}: scoring + selection + compaction <= 5% of a "
                         f"{overhead['ttft']['prompt_len']}-token TTFT (runs/bench-overhead) | "
                         f"{share:.1%} | {'yes' if share <= 0.05 else '**no**'} |")
        tp = overhead.get("throughput")
        if tp is not None:
            ratio = tp["ratio_none_vs_disabled"]
            lines.append(f"| policy none >= 0.98x plugin-off output tokens/s "
                         f"(runs/bench-overhead) | {ratio:.3f}x | "
                         f"{'yes' if ratio >= 0.98 else '**no**'} |")
    for name, result in evals.items():
        for t in result["targets"]:
            value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            if "raw" in t and t["value"] is not None:
                cis = t.get("raw_ci") or [None, None]
                value = (f"{t['value']:.0%} of full ({ci_text(t['raw'][0], cis[0])} vs "
                         f"{ci_text(t['raw'][1], cis[1])})")
            if "detail" in t:
                value = "ours - kvpress by ratio: " + ", ".join(
                    f"{k}: {ci_text(d[2], d[3], 3)}" for k, d in t["detail"].items())
                if t.get("misses"):
                    value += f"; misses at {', '.join(t['misses'])}"
            lines.append(f"| {t['target']} (runs/{name}) | {value} | "
                         f"{'yes' if t['met'] else '**no**'} |")
    if throughput:
        for r in throughput["rows"]:
            if r["policy"] == "none":
                continue
            verdict = peak_verdict(r, throughput["workload"]["requests"])
            lines.append(f"| peak running >= 0.9 x (1/{r['ratio']:g}) x none ({r['policy']}, "
                         f"{r['max_tokens']} out) | {r['peak_running']} vs goal "
                         f"{r['peak_goal']:.1f} | {verdict if verdict != 'not met' else '**no**'}"
                         " |")
            if r["ratio"] == 0.25:
                met = r["output_tokens_per_s_vs_none"] >= 2.0  # issue 25's target
                lines.append(f"| tok/s >= 2x none at 0.25 kept ({r['policy']}, "
                             f"{r['max_tokens']} out) | {r['output_tokens_per_s_vs_none']:.2f}x "
                             f"| {'yes' if met else '**no**'} |")
    return [*lines, ""]
