"""``kvcompress eval``: long-context accuracy vs kept ratio through the real engine, and the same
prompts through NVIDIA's kvpress (``--backend kvpress``) so one table shows both.

Steps: build the samples (``tasks.py``; fixed seed) and write ``samples.jsonl``; run the backend,
appending to ``predictions-<backend>.jsonl`` (a rerun resumes); grade every prediction; write
``results.json`` (settings, machine, per-configuration accuracy, targets), ``results.csv`` (one
row per prediction), ``accuracy_vs_ratio.png`` (one line per policy and backend) and
``heatmap_<backend>.png`` (needle accuracy, depth x length, one panel per policy and ratio).
Every backend found in the output folder is graded and plotted together.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from ..bench.artifacts import machine, write_json_csv
from .tasks import TASKS, EvalSample, build_samples, score_answer

POLICIES = ("streamingllm", "snapkv", "chunkkv", "pyramidkv")
RATIOS = (1.0, 0.5, 0.25, 0.1, 0.05)
BACKENDS = ("vllm", "kvpress")
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")
POLICY_PARAMS = ("window", "pool_kernel", "chunk_size", "sink_tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/smollm2", help="model folder")
    parser.add_argument("--out", default="runs/eval", help="output folder (shared by backends)")
    parser.add_argument("--backend", choices=BACKENDS, default="vllm",
                        help="vllm: this plugin in the real engine; kvpress: NVIDIA kvpress on "
                        "HF transformers, run with --kvpress-python")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192],
                        help="size classes in tokens (prompt + answer)")
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--per-cell", type=int, default=1,
                        help="samples per (task, length, depth) cell")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS),
                        help="kept ratios; 1.0 is the full-KV baseline (policy none)")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many samples per task, spread over the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--pool-kernel", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=10)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--no-prefix-reuse", action="store_true",
                        help="vllm backend: prefill every request from scratch")
    parser.add_argument("--kvpress-python", default=".kvpress-venv/bin/python",
                        help="the interpreter of `make kvpress-venv`")
    parser.add_argument("--fresh", action="store_true",
                        help="discard this backend's earlier predictions instead of resuming")
    parser.add_argument("--report-only", action="store_true",
                        help="grade and plot what the output folder holds; run nothing")


def validate(args: argparse.Namespace) -> None:
    """Fails early, naming the option, before minutes of prompt building."""
    from ..policies.registry import policy_names

    known = set(policy_names()) - {"none"}
    for policy in args.policies:
        if policy not in known:
            raise ValueError(f"--policies: unknown policy {policy!r}; allowed: "
                             f"{', '.join(sorted(known))}")
    for ratio in args.ratios:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"--ratios: {ratio} is not in (0, 1]")
    for length in args.lengths:
        if length < 256:
            raise ValueError(f"--lengths: {length} is below 256 tokens")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.per_cell < 1:
        raise ValueError("--per-cell must be >= 1")


def limit_samples(samples: list[EvalSample], limit: int | None) -> list[EvalSample]:
    """At most ``limit`` samples per task, evenly spaced over the (length, depth) grid."""
    if limit is None:
        return samples
    chosen: list[EvalSample] = []
    for task in TASKS:
        mine = [s for s in samples if s.task == task]
        if len(mine) <= limit:
            chosen += mine
        else:
            step = len(mine) / limit
            chosen += [mine[int(i * step)] for i in range(limit)]
    return chosen


def configurations(policies: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """(policy, ratio) pairs to run; ratio 1.0 keeps everything, so it is the single ``none``."""
    configs = [("none", 1.0)]
    configs += [(p, r) for p in policies for r in ratios if r < 1.0]
    return configs


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the samples, runs the backend, grades; ``args`` already passed ``validate``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"window": args.window, "pool_kernel": args.pool_kernel,
              "chunk_size": args.chunk_size, "sink_tokens": args.sink_tokens}
    if not args.report_only:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        samples = build_samples(tokenizer, args.tasks, args.lengths, args.depths,
                                args.per_cell, args.seed)
        samples = limit_samples(samples, args.limit)
        samples_path = out / "samples.jsonl"
        samples_path.write_text("".join(json.dumps(s.to_json()) + "\n" for s in samples))
        configs = configurations(args.policies, args.ratios)
        predictions = out / f"predictions-{args.backend}.jsonl"
        settings = {"model": args.model, "tasks": args.tasks, "lengths": args.lengths,
                    "depths": args.depths, "per_cell": args.per_cell, "limit": args.limit,
                    "seed": args.seed, "dtype": args.dtype, "params": params,
                    "configs": configs, "samples": len(samples),
                    "prefix_reuse": not args.no_prefix_reuse,
                    "command": "kvcompress " + " ".join(sys.argv[1:]),
                    "machine": machine()}
        settings_path = out / f"settings-{args.backend}.json"
        if predictions.exists() and (args.fresh or _changed(settings_path, settings)):
            # Resuming is only sound for the same prompts, model and policy parameters.
            print(f"kvcompress eval: starting {predictions} afresh "
                  f"({'--fresh' if args.fresh else 'settings changed'})", file=sys.stderr)
            predictions.unlink()
        settings_path.write_text(json.dumps(settings, indent=2))
        if args.backend == "vllm":
            from . import engine_backend

            engine_backend.run(samples, configs, params, args.model, predictions,
                               dtype=args.dtype, prefix_reuse=not args.no_prefix_reuse)
        else:
            run_kvpress(args, samples_path, configs, params, predictions)
    return report(out)


def _changed(path: Path, settings: dict[str, Any]) -> bool:
    """Whether a previous run in the same folder used other prompts or parameters."""
    if not path.exists():
        return True
    previous = json.loads(path.read_text())
    keys = ("model", "tasks", "lengths", "depths", "per_cell", "limit", "seed", "dtype",
            "params", "prefix_reuse")
    return any(previous.get(k) != settings[k] for k in keys)


def run_kvpress(args: argparse.Namespace, samples_path: Path, configs: list[tuple[str, float]],
                params: dict[str, Any], predictions: Path) -> None:
    """Runs ``kvpress_runner.py`` with the kvpress venv's interpreter (its own transformers)."""
    python = Path(args.kvpress_python)
    if not python.exists():
        raise FileNotFoundError(f"--kvpress-python: {python} does not exist; run "
                                "`make kvpress-venv` first")
    config_path = samples_path.parent / "configs-kvpress.json"
    config_path.write_text(json.dumps({"configs": [{"policy": p, "ratio": r} for p, r in configs],
                                       "params": params}))
    runner = Path(__file__).with_name("kvpress_runner.py")
    command = [str(python), str(runner), "--model", args.model, "--samples", str(samples_path),
               "--configs", str(config_path), "--out", str(predictions), "--dtype", args.dtype]
    subprocess.run(command, check=True)


