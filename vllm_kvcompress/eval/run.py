"""``kvcompress eval``: long-context accuracy vs kept ratio through the real engine, and the same
prompts through NVIDIA's kvpress (``--backend kvpress``) so one table shows both.

Steps: build the prompts (``tasks``; fixed seed, ``--samples-per-cell`` prompts per task,
length and depth, needle offsets jittered, ``--limit`` per task) and add the new ones to the
results store in ``--out`` (``store``); run the backend on whatever the store lacks, in every
``--setting``, appending one row per request; grade what the store counts and write the report
(``report``: results.json, results.csv, plots). Every backend found in the store is graded and
plotted together.

Parts: ``options`` (command line, checks), ``configs`` (what a configuration is and holds),
``engine_backend`` / ``kvpress_backend`` + ``kvpress_peer`` (the two backends), ``store``,
``grading`` / ``summary`` / ``report`` / ``plots`` (the numbers and pictures).

The engine backend runs the settings in ``engine_backend.SETTINGS``; a setting it cannot run
yet is recorded as not run (``settings_not_run`` in ``settings-vllm.json``) and reported so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..bench.artifacts import machine
from . import engine_backend, kvpress_backend
from .configs import DEFAULT_HEAD_SELECT, RunConfig, configurations
from .options import add_arguments, check_prefill_chunk, run_params, validate
from .report import print_report, report
from .stats import RESAMPLES
from .store import Store, config_hash, context_of
from .tasks import TASKS_VERSION, EvalSample, build_samples, limit_samples

__all__ = ["add_arguments", "print_report", "report", "run", "validate"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the prompts, runs the backend on what the store lacks, reports; ``args`` already
    passed ``validate``."""
    out = Path(args.out)
    if getattr(args, "merge_from", None):
        for folder in args.merge_from:
            counts = Store(out).merge_from(Store(Path(folder)))
            for backend, count in counts.items():
                print(f"kvcompress eval: merged {folder} into {out}, {backend}: {count.added} "
                      f"rows added, {count.already_here} already here, {count.other_context} "
                      f"made under another context, {count.other_prompt} on another prompt "
                      "(not added)", file=sys.stderr)
    elif not args.report_only:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        samples = build_samples(tokenizer, args.tasks, args.lengths, args.depths,
                                args.samples_per_cell, args.seed, args.multiturn_lengths)
        samples = limit_samples(samples, args.limit)
        store = Store(out)
        if args.fresh:
            store.forget(args.backend)
        store.add_samples(samples)
        params = run_params(args)
        if args.backend == "vllm":
            _run_engine(args, store, samples, params)
        else:
            _run_kvpress(args, store, samples, params)
    return report(out, resamples=getattr(args, "bootstrap", RESAMPLES))


def _settings(args: argparse.Namespace, store: Store, params: dict[str, Any],
              samples: list[EvalSample], configs: list[RunConfig]) -> dict[str, Any]:
    """The run's ``settings-<backend>.json``: its options, its context (the previous context's
    parameters updated with this run's, so a run without Q-Filters keeps its file in the
    context) and the earlier runs whose rows the store holds."""
    previous = store.settings(args.backend)
    context = {**context_of(args.backend, None), "model": args.model, "dtype": args.dtype,
               "tasks_version": TASKS_VERSION,
               "prefix_reuse": not args.no_prefix_reuse if args.backend == "vllm" else None,
               "params": {**context_of(args.backend, previous)["params"], **params}}
    settings = {"model": args.model, "tasks": args.tasks, "lengths": args.lengths,
                "multiturn_lengths": args.multiturn_lengths, "depths": args.depths,
                "samples_per_cell": args.samples_per_cell, "limit": args.limit,
                "seed": args.seed, "dtype": args.dtype, "params": params,
                "settings": args.setting,
                "head_select": sorted({c.head_select for c in configs}),
                "tasks_version": TASKS_VERSION, "configs": configs, "samples": len(samples),
                "prefix_reuse": not args.no_prefix_reuse, "bootstrap": args.bootstrap,
                "max_num_batched_tokens": getattr(args, "max_num_batched_tokens", None),
                "prefill_chunk": _prefill_chunk(args, previous, configs),
                "command": "kvcompress " + " ".join(sys.argv[1:]), "machine": machine(),
                "context": context}
    if previous is not None and store.predictions(args.backend).exists():
        settings["resumed_from"] = [*previous.get("resumed_from", []), {
            "command": previous.get("command"),
            "date": previous.get("machine", {}).get("date")}]
    return settings


