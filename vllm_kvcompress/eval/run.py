"""``kvcompress eval``: long-context accuracy vs kept ratio through the real engine, and the same
prompts through NVIDIA's kvpress (``--backend kvpress``) so one table shows both.

Steps: build the samples (``tasks.py``; fixed seed, ``--samples-per-cell`` prompts per task,
length and depth, needle offsets jittered) and write ``samples.jsonl``; run the backend,
appending to ``predictions-<backend>.jsonl`` (a rerun resumes); grade every prediction; write
``results.json`` (settings, machine, per-configuration accuracy with bootstrap 95% intervals,
ours-vs-kvpress paired intervals, targets), ``results.csv`` (one row per prediction),
``accuracy_vs_ratio.png`` (one line per policy, selection mode and backend, with the intervals
as error bars) and ``heatmap_<backend>.png`` (needle accuracy, depth x length, one panel per
configuration). Every backend found in the output folder is graded and plotted together.

A configuration is (policy, kept ratio, head selection, variant): ``--head-select shared
per_head`` runs every (policy, ratio) in both modes (``default``: each policy in its own default
mode, listed once); ``--chunk-grid-ablation`` adds ChunkKV with
its chunk grid from token 0 (``grid0``: sinks kept; ``sink0``: no sinks) as extra configurations
of the same run, so the ablation shares the prompts and the baseline prefills. Multi-turn samples
(``niah_multiturn``, ``--multiturn-lengths``) get a second turn per configuration, graded and
reported next to their first (``turn2``). kvpress has one mode per press (``KVPRESS_MODES``: per
head for its ScorerPress presses, shared for ChunkKVPress), recorded as its rows'
``head_select``.

Memory: every row records ``held_tokens`` (prompt tokens held per layer: for our engine the
largest layer budget, for kvpress the mean over layers), summarised as ``held_ratio``. For
PyramidKV the kvpress backend also runs its press at our held ratio of each nominal ratio, so
the two can be compared at the same memory (``comparison`` rows with ``match == "held"``).
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
from .engine_backend import (
    DEFAULT_HEAD_SELECT,
    HEAD_SELECT,
    RunConfig,
    config_key,
    config_label,
    head_select_supported,
    held_tokens,
    make_spec,
    num_layers,
)
from .kvpress_runner import KVPRESS_MODES, MERGE_SUFFIX, MERGEABLE
from .stats import RESAMPLES, bootstrap_ci, paired_bootstrap_ci
from .tasks import TASKS, TASKS_VERSION, EvalSample, build_samples, score_answer

POLICIES = ("streamingllm", "snapkv", "chunkkv", "pyramidkv")
RATIOS = (1.0, 0.5, 0.25, 0.1, 0.05)
BACKENDS = ("vllm", "kvpress")
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")
POLICY_PARAMS = ("window", "pool_kernel", "chunk_size", "sink_tokens")
#: Held-ratio matching: a kvpress PyramidKV run pairs with ours when their held ratios differ by
#: at most this much.
HELD_MATCH_TOLERANCE = 0.02
#: ChunkKV's chunk grids (the policy layer's ``chunk_grid``).
CHUNK_GRIDS = ("after_sinks", "from_zero")
#: ``--head-select default``: each policy in its registered default mode.
DEFAULT_MODE = "default"


def qfilters_file(model: str) -> Path:
    """Where `make models` writes a model's Q-Filters: next to its folder, not inside (vLLM
    loads every ``*.safetensors`` in the folder as weights)."""
    folder = Path(model)
    return folder.with_name(folder.name + ".qfilters.safetensors")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/smollm2", help="model folder")
    parser.add_argument("--out", default="runs/eval", help="output folder (shared by backends)")
    parser.add_argument("--backend", choices=BACKENDS, default="vllm",
                        help="vllm: this plugin in the real engine; kvpress: NVIDIA kvpress on "
                        "HF transformers, run with --kvpress-python")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192],
                        help="size classes in tokens (prompt + answer)")
    parser.add_argument("--multiturn-lengths", nargs="+", type=int, default=None,
                        help="size classes of niah_multiturn (default: --lengths); its turn 2 "
                        "costs kvpress one prefill per distinct turn-1 answer")
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples-per-cell", "--per-cell", dest="samples_per_cell", type=int,
                        default=4, help="prompts per (task, length, depth) cell, each with its "
                        "own needles, values and jitter (default 4)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS),
                        help="kept ratios; 1.0 is the full-KV baseline (policy none)")
    parser.add_argument("--head-select", nargs="+", default=[DEFAULT_HEAD_SELECT],
                        choices=(*HEAD_SELECT, DEFAULT_MODE), help="vllm backend: token "
                        "selection modes, each (policy, ratio) runs in every one listed: shared "
                        "(one token set per layer), per_head (each KV head its own) or default "
                        "(the policy's own default mode); kvpress: ignored (one mode per press, "
                        "recorded)")
    parser.add_argument("--chunk-grid-ablation", action="store_true",
                        help="vllm backend: also run chunkkv (shared) at every ratio with its "
                        "chunk grid from token 0, sinks kept (variant grid0, kv_chunk_grid="
                        "from_zero) and without sinks (variant sink0, kv_sink_tokens=0), in the "
                        "same engine on the same prompts")
    parser.add_argument("--merge", action="store_true",
                        help="also run every policy (its default mode) with kv_merge=on "
                        "(variant merge); kvpress: MergingPress around the policy's press "
                        "where it is a ScorerPress")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many samples per task, spread over the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=RESAMPLES,
                        help="bootstrap resamples of the 95%% intervals (fixed seed)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--pool-kernel", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=10)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--future-positions", type=int, default=512,
                        help="expected_attention: future positions its RoPE average covers")
    parser.add_argument("--qfilters", default=None,
                        help="qfilters: the model's filter file (default: MODEL.qfilters."
                        "safetensors next to the model folder, written by `make models`)")
    parser.add_argument("--chunk-grid", choices=CHUNK_GRIDS, default=None,
                        help="ChunkKV's chunk grid (kv_chunk_grid): after_sinks or from_zero "
                        "(kvpress's); default: the policy's own. vllm backend only")
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
    if "qfilters" in args.policies:
        path = Path(args.qfilters or qfilters_file(args.model))
        if not path.is_file():
            raise ValueError(f"--qfilters: {path} does not exist; run kvcompress calibrate "
                             f"{args.model} --out {path}")
        args.qfilters = str(path)
    if getattr(args, "future_positions", 1) < 1:
        raise ValueError(f"--future-positions: {args.future_positions} is below 1")
    for ratio in args.ratios:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"--ratios: {ratio} is not in (0, 1]")
    for option, lengths in (("--lengths", args.lengths),
                            ("--multiturn-lengths", args.multiturn_lengths or [])):
        for length in lengths:
            if length < 256:
                raise ValueError(f"{option}: {length} is below 256 tokens")
    if args.chunk_grid_ablation and "chunkkv" not in args.policies:
        raise ValueError("--chunk-grid-ablation needs chunkkv in --policies")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.samples_per_cell < 1:
        raise ValueError("--samples-per-cell must be >= 1")
    if args.bootstrap < 1:
        raise ValueError("--bootstrap must be >= 1")
    if args.chunk_grid is not None and args.backend == "kvpress":
        raise ValueError("--chunk-grid: kvpress's ChunkKV grid is fixed (from token 0); "
                         "the option is for the vllm backend")
    if len(set(args.head_select)) != len(args.head_select):
        raise ValueError(f"--head-select: {args.head_select} lists a mode twice")
    if (args.backend == "vllm" and not args.report_only
            and set(args.head_select) - {DEFAULT_HEAD_SELECT, DEFAULT_MODE}
            and not head_select_supported()):
        raise ValueError("--head-select per_head: this build's policy layer has no head_select "
                         "setting (kv_head_select) yet; run --head-select shared")


def limit_samples(samples: list[EvalSample], limit: int | None) -> list[EvalSample]:
    """At most ``limit`` samples per task, spread over the (length, depth) grid: the first
    ``limit`` in the order sample index, depth, length, so every depth and length gets its
    share (a needle task with ``--depths`` D and ``--samples-per-cell`` N >= ``--limit`` gives
    ``limit / D`` prompts per depth, the other tasks ``limit`` prompts: the same n per task)."""
    if limit is None:
        return samples
    chosen: list[EvalSample] = []
    for task in TASKS:
        mine = [s for s in samples if s.task == task]
        lengths = sorted({s.length for s in mine})
        depths = sorted({s.depth for s in mine})
        # build_samples numbers a cell's samples 0, 1, ...: the id's last field.
        order = sorted(range(len(mine)), key=lambda i: (int(mine[i].id.rsplit("-", 1)[1]),
                                                        depths.index(mine[i].depth),
                                                        lengths.index(mine[i].length)))
        chosen += [mine[i] for i in sorted(order[:limit])]
    return chosen


def configurations(policies: list[str], ratios: list[float],
                   head_selects: list[str] | None = None,
                   chunk_grid_ablation: bool = False, merge: bool = False) -> list[RunConfig]:
    """Configurations to run: the single ``none`` (ratio 1.0 keeps everything), then every
    (policy, ratio < 1, head selection), then the chunk-grid variants of shared ChunkKV, then
    (``merge``) every policy in its default mode with evicted tokens merged."""
    from ..policies.registry import get_policy_info

    modes = head_selects or [DEFAULT_HEAD_SELECT]
    configs = [config_key("none", 1.0)]
    for policy in policies:
        own = get_policy_info(policy).default_head_select
        resolved = list(dict.fromkeys(own if m == DEFAULT_MODE else m for m in modes))
        configs += [config_key(policy, r, h) for r in ratios if r < 1.0 for h in resolved]
    if chunk_grid_ablation:
        configs += [config_key("chunkkv", r, DEFAULT_HEAD_SELECT, v) for v in ("grid0", "sink0")
                    for r in ratios if r < 1.0]
    if merge:
        configs += [config_key(p, r, get_policy_info(p).default_head_select, "merge")
                    for p in policies for r in ratios if r < 1.0]
    return configs


def kvpress_policy(config: RunConfig) -> str | None:
    """The kvpress runner's name for a configuration, or ``None`` when kvpress has no press
    for it (SAGE-KV; merging around a press that is not a ScorerPress; other variants)."""
    if config.variant == "merge":
        return config.policy + MERGE_SUFFIX if config.policy in MERGEABLE else None
    if config.variant or config.policy not in KVPRESS_MODES:
        return None
    return config.policy


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the samples, runs the backend, grades; ``args`` already passed ``validate``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"window": args.window, "pool_kernel": args.pool_kernel,
              "chunk_size": args.chunk_size, "sink_tokens": args.sink_tokens}
    if getattr(args, "chunk_grid", None) is not None:
        params["chunk_grid"] = args.chunk_grid
    if "expected_attention" in args.policies:
        params["future_positions"] = args.future_positions
    if "qfilters" in args.policies:
        params["qfilters_path"] = args.qfilters
    if not args.report_only:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        samples = build_samples(tokenizer, args.tasks, args.lengths, args.depths,
                                args.samples_per_cell, args.seed, args.multiturn_lengths)
        samples = limit_samples(samples, args.limit)
        samples_path = out / "samples.jsonl"
        samples_path.write_text("".join(json.dumps(s.to_json()) + "\n" for s in samples))
        vllm = args.backend == "vllm"
        configs = configurations(args.policies, args.ratios,
                                 args.head_select if vllm else [DEFAULT_HEAD_SELECT],
                                 args.chunk_grid_ablation and vllm,
                                 getattr(args, "merge", False))
        predictions = out / f"predictions-{args.backend}.jsonl"
        settings = {"model": args.model, "tasks": args.tasks, "lengths": args.lengths,
                    "multiturn_lengths": args.multiturn_lengths, "depths": args.depths,
                    "samples_per_cell": args.samples_per_cell,
                    "limit": args.limit, "seed": args.seed, "dtype": args.dtype,
                    "params": params,
                    "head_select": sorted({c.head_select for c in configs}),
                    "tasks_version": TASKS_VERSION, "configs": configs,
                    "samples": len(samples), "prefix_reuse": not args.no_prefix_reuse,
                    "bootstrap": args.bootstrap,
                    "command": "kvcompress " + " ".join(sys.argv[1:]),
                    "machine": machine()}
        _check_same_prompts(out, args.backend, settings)
        settings_path = out / f"settings-{args.backend}.json"
        if predictions.exists() and (args.fresh or _changed(settings_path, settings)):
            # Resuming is only sound for the same prompts, model and policy parameters.
            print(f"kvcompress eval: starting {predictions} afresh "
                  f"({'--fresh' if args.fresh else 'settings changed'})", file=sys.stderr)
            predictions.unlink()
        elif predictions.exists():
            # Resumed: the rows already there came from earlier runs; say which and when.
            previous = json.loads(settings_path.read_text())
            settings["resumed_from"] = [*previous.get("resumed_from", []), {
                "command": previous.get("command"),
                "date": previous.get("machine", {}).get("date")}]
        if args.backend == "vllm":
            from . import engine_backend

            settings_path.write_text(json.dumps(settings, indent=2))
            engine_backend.run(samples, configs, params, args.model, predictions,
                               dtype=args.dtype, prefix_reuse=not args.no_prefix_reuse)
        else:
            missing = sorted({config_label(c.policy, None, c.variant) for c in configs
                              if kvpress_policy(c) is None})
            if missing:
                print(f"kvcompress eval: kvpress has no press for {', '.join(missing)} (ours "
                      "only)", file=sys.stderr)
            kvpress_configs = [c for c in configs if kvpress_policy(c) is not None]
            kvpress_configs += held_matched(samples, args.policies, args.ratios, params,
                                            args.model)
            settings["configs"] = kvpress_configs
            settings_path.write_text(json.dumps(settings, indent=2))
            run_kvpress(args, samples_path, kvpress_configs, params, predictions)
    return report(out, resamples=getattr(args, "bootstrap", RESAMPLES))


#: Settings that decide the prompts (samples.jsonl): backends sharing a folder must agree.
PROMPT_KEYS = ("model", "tasks", "lengths", "multiturn_lengths", "depths", "samples_per_cell",
               "limit", "seed", "tasks_version")


def _check_same_prompts(out: Path, backend: str, settings: dict[str, Any]) -> None:
    """Refuses to rewrite ``samples.jsonl`` under another backend's predictions made on other
    prompts (ids alone would pair them silently).

    Raises:
        ValueError: names the folder, the other backend and the settings that differ.
    """
    for other in BACKENDS:
        path = out / f"settings-{other}.json"
        if other == backend or not path.exists() or not (
                out / f"predictions-{other}.jsonl").exists():
            continue
        previous = json.loads(path.read_text())
        differ = [k for k in PROMPT_KEYS if previous.get(k) != settings[k]]
        if differ:
            raise ValueError(f"--out {out}: holds {other} predictions on other prompts "
                             f"({', '.join(differ)} differ); use the same prompt options or "
                             "another --out")


def _changed(path: Path, settings: dict[str, Any]) -> bool:
    """Whether a previous run in the same folder used other prompts or parameters."""
    if not path.exists():
        return True
    previous = json.loads(path.read_text())
    keys = ("model", "tasks", "lengths", "multiturn_lengths", "depths", "samples_per_cell",
            "limit", "seed", "dtype", "params", "prefix_reuse", "tasks_version")
    return any(previous.get(k) != settings[k] for k in keys)


def held_matched(samples: list[EvalSample], policies: list[str], ratios: list[float],
                 params: dict[str, Any], model: str) -> list[RunConfig]:
    """kvpress PyramidKV configurations at our PyramidKV's held ratio of each nominal ratio.

    Our engine keeps the largest layer budget in every layer, so at a nominal ratio it holds
    more than kvpress's PyramidKV (whose layers average the nominal budget). Running kvpress's
    press at our held ratio (mean over the prompts, 3 decimals) compares the two at the same
    memory. Nothing for ratios whose held ratio is the nominal one, or without ``pyramidkv``.
    """
    if "pyramidkv" not in policies or not samples:
        return []
    layers = num_layers(model)
    extra = []
    for ratio in ratios:
        if ratio >= 1.0:
            continue
        spec = make_spec(config_key("pyramidkv", ratio), params)
        held = mean(held_tokens(spec, len(s.input_ids), layers) / len(s.input_ids)
                    for s in samples)
        held = round(held, 3)
        if abs(held - ratio) > 0.005 and held < 1.0:
            config = config_key("pyramidkv", held)
            if config not in extra:
                extra.append(config)
    return extra


def run_kvpress(args: argparse.Namespace, samples_path: Path, configs: list[RunConfig],
                params: dict[str, Any], predictions: Path) -> None:
    """Runs ``kvpress_runner.py`` with the kvpress venv's interpreter (its own transformers)."""
    python = Path(args.kvpress_python)
    if not python.exists():
        raise FileNotFoundError(f"--kvpress-python: {python} does not exist; run "
                                "`make kvpress-venv` first")
    config_path = samples_path.parent / "configs-kvpress.json"
    unique = list(dict.fromkeys((kvpress_policy(c) or c.policy, c.ratio) for c in configs))
    config_path.write_text(json.dumps({"configs": [{"policy": p, "ratio": r} for p, r in unique],
                                       "params": params}))
    runner = Path(__file__).with_name("kvpress_runner.py")
    command = [str(python), str(runner), "--model", args.model, "--samples", str(samples_path),
               "--configs", str(config_path), "--out", str(predictions), "--dtype", args.dtype]
    subprocess.run(command, check=True)


