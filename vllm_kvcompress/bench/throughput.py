"""`kvcompress bench throughput`: memory-bound serving, policy `none` vs each policy and ratio.

One in-process engine (SmolLM2-135M-Instruct by default) with a KV pool that holds only a few full
prompts; all requests arrive at once; the engine is stepped until idle. Per configuration:
requests/s, output tokens/s, peak concurrently running requests, preemptions, TTFT and TPOT p50/p99,
each also as a ratio to `none` measured in the same run. Variants with short and long outputs.
Prefix caching is off so every configuration prefills for real. Writes ``throughput.json``,
``throughput.csv`` and ``throughput.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .artifacts import machine, pyplot, write_json_csv
from .overhead import essay_prompts

POLICIES = ("streamingllm", "snapkv", "chunkkv", "pyramidkv")
RATIOS = (0.5, 0.25, 0.1)


def configurations(policies: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """``none`` first, then every policy at every ratio."""
    return [("none", 1.0)] + [(p, r) for p in policies for r in ratios]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Drive:
    """What stepping an engine until idle observed (``drive``).

    Attributes:
        ids: the request ids, in submission order.
        start: ``perf_counter`` when the requests were added.
        seconds: wall time until the engine was idle.
        first: request id -> time of its first token.
        done: request id -> (finish time, output tokens).
        peak_running: most requests running after any step.
        preemptions: preemptions summed over requests.
    """

    ids: list[str]
    start: float
    seconds: float
    first: dict[str, float]
    done: dict[str, tuple[float, int]]
    peak_running: int
    preemptions: int

    def figures(self) -> dict[str, Any]:
        """The latency/throughput figures every configuration reports."""
        ttft = [self.first[i] - self.start for i in self.ids]
        tpot = [(self.done[i][0] - self.first[i]) / max(self.done[i][1] - 1, 1)
                for i in self.ids]
        out_tokens = sum(self.done[i][1] for i in self.ids)
        return {"requests": len(self.ids), "seconds": self.seconds,
                "requests_per_s": len(self.ids) / self.seconds,
                "output_tokens_per_s": out_tokens / self.seconds,
                "peak_running": self.peak_running, "preemptions": self.preemptions,
                "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
                "tpot_p50_s": percentile(tpot, 0.5), "tpot_p99_s": percentile(tpot, 0.99)}


def drive(llm: Any, prompts: list[list[int]], xargs: dict[str, Any], max_tokens: int,
          tag: str, after_step: Callable[[Any], None] | None = None) -> Drive:
    """Adds every prompt at once (greedy, ``ignore_eos``) and steps the engine until idle.

    Args:
        after_step: called with the scheduler after every step (extra observations).
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            extra_args=xargs)
    start = time.perf_counter()
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for req_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(req_id, {"prompt_token_ids": prompt}, params)
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    peak = 0
    preemptions: dict[str, int] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = (now, len(out.outputs[0].token_ids))
        peak = max(peak, len(scheduler.running))
        for req_id, request in scheduler.requests.items():
            preemptions[req_id] = request.num_preemptions
        if after_step is not None:
            after_step(scheduler)
    return Drive(ids, start, time.perf_counter() - start, first, done, peak,
                 sum(preemptions.values()))


def run_config(llm: Any, prompts: list[list[int]], policy: str, ratio: float, max_tokens: int,
               tag: str) -> dict[str, Any]:
    """All requests at once; steps until idle; returns the figures of one configuration."""
    xargs = {"kv_policy": policy} if policy == "none" else {"kv_policy": policy,
                                                             "kv_ratio": ratio}
    result = drive(llm, prompts, xargs, max_tokens, f"{tag}-{policy}-{ratio}")
    return {"policy": policy, "ratio": ratio, "max_tokens": max_tokens, **result.figures()}


