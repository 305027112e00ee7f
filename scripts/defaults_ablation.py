#!/usr/bin/env python
"""Defaults by evidence (issue 23, deliverable 5): one factor at a time around the server's
default settings, on the prompts of a finished ``kvcompress eval`` run, in our engine.

The server default is ChunkKV, ``shared`` (one token set per layer), window 32, chunk size 20,
4 sinks (read from the policy layer, so the script always departs from what a server runs). This
script answers, on the same prompts (paired), whether any single change helps: ``per_head``
selection, window 16 or 64, chunk size 5, 10 or 40 (ChunkKV), and SnapKV with the same window
changes, at the kept ratios given. The first run (2026-12-07, chunk size 10 the default then)
measured ``c20``; its table is in docs/ARCHITECTURE.md "Defaults". Each variant is one more
configuration in ONE engine with prefix caching on, so every prompt is prefilled once and each
variant recomputes only its observation window (about a second a request on Qwen2.5-0.5B at 4k
here).

Usage (after ``kvcompress eval --out runs/qwen-eval ...`` wrote ``samples.jsonl``)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/defaults_ablation.py \\
        --samples runs/qwen-eval/samples.jsonl --model models/qwen2.5-0.5b-instruct \\
        --out runs/qwen-ablation --ratios 0.25 0.125

Writes ``predictions-vllm.jsonl`` (resumable: rerun to continue), ``ablation.json``,
``ablation.csv``, ``ablation.png`` and prints a markdown table: accuracy with its bootstrap 95%
interval over prompts, and the paired difference to the default configuration at the same ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from vllm_kvcompress.bench.artifacts import machine, pyplot, write_json_csv
from vllm_kvcompress.eval import engine_backend
from vllm_kvcompress.eval.engine_backend import config_key, config_label
from vllm_kvcompress.eval.stats import bootstrap_ci, paired_bootstrap_ci
from vllm_kvcompress.eval.tasks import EvalSample, Followup, score_answer
from vllm_kvcompress.policies.chunkkv import CHUNK_SIZE
from vllm_kvcompress.policies.params import COMMON_PARAMS
from vllm_kvcompress.policies.snapkv import POOL_KERNEL

_COMMON = {p.name: p.default for p in COMMON_PARAMS}
#: The defaults every variant departs from: the server's (the eval's too).
DEFAULT_PARAMS = {"window": _COMMON["window"], "pool_kernel": POOL_KERNEL.default,
                  "chunk_size": CHUNK_SIZE.default, "sink_tokens": _COMMON["sink_tokens"]}

#: One factor at a time: variant name -> parameter overrides (names say the value, so a row
#: means the same whatever the default is).
ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "w16": {"window": 16}, "w64": {"window": 64},
    "c5": {"chunk_size": 5}, "c10": {"chunk_size": 10}, "c40": {"chunk_size": 40},
}

#: (policy, head selection, variant) triples run at every ratio; ("chunkkv", "shared", "") is
#: the default everything is compared with.
CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("chunkkv", "shared", ""), ("chunkkv", "per_head", ""),
    ("chunkkv", "shared", "w16"), ("chunkkv", "shared", "w64"),
    ("chunkkv", "shared", "c5"), ("chunkkv", "shared", "c10"), ("chunkkv", "shared", "c40"),
    ("snapkv", "shared", ""), ("snapkv", "per_head", ""),
    ("snapkv", "shared", "w16"), ("snapkv", "shared", "w64"),
)
DEFAULT = ("chunkkv", "shared", "")


def load_samples(path: Path) -> list[EvalSample]:
    """``samples.jsonl`` of an eval run back into ``EvalSample`` objects: each id's current
    prompt (its last line; a store appends a changed prompt under the same id)."""
    names = {f.name for f in dataclasses.fields(EvalSample)} - {"followup"}
    latest = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[row["id"]] = row
    samples = []
    for row in latest.values():
        followup = row.get("followup")
        samples.append(EvalSample(**{k: v for k, v in row.items() if k in names},
                                  followup=None if followup is None else Followup(**followup)))
    return samples


Scores = dict[tuple[str, float], dict[str, float]]


def grade(samples: list[EvalSample], predictions: Path) -> Scores:
    """Per configuration label and ratio: ``{"<sample id>/t<turn>": score}``."""
    by_id = {s.id: s for s in samples}
    scores: Scores = defaultdict(dict)
    for line in predictions.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        sample = by_id.get(row["id"])
        if sample is None:
            continue
        turn = int(row.get("turn", 1))
        graded = sample if turn == 1 else sample.followup
        label = config_label(row["policy"], row["head_select"], row.get("variant", ""))
        scores[(label, float(row["ratio"]))][f"{row['id']}/t{turn}"] = score_answer(
            row["text"], graded.answers, graded.match)
    return scores


def table(scores: Scores, ratios: list[float]) -> list[dict[str, Any]]:
    """One row per (label, ratio): mean, 95% CI, paired difference to the default."""
    rows = []
    default_label = config_label(*DEFAULT)
    for ratio in [1.0, *ratios]:
        base = scores.get((default_label, ratio), {})
        for (label, r), mine in sorted(scores.items()):
            if r != ratio:
                continue
            ci = bootstrap_ci(list(mine.values()))
            row = {"label": label, "ratio": ratio, "n": len(mine), "mean": mean(mine.values()),
                   "ci": list(ci) if ci else None, "diff": None, "diff_ci": None}
            common = sorted(set(mine) & set(base))
            if label != default_label and common:
                a = [mine[k] for k in common]
                b = [base[k] for k in common]
                row["diff"] = mean(x - y for x, y in zip(a, b, strict=True))
                row["diff_ci"] = list(paired_bootstrap_ci(a, b))
            rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = sorted({r["label"] for r in rows if r["ratio"] < 1.0})
    for label in labels:
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["ratio"])
        xs = [r["ratio"] for r in mine]
        ys = [r["mean"] for r in mine]
        style = "-" if label.startswith("chunkkv") else "--"
        ax.plot(xs, ys, style, marker="o", label=label)
    full = [r for r in rows if r["ratio"] == 1.0]
    if full:
        ax.axhline(full[0]["mean"], color="black", lw=0.8, label="full KV")
    ax.set_xlabel("kept ratio")
    ax.set_ylabel("accuracy (all tasks, all turns)")
    ax.set_title("Defaults ablation (one factor at a time), our engine")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/qwen-ablation"))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.125])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--policies", nargs="+", choices=sorted({c[0] for c in CONFIGS}),
                    default=sorted({c[0] for c in CONFIGS}),
                    help="run only these policies' configurations (SnapKV's do not depend on "
                    "the chunk size)")
    ap.add_argument("--variants", nargs="+", choices=list(ABLATION_VARIANTS),
                    default=list(ABLATION_VARIANTS),
                    help="run only these variants (the default configuration and per_head "
                    "always run)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.samples.exists():
        print(f"defaults_ablation: --samples {args.samples} does not exist", file=sys.stderr)
        return 2
    samples = load_samples(args.samples)
    # Rows are found again by (prompt, policy, ratio, mode, variant), not by their parameters:
    # a folder made under other defaults would be silently reused, so it is refused.
    earlier = args.out / "ablation.json"
    if earlier.exists():
        made = json.loads(earlier.read_text())
        if made.get("params") != DEFAULT_PARAMS or made.get("variants") != ABLATION_VARIANTS:
            print(f"defaults_ablation: --out {args.out} holds an ablation made under other "
                  f"defaults ({made.get('params')}, variants {made.get('variants')}); the "
                  f"defaults are now {DEFAULT_PARAMS}: pick a new --out", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    predictions = args.out / "predictions-vllm.jsonl"
    # The eval backend resolves a variant name through its VARIANTS table.
    engine_backend.VARIANTS.update(ABLATION_VARIANTS)
    if not args.report_only:
        configs = [config_key(p, r, h, v) for r in args.ratios for p, h, v in CONFIGS
                   if p in args.policies and (not v or v in args.variants)]
        engine_backend.run(samples, configs, DEFAULT_PARAMS, args.model, predictions,
                           dtype=args.dtype)
    rows = table(grade(samples, predictions), args.ratios)
    report = {"machine": machine(), "model": args.model, "dtype": args.dtype,
              "samples": str(args.samples), "params": DEFAULT_PARAMS,
              "variants": ABLATION_VARIANTS, "rows": rows}
    write_json_csv(args.out, "ablation", report, [
        {**r, "ci": json.dumps(r["ci"]), "diff_ci": json.dumps(r["diff_ci"])} for r in rows])
    plot(rows, args.out / "ablation.png")
    print("| config | kept | n | accuracy [95% CI] | vs chunkkv default (paired) |")
    print("|---|---:|---:|---|---|")
    for r in rows:
        ci = f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r["ci"] else ""
        diff = (f"{r['diff']:+.3f} [{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}]"
                if r["diff"] is not None else "-")
        print(f"| {r['label']} | {r['ratio']:g} | {r['n']} | {r['mean']:.2f} {ci} | {diff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