def _load(out: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    samples = {}
    samples_path = out / "samples.jsonl"
    if samples_path.exists():
        for line in samples_path.read_text().splitlines():
            row = json.loads(line)
            samples[row["id"]] = row
    rows = []
    for backend in BACKENDS:
        path = out / f"predictions-{backend}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            pred = json.loads(line)
            sample = samples.get(pred["id"])
            if sample is None:  # from an earlier run with other settings
                continue
            rows.append({"backend": backend, "id": pred["id"], "task": sample["task"],
                         "length": sample["length"], "depth": sample["depth"],
                         "policy": pred["policy"], "ratio": float(pred["ratio"]),
                         "prompt_tokens": pred["prompt_tokens"],
                         "kept_tokens": pred.get("kept_tokens"),
                         "score": score_answer(pred["text"], sample["answers"], sample["match"]),
                         "answers": "|".join(sample["answers"]), "text": pred["text"]})
    return samples, rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean accuracy per (backend, policy, ratio), overall, per task and for needles at 4k.

    The ``none`` baseline (ratio 1.0) is also reported as each policy's ratio-1.0 point: at ratio
    1.0 no policy evicts anything, and the engine is token-identical to ``none`` there (tested).
    """
    by_config: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_config[(row["backend"], row["policy"], row["ratio"])].append(row)
    # Only samples that every configuration of every backend answered count, so a partial run
    # (or a backend run on fewer prompts) never compares different prompt sets.
    common: set[str] | None = None
    for mine in by_config.values():
        ids = {r["id"] for r in mine}
        common = ids if common is None else common & ids
    summary = []
    for (backend, policy, ratio), mine in sorted(by_config.items()):
        mine = [r for r in mine if r["id"] in (common or set())]
        if not mine:
            continue
        entry: dict[str, Any] = {"backend": backend, "policy": policy, "ratio": ratio,
                                 "samples": len(mine),
                                 "accuracy": mean(r["score"] for r in mine)}
        for task in TASKS:
            scores = [r["score"] for r in mine if r["task"] == task]
            entry[task] = mean(scores) if scores else None
        needles_4k = [r["score"] for r in mine if r["task"] in NEEDLE_TASKS
                      and r["length"] == 4096]
        entry["needle_4k"] = mean(needles_4k) if needles_4k else None
        summary.append(entry)
    return summary


def targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's accuracy targets, met or not, from the summary."""
    def find(backend: str, policy: str, ratio: float) -> dict[str, Any] | None:
        return next((s for s in summary if (s["backend"], s["policy"], s["ratio"]) ==
                     (backend, policy, ratio)), None)

    result = []
    full = find("vllm", "none", 1.0)
    for ratio, goal in ((0.25, 0.95), (0.1, 0.85)):
        mine = find("vllm", "chunkkv", ratio)
        if full and mine and full["needle_4k"] is not None and mine["needle_4k"] is not None:
            value = mine["needle_4k"] / full["needle_4k"] if full["needle_4k"] else None
            result.append({"target": f"ChunkKV {ratio:g} kept: needle accuracy at 4k >= "
                           f"{goal:.0%} of full KV", "value": value,
                           "raw": [mine["needle_4k"], full["needle_4k"]],
                           "met": value is not None and value >= goal})
    for policy in ("chunkkv", "snapkv"):
        pairs = [(find("vllm", policy, s["ratio"]), s) for s in summary
                 if s["backend"] == "kvpress" and s["policy"] == policy]
        pairs = [(o, k) for o, k in pairs if o is not None]
        if pairs:
            worst = min(o["accuracy"] - k["accuracy"] for o, k in pairs)
            result.append({"target": f"{policy}: ours >= kvpress at every ratio",
                           "value": worst, "met": worst >= 0.0,
                           "detail": {f"{k['ratio']:g}": [o["accuracy"], k["accuracy"]]
                                      for o, k in pairs}})
    return result


def report(out: Path) -> dict[str, Any]:
    """Grades the predictions in ``out`` and writes results.json/csv and the plots."""
    _, rows = _load(out)
    if not rows:
        raise RuntimeError(f"no predictions in {out}; run `kvcompress eval` first")
    summary = summarize(rows)
    settings = {b: json.loads((out / f"settings-{b}.json").read_text()) for b in BACKENDS
                if (out / f"settings-{b}.json").exists()}
    result = {"settings": settings, "summary": summary, "targets": targets(summary)}
    write_json_csv(out, "results", result, rows)
    from .plots import plot_accuracy_vs_ratio, plot_heatmaps

    plot_accuracy_vs_ratio(summary, out / "accuracy_vs_ratio.png", settings)
    for backend in sorted({r["backend"] for r in rows}):
        plot_heatmaps([r for r in rows if r["backend"] == backend],
                      out / f"heatmap_{backend}.png", backend)
    return result


def print_report(result: dict[str, Any]) -> None:
    summary = result["summary"]
    columns = ["accuracy", *TASKS, "needle_4k"]
    print(f"{'backend':<8}{'policy':<13}{'ratio':>6}{'n':>5}" +
          "".join(f"{c[:12]:>13}" for c in columns))
    for s in summary:
        cells = "".join(f"{'-' if s[c] is None else format(s[c], '.3f'):>13}" for c in columns)
        print(f"{s['backend']:<8}{s['policy']:<13}{s['ratio']:>6.2f}{s['samples']:>5}{cells}")
    for t in result["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"target: {t['target']}: {value} -> {'met' if t['met'] else 'NOT met'}")