def _prefill_chunk(args: argparse.Namespace, previous: dict[str, Any] | None,
                   configs: list[RunConfig]) -> int | None:
    """The chunk the store's ``prefill`` rows are cut at (``--max-num-batched-tokens`` of the
    runs that made them), carried from run to run.

    ``validate`` refuses a run adding prefill rows at another chunk before any prompt is built
    (``options.check_prefill_chunk``); this checks again against the settings it replaces.

    Raises:
        ValueError: this run has the prefill variant at another chunk than the store's rows.
    """
    before = (previous or {}).get("prefill_chunk")
    if not any(c.variant == "prefill" for c in configs):
        return before
    chunk = getattr(args, "max_num_batched_tokens", None)
    check_prefill_chunk(chunk, before, args.out)
    return chunk


def _run_engine(args: argparse.Namespace, store: Store, samples: list[EvalSample],
                params: dict[str, Any]) -> None:
    """Our engine, once per setting it can run; the others recorded as not run."""
    configs = configurations(args.policies, args.ratios, args.head_select,
                             args.chunk_grid_ablation, getattr(args, "merge", False),
                             getattr(args, "prefill_variant", False))
    settings = _settings(args, store, params, samples, configs)
    skipped = {s: "the engine backend has no query-agnostic path yet (engine_backend.SETTINGS)"
               for s in args.setting if s not in engine_backend.SETTINGS}
    if skipped:
        settings["settings_not_run"] = skipped
        print(f"kvcompress eval: not run in the engine: {', '.join(skipped)} (no such path in "
              "engine_backend yet); reported as not run", file=sys.stderr)
    store.write_settings("vllm", settings)
    context = settings["context"]
    index = store.index("vllm")
    for setting in (s for s in args.setting if s not in skipped):
        keys = {c: config_hash(context, setting, c) for c in configs}
        done = {(s.id, c, turn): index[(s.id, s.prompt_key, keys[c], turn)]
                for s in samples for c in configs for turn in (1, 2)
                if (s.id, s.prompt_key, keys[c], turn) in index}

        def row_fields(sample: EvalSample, config: RunConfig, turn: int,
                       keys: dict[RunConfig, str] = keys) -> dict[str, Any]:
            return {"prompt_key": sample.prompt_key, "config_key": keys[config]}

        engine_backend.run(samples, configs, params, args.model, store.predictions("vllm"),
                           dtype=args.dtype, prefix_reuse=not args.no_prefix_reuse,
                           setting=setting, done=done, row_fields=row_fields,
                           max_num_batched_tokens=args.max_num_batched_tokens)


def _run_kvpress(args: argparse.Namespace, store: Store, samples: list[EvalSample],
                 params: dict[str, Any]) -> None:
    """kvpress in its venv, once per setting, on the configurations it has a press for (and
    PyramidKV at our held memory)."""
    configs = configurations(args.policies, args.ratios, [DEFAULT_HEAD_SELECT], False,
                             getattr(args, "merge", False))
    missing = sorted({c.policy + (f"({c.variant})" if c.variant else "") for c in configs
                      if kvpress_backend.kvpress_policy(c) is None})
    if missing:
        print(f"kvcompress eval: kvpress has no press for {', '.join(missing)} (ours only)",
              file=sys.stderr)
    configs = [c for c in configs if kvpress_backend.kvpress_policy(c) is not None]
    known = {float(r["ratio"]) for r in store.keyed_rows("kvpress") if r["policy"] == "pyramidkv"}
    configs += kvpress_backend.held_matched(samples, args.policies, args.ratios, params,
                                            args.model, known)
    settings = _settings(args, store, params, samples, configs)
    store.write_settings("kvpress", settings)
    for setting in args.setting:
        kvpress_backend.run(samples, configs, params, args.model, store, settings["context"],
                            setting, args.kvpress_python, args.dtype)