def _held(pred: dict[str, Any]) -> float:
    """Prompt tokens held per layer: ours writes it; kvpress's per-layer counts are averaged."""
    if pred.get("held_tokens") is not None:
        return float(pred["held_tokens"])
    per_layer = pred.get("kept_tokens_per_layer")
    if per_layer:
        return sum(per_layer) / len(per_layer)
    return float(pred.get("kept_tokens") or pred["prompt_tokens"])


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
            try:
                pred = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            sample = samples.get(pred["id"])
            if sample is None:  # from an earlier run with other settings
                continue
            turn = int(pred.get("turn", 1))
            graded = sample if turn == 1 else sample.get("followup")
            if graded is None:
                continue
            policy, variant = pred["policy"], pred.get("variant", "")
            if backend == "kvpress":
                if policy.endswith(MERGE_SUFFIX):  # kvpress's MergingPress: our merge variant
                    policy, variant = policy.removesuffix(MERGE_SUFFIX), "merge"
                mode = pred.get("kvpress_mode") or KVPRESS_MODES.get(policy, "")
            else:
                mode = pred.get("head_select", DEFAULT_HEAD_SELECT)
            config = config_key(policy, pred["ratio"], mode, variant)
            offsets = sample.get("needle_offsets") or []
            offset = offsets[0 if turn == 1 else 1] if len(offsets) >= turn else None
            held = _held(pred)
            rows.append({"backend": backend, "id": pred["id"], "turn": turn,
                         "task": sample["task"], "length": sample["length"],
                         "depth": sample["depth"], "needle_offset": offset,
                         "policy": config.policy, "ratio": config.ratio,
                         "head_select": config.head_select, "variant": config.variant,
                         "label": config_label(config.policy, config.head_select,
                                               config.variant),
                         "prompt_tokens": pred["prompt_tokens"],
                         "kept_tokens": pred.get("kept_tokens"), "held_tokens": held,
                         "held_ratio": held / pred["prompt_tokens"],
                         "score": score_answer(pred["text"], graded["answers"], graded["match"]),
                         "answers": "|".join(graded["answers"]), "text": pred["text"]})
    return samples, rows