def validate(args: argparse.Namespace) -> None:
    """Fails before the engine starts, naming the option; fills the workload's defaults."""
    from ..policies.registry import policy_names

    for key, value in WORKLOAD_DEFAULTS[args.workload].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    known = set(policy_names()) - {"none"}
    if args.decode_policy not in known:
        raise ValueError(f"--decode-policy: unknown {args.decode_policy!r}; allowed: "
                         f"{', '.join(sorted(known))}")
    small = [b for b in args.decode_budgets if b < 36 + args.decode_interval]
    if small:
        raise ValueError(f"--decode-budgets: {small} leave no room for the sinks (4), the "
                         f"window (32) and --decode-interval ({args.decode_interval})")
    unknown = [p for p in args.policies if p not in known]
    if unknown:
        raise ValueError(f"--policies: unknown {unknown}; allowed: {', '.join(sorted(known))}")
    bad = [r for r in args.ratios if not 0.0 < r < 1.0]
    if bad:
        raise ValueError(f"--ratios: {bad} not in (0, 1) (1.0 is the `none` baseline)")
    if args.requests < 1 or args.full_requests < 1 or args.block_size % 32:
        raise ValueError("--requests and --full-requests must be >= 1, --block-size a multiple "
                         "of 32")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration in one engine; ``args`` already passed ``validate``."""
    if args.workload == "long-output":
        from . import long_output

        return long_output.run(args)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The pool size comes from num_gpu_blocks_override; without this the CPU worker reserves
    # (and first checks for) 92% of RAM.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    block = args.block_size
    per_request = -(-(args.prompt_len + max(args.max_tokens)) // block)
    llm = LLM(model=args.model, max_model_len=args.prompt_len + max(args.max_tokens),
              enforce_eager=True, seed=0, dtype=args.dtype,
              enable_prefix_caching=False, block_size=block, max_num_seqs=64,
              num_gpu_blocks_override=args.full_requests * per_request + 1)
    prompts = essay_prompts(args.model, args.requests, args.prompt_len)
    rows = []
    configs = configurations(args.policies, args.ratios)
    # Warm-up outside the timings: the first step of each code path (scoring, compaction, CPU
    # attention at new shapes) pays one-off costs that would otherwise land on one config.
    for policy in dict.fromkeys(p for p, _ in configs):
        run_config(llm, prompts[:2], policy, 0.25, 4, "warmup")
    cases = [(m, p, r) for m in args.max_tokens for p, r in configs]
    for max_tokens, policy, ratio in tqdm(cases, desc="throughput configurations"):
        rows.append(run_config(llm, prompts, policy, ratio, max_tokens, f"t{len(rows)}"))
    for row in rows:
        base = next(r for r in rows if r["policy"] == "none" and
                    r["max_tokens"] == row["max_tokens"])
        for key in ("requests_per_s", "output_tokens_per_s", "peak_running"):
            row[f"{key}_vs_none"] = row[key] / base[key]
        for key in ("ttft_p50_s", "tpot_p50_s"):
            row[f"{key}_vs_none"] = row[key] / base[key]
        # The targets: peak >= 0.9 x (1 / ratio) x none's; tok/s >= 3x none at 0.25.
        row["peak_goal"] = 0.9 * base["peak_running"] / row["ratio"]
        row["peak_goal_met"] = row["peak_running"] >= row["peak_goal"]
    report = {"machine": machine(), "command": "kvcompress " + " ".join(sys.argv[1:]),
              "model": args.model, "dtype": args.dtype,
              "workload": {"requests": args.requests, "prompt_len": args.prompt_len,
                           "pool_holds_full_requests": args.full_requests,
                           "block_size": block}, "rows": rows}
    out = Path(args.out)
    write_json_csv(out, "throughput", report, rows)
    _plot(report, out / "throughput.png")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = report["rows"]
    variants = sorted({r["max_tokens"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    configs = list(dict.fromkeys((r["policy"], r["ratio"]) for r in rows))
    labels = [f"{p}\n{r:g}" for p, r in configs]
    width = 0.8 / len(variants)
    for i, max_tokens in enumerate(variants):
        mine = [r for r in rows if r["max_tokens"] == max_tokens]
        xs = [j + i * width for j in range(len(mine))]
        axes[0].bar(xs, [r["output_tokens_per_s_vs_none"] for r in mine], width,
                    label=f"{max_tokens} output tokens")
        axes[1].bar(xs, [r["peak_running"] for r in mine], width,
                    label=f"{max_tokens} output tokens")
    for ax, title in zip(axes, ("output tokens/s vs none", "peak running requests"),
                         strict=True):
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(configs))])
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].axhline(1.0, color="gray", linestyle="--")
    m = report["machine"]
    w = report["workload"]
    fig.suptitle(f"{w['requests']} x {w['prompt_len']}-token prompts, pool for "
                 f"{w['pool_holds_full_requests']} full requests; {m['cpu']} "
                 f"({m['cores']} cores), {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: Per workload: defaults of the options left unset on the command line.
WORKLOAD_DEFAULTS = {
    "prompt": {"out": "runs/bench-throughput", "requests": 32, "prompt_len": 1024,
               "max_tokens": [16, 128]},
    # The decode-time compression issue's workload: 512-token prompts, 2,048 output tokens.
    "long-output": {"out": "runs/bench-long-output", "requests": 16, "prompt_len": 512,
                    "max_tokens": [2048]},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=list(WORKLOAD_DEFAULTS), default="prompt",
                        help="prompt: prompt-time compression, policies x ratios; long-output: "
                             "decode-time compression (decode_budget) vs none on long "
                             "generations (see bench/long_output.py)")
    parser.add_argument("--model", default="models/smollm2")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/bench-throughput, or "
                             "runs/bench-long-output)")
    parser.add_argument("--requests", type=int, default=None, help="default 32 (16)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 1024 (512)")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=None,
                        help="output lengths (default 16 and 128; long-output: 2048)")
    parser.add_argument("--decode-budgets", type=int, nargs="+", default=[512],
                        help="long-output: decode_budget values compared with none")
    parser.add_argument("--decode-interval", type=int, default=128,
                        help="long-output: decode_interval")
    parser.add_argument("--decode-policy", default="snapkv",
                        help="long-output: the policy that compacts")
    parser.add_argument("--remap-batch", type=int, default=64,
                        help="long-output: batch of the per-step plugin-work measurement")
    parser.add_argument("--full-requests", type=int, default=4,
                        help="the KV pool holds this many uncompressed requests")
    parser.add_argument("--block-size", type=int, default=32,
                        help="KV block size (CPU_ATTN needs a multiple of 32)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="model dtype (auto: the model's own, bf16 for SmolLM2; on CPUs "
                        "without native bf16 float32 runs several times faster)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS),
                        help="kept ratios of every policy")


def print_report(report: dict[str, Any]) -> None:
    if report["workload"].get("kind") == "long-output":
        from . import long_output

        long_output.print_report(report)
        return
    m = report["machine"]
    print(f"\n{report['model']} on {m['cpu']} ({m['cores']} cores), {m['date']}; "
          f"workload {report['workload']}")
    print(f"{'policy':<13}{'ratio':>6}{'out':>5}{'req/s':>8}{'tok/s':>8}{'x none':>8}"
          f"{'peak':>6}{'goal':>6}{'preempt':>8}{'TTFT p50':>10}{'p99':>7}{'TPOT p50':>10}"
          f"{'p99':>7}")
    for r in report["rows"]:
        print(f"{r['policy']:<13}{r['ratio']:>6.2f}{r['max_tokens']:>5}"
              f"{r['requests_per_s']:>8.3f}{r['output_tokens_per_s']:>8.1f}"
              f"{r['output_tokens_per_s_vs_none']:>8.2f}{r['peak_running']:>6}"
              f"{r['peak_goal']:>6.1f}"
              f"{r['preemptions']:>8}{r['ttft_p50_s']:>10.1f}{r['ttft_p99_s']:>7.1f}"
              f"{r['tpot_p50_s']:>10.3f}{r['tpot_p99_s']:>7.3f}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(cli)
    parsed = cli.parse_args()
    validate(parsed)
    print_report(run(parsed))