Key = tuple[str, str, float, str, str]  # backend, policy, ratio, head_select, variant


def _key(row: dict[str, Any]) -> Key:
    return (row["backend"], row["policy"], row["ratio"], row["head_select"],
            row.get("variant", ""))


def _common(by_config: dict[Key, list[dict[str, Any]]]) -> set[str]:
    """Sample ids every configuration of every backend answered (so a partial run, or a backend
    run on fewer prompts, never compares different prompt sets)."""
    common: set[str] | None = None
    for mine in by_config.values():
        ids = {r["id"] for r in mine}
        common = ids if common is None else common & ids
    return common or set()


def _group(rows: list[dict[str, Any]], turn: int) -> dict[Key, list[dict[str, Any]]]:
    by_config: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["turn"] == turn:
            by_config[_key(row)].append(row)
    return by_config


def _mean_ci(scores: list[float], resamples: int) -> tuple[float | None, list[float] | None]:
    if not scores:
        return None, None
    ci = bootstrap_ci(scores, resamples=resamples)
    return mean(scores), None if ci is None else [ci[0], ci[1]]


def summarize(rows: list[dict[str, Any]], resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """Mean accuracy and its bootstrap 95% interval per (backend, policy, ratio, head select):
    overall, per task, needles at 4k, and the multi-turn sample's turn 2.

    Turn-1 numbers count each prompt once (``niah_multiturn``'s column is its turn 1); ``turn2``
    is the same prompts' second turn. The ``none`` baseline (ratio 1.0) is also each policy's
    ratio-1.0 point: at ratio 1.0 no policy evicts anything (tested in the engine).
    """
    first, second = _group(rows, 1), _group(rows, 2)
    common, common2 = _common(first), _common(second)
    summary = []
    for key, mine in sorted(first.items()):
        backend, policy, ratio, head_select, variant = key
        mine = [r for r in mine if r["id"] in common]
        if not mine:
            continue
        entry: dict[str, Any] = {"backend": backend, "policy": policy, "ratio": ratio,
                                 "head_select": head_select, "variant": variant,
                                 "label": config_label(policy, head_select, variant),
                                 "samples": len(mine),
                                 "held_ratio": mean(r["held_ratio"] for r in mine)}
        entry["accuracy"], entry["accuracy_ci"] = _mean_ci([r["score"] for r in mine],
                                                           resamples)
        for task in TASKS:
            entry[task], entry[f"{task}_ci"] = _mean_ci(
                [r["score"] for r in mine if r["task"] == task], resamples)
        entry["needle_4k"], entry["needle_4k_ci"] = _mean_ci(
            [r["score"] for r in mine if r["task"] in NEEDLE_TASKS and r["length"] == 4096],
            resamples)
        turn2 = [r["score"] for r in second.get(key, []) if r["id"] in common2]
        entry["turn2"], entry["turn2_ci"] = _mean_ci(turn2, resamples)
        entry["turn2_samples"] = len(turn2)
        summary.append(entry)
    return summary


def compare(rows: list[dict[str, Any]], summary: list[dict[str, Any]],
            resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """Ours minus kvpress, paired per prompt, with a paired bootstrap 95% interval.

    Every (policy, ratio, head selection) of ours pairs with kvpress's (policy, ratio)
    (``match == "nominal"``); our PyramidKV also pairs with kvpress's PyramidKV run at our held
    ratio (``match == "held"``, see ``held_matched``). ``ge`` says whether "ours >= kvpress"
    holds: the interval's upper bound is 0 or above. Only turn-1 prompts both answered count.
    """
    first = _group(rows, 1)
    scores = {key: {r["id"]: r["score"] for r in mine} for key, mine in first.items()}
    table = {_key(s): s for s in summary}
    # Variants with a kvpress peer: none (the policy) and merge (MergingPress); the chunk-grid
    # variants are ours only (see the ablation).
    ours = [k for k in table if k[0] == "vllm" and k[4] in ("", "merge")]
    peers = [k for k in table if k[0] == "kvpress"]
    result = []
    for key in sorted(ours):
        _, policy, ratio, head_select, variant = key
        pairs = [(peer, "nominal") for peer in peers
                 if peer[1:3] == (policy, ratio) and peer[4] == variant]
        if policy == "pyramidkv":
            held = table[key]["held_ratio"]
            candidates = [p for p in peers if p[1] == policy and p[2] != ratio
                          and p[4] == variant
                          and abs(table[p]["held_ratio"] - held) <= HELD_MATCH_TOLERANCE]
            if candidates:
                best = min(candidates, key=lambda p: abs(table[p]["held_ratio"] - held))
                pairs.append((best, "held"))
        for peer, match in pairs:
            ids = sorted(scores[key].keys() & scores[peer].keys())
            if not ids:
                continue
            a = [scores[key][i] for i in ids]
            b = [scores[peer][i] for i in ids]
            ci = paired_bootstrap_ci(a, b, resamples=resamples)
            result.append({
                "policy": policy, "ratio": ratio, "head_select": head_select,
                "variant": variant, "label": config_label(policy, head_select, variant),
                "match": match,
                "kvpress_ratio": peer[2], "kvpress_mode": peer[3], "samples": len(ids),
                "ours": mean(a), "kvpress": mean(b), "diff": mean(a) - mean(b),
                "diff_ci": None if ci is None else [ci[0], ci[1]],
                "ours_held_ratio": table[key]["held_ratio"],
                "kvpress_held_ratio": table[peer]["held_ratio"],
                "ge": ci is not None and ci[1] >= 0.0})
    return result


def targets(summary: list[dict[str, Any]],
            comparison: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The issue's accuracy targets, met or not, from the summary and the comparison."""
    def find(backend: str, policy: str, ratio: float, head_select: str = DEFAULT_HEAD_SELECT,
             variant: str = "") -> dict[str, Any] | None:
        return next((s for s in summary if _key(s) ==
                     (backend, policy, ratio, head_select, variant)), None)

    result = []
    full = find("vllm", "none", 1.0)
    kinds = sorted({(s["head_select"], s.get("variant", "")) for s in summary
                    if s["backend"] == "vllm" and s["policy"] == "chunkkv"},
                   key=lambda k: (k[1] != "", k[0] != DEFAULT_HEAD_SELECT, k))
    for mode, variant in kinds:
        # The policy-layer issue's goals: >= 90% of full KV at 0.25 kept, >= 75% at 0.1.
        for ratio, goal in ((0.25, 0.90), (0.1, 0.75)):
            mine = find("vllm", "chunkkv", ratio, mode, variant)
            if full and mine and full["needle_4k"] is not None and mine["needle_4k"] is not None:
                value = mine["needle_4k"] / full["needle_4k"] if full["needle_4k"] else None
                result.append({"target": f"{config_label('chunkkv', mode, variant)} {ratio:g} "
                               f"kept: needle accuracy at 4k >= {goal:.0%} of full KV",
                               "value": value, "raw": [mine["needle_4k"], full["needle_4k"]],
                               "raw_ci": [mine["needle_4k_ci"], full["needle_4k_ci"]],
                               "met": value is not None and value >= goal})
            if full and mine and full.get("turn2") and mine.get("turn2") is not None:
                value = mine["turn2"] / full["turn2"]
                result.append({"target": f"{config_label('chunkkv', mode, variant)} {ratio:g} "
                               "kept, multi-turn: turn-2 accuracy >= 90% of full KV's turn 2",
                               "value": value, "raw": [mine["turn2"], full["turn2"]],
                               "raw_ci": [mine["turn2_ci"], full["turn2_ci"]],
                               "met": value >= 0.9})
    pairs_by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for pair in comparison or []:
        if pair["policy"] != "none":
            pairs_by[(pair["policy"], pair["head_select"])].append(pair)
    for (policy, mode), pairs in sorted(pairs_by.items()):
        # PyramidKV: at the same held memory where kvpress ran it, else at the nominal ratio.
        match = "held" if any(p["match"] == "held" for p in pairs) else "nominal"
        pairs = sorted((p for p in pairs if p["match"] == match), key=lambda p: -p["ratio"])
        misses = [p for p in pairs if not p["ge"]]
        where = " at the same held memory" if match == "held" else ""
        result.append({
            "target": f"{config_label(policy, mode)}: ours >= kvpress at every ratio{where} "
                      "(95% paired CI of ours - kvpress reaches 0)",
            "value": min(p["diff_ci"][1] for p in pairs if p["diff_ci"]) if pairs else None,
            "met": not misses,
            "detail": {f"{p['ratio']:g}": [p["ours"], p["kvpress"], p["diff"], p["diff_ci"]]
                       for p in pairs},
            "misses": [f"{p['ratio']:g}" for p in misses]})
    return result


def report(out: Path, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Grades the predictions in ``out`` and writes results.json/csv and the plots."""
    _, rows = _load(out)
    if not rows:
        raise RuntimeError(f"no predictions in {out}; run `kvcompress eval` first")
    summary = summarize(rows, resamples)
    comparison = compare(rows, summary, resamples)
    settings = {b: json.loads((out / f"settings-{b}.json").read_text()) for b in BACKENDS
                if (out / f"settings-{b}.json").exists()}
    result = {"settings": settings, "bootstrap": {"resamples": resamples, "level": 0.95,
                                                  "unit": "prompt", "seed": 0},
              "summary": summary, "comparison": comparison,
              "targets": targets(summary, comparison)}
    write_json_csv(out, "results", result, rows)
    from .plots import plot_accuracy_vs_ratio, plot_heatmaps

    plot_accuracy_vs_ratio(summary, out / "accuracy_vs_ratio.png", settings)
    for backend in sorted({r["backend"] for r in rows}):
        plot_heatmaps([r for r in rows if r["backend"] == backend and r["turn"] == 1],
                      out / f"heatmap_{backend}.png", backend)
    return result


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
    print(f"{'backend':<8}{'config':<22}{'ratio':>6}{'held':>6}{'n':>5}  {'all tasks':<19}"
          f"{'needles 4k':<19}{'multi-turn t1':<19}{'multi-turn t2':<19}")
    for s in summary:
        cells = "".join(f"{format_ci(s[c], s[f'{c}_ci']):<19}"
                        for c in ("accuracy", "needle_4k", "niah_multiturn", "turn2"))
        print(f"{s['backend']:<8}{s['label']:<22}{s['ratio']:>6.3g}{s['held_ratio']:>6.2f}"
              f"{s['samples']:>5}  {cells}")
    tasks = [t for t in TASKS if any(s[t] is not None for s in summary)]
    print("\nper task (mean)")
    # Full names: niah_multikey and niah_multikey_uuid must not both read "niah_multike".
    width = max([12, *(len(t) for t in tasks)]) + 1
    print(f"{'backend':<8}{'config':<22}{'ratio':>6}" + "".join(f"{t:>{width}}" for t in tasks))
    for s in summary:
        cells = "".join(f"{'-' if s[t] is None else format(s[t], '.3f'):>{width}}"
                        for t in tasks)
        print(f"{s['backend']:<8}{s['label']:<22}{s['ratio']:>6.3g}{cells}")
    if result.get("comparison"):
        print("\nours - kvpress, paired over prompts [95% CI]")
        for c in result["comparison"]:
            print(f"  {c['label']:<20} {c['ratio']:<5g} vs kvpress {c['kvpress_ratio']:<6g}"
                  f"({c['kvpress_mode']}, {c['match']}): "
                  f"{format_ci(c['diff'], c['diff_ci'], 3)} -> "
                  f"{'>= holds' if c['ge'] else 'MISSES'}")
    for t in result["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        misses = f" (misses at {', '.join(t['misses'])})" if t.get("misses") else ""
        print(f"target: {t['target']}: {value} -> {'met' if t['met'] else 'NOT met'}{misses}")
