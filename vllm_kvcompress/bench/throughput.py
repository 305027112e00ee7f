"""`kvcompress bench throughput`: memory-bound serving, policy `none` vs each policy and ratio.

One in-process engine (SmolLM2-135M-Instruct by default) with a KV pool that holds only a few full
prompts; all requests arrive at once; the engine is stepped until idle. Per configuration:
requests/s, output tokens/s, peak concurrently running requests, preemptions, TTFT and TPOT p50/p99,
each also as a ratio to `none` measured in the same run. Variants with short and long outputs.
Prefix caching is off so every configuration prefills for real. Writes ``throughput.json``,
``throughput.csv`` and ``throughput.png``.

``--prefill-budgets B``: every policy (PyramidKV excepted: refused for this mode) also runs as
``policy@prefill_budget=B``: compressed while prefilling (``kv_prefill_budget``) and admitted by
its compressed footprint (``B`` + one chunk, ``--chunk``) instead of its whole prompt; its final
kept count is ``B`` (reported as ratio ``B / prompt_len``). ``--reps N`` runs every
configuration ``N`` times, interleaved (all configurations once, then again), and reports
medians, each ratio to `none` taken within its repetition: on a shared machine both sides of a
ratio then see the same load. What bounds the gain is measured too: peak KV blocks in use, and
the time of steps with prefill work vs decode-only steps (their mean batch and seconds per
decoded token).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .artifacts import machine, pyplot, write_json_csv
from .overhead import essay_prompts

POLICIES = ("streamingllm", "snapkv", "chunkkv", "pyramidkv")
RATIOS = (0.5, 0.25, 0.1)


#: Policies refused with ``prefill_budget`` (their budgets are shares of the whole prompt).
NO_PREFILL_BUDGET = ("pyramidkv",)


def configurations(policies: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """``none`` first, then every policy at every ratio."""
    return [("none", 1.0)] + [(p, r) for p in policies for r in ratios]


@dataclass(frozen=True)
class Config:
    """One measured configuration.

    Attributes:
        policy: the policy (``none`` for the baseline).
        ratio: the kept ratio (end-of-prefill), or ``prefill_budget / prompt_len``.
        prefill_budget: ``kv_prefill_budget`` (tokens), or ``None`` (end-of-prefill only).
    """

    policy: str
    ratio: float
    prefill_budget: int | None = None

    @property
    def label(self) -> str:
        """``chunkkv``, or ``chunkkv@prefill_budget=256`` (the rows' ``policy`` column)."""
        if self.prefill_budget is None:
            return self.policy
        return f"{self.policy}@prefill_budget={self.prefill_budget}"

    def xargs(self) -> dict[str, Any]:
        """The request's ``kv_*`` extra args."""
        if self.policy == "none":
            return {"kv_policy": "none"}
        if self.prefill_budget is not None:
            return {"kv_policy": self.policy, "kv_prefill_budget": self.prefill_budget}
        return {"kv_policy": self.policy, "kv_ratio": self.ratio}


def all_configurations(policies: list[str], ratios: list[float], prefill_budgets: list[int],
                       prompt_len: int) -> list[Config]:
    """``configurations`` plus every policy that allows it at every prefill budget."""
    configs = [Config(p, r) for p, r in configurations(policies, ratios)]
    configs += [Config(p, b / prompt_len, b) for p in policies if p not in NO_PREFILL_BUDGET
                for b in prefill_budgets]
    return configs


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
        peak_blocks: most KV blocks in use in the pool at any allocation (inside a step,
            before a compaction of that step frees its source blocks).
        prefill_seconds: wall time of the steps that computed prompt tokens (chunks of
            prompts, re-prefills after preemption; decode tokens batched with them included).
        decode_steps: ``(batch, seconds)`` of every decode-only step.
    """

    ids: list[str]
    start: float
    seconds: float
    first: dict[str, float]
    done: dict[str, tuple[float, int]]
    peak_running: int
    preemptions: int
    peak_blocks: int = 0
    prefill_seconds: float = 0.0
    decode_steps: list[tuple[int, float]] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        """The latency/throughput figures every configuration reports."""
        ttft = [self.first[i] - self.start for i in self.ids]
        tpot = [(self.done[i][0] - self.first[i]) / max(self.done[i][1] - 1, 1)
                for i in self.ids]
        out_tokens = sum(self.done[i][1] for i in self.ids)
        decode_seconds = sum(seconds for _, seconds in self.decode_steps)
        batches = [batch for batch, _ in self.decode_steps]
        return {"requests": len(self.ids), "seconds": self.seconds,
                "requests_per_s": len(self.ids) / self.seconds,
                "output_tokens_per_s": out_tokens / self.seconds,
                "peak_running": self.peak_running, "preemptions": self.preemptions,
                "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
                "tpot_p50_s": percentile(tpot, 0.5), "tpot_p99_s": percentile(tpot, 0.99),
                "peak_blocks": self.peak_blocks, "prefill_step_seconds": self.prefill_seconds,
                "decode_step_seconds": decode_seconds, "decode_steps": len(batches),
                "decode_batch_mean": statistics.fmean(batches) if batches else 0.0,
                # What a larger decode batch buys on this machine: seconds per decoded token.
                "decode_token_seconds": decode_seconds / sum(batches) if batches else 0.0}


def drive(llm: Any, prompts: list[list[int]], xargs: dict[str, Any], max_tokens: int,
          tag: str, after_step: Callable[[Any], None] | None = None) -> Drive:
    """Adds every prompt at once (greedy, ``ignore_eos``) and steps the engine until idle.

    Args:
        after_step: called with the scheduler after every step (extra observations).
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    usable = pool.num_gpu_blocks - 1  # the null block is never handed out
    peak_blocks = [0]
    take = pool.get_new_blocks

    def get_new_blocks(*args: Any, **kwargs: Any) -> Any:
        # Observation only (an attribute of this pool instance, removed below).
        blocks = take(*args, **kwargs)
        peak_blocks[0] = max(peak_blocks[0], usable - pool.get_num_free_blocks())
        return blocks

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
    prefill_seconds = 0.0
    decode_steps: list[tuple[int, float]] = []
    pool.get_new_blocks = get_new_blocks
    try:
        while engine.has_unfinished_requests():
            # (computed, tokens) before the step: a request that advances from below
            # tokens - 1 computed prompt tokens (a chunk or a re-prefill) in this step.
            before = {req_id: (r.num_computed_tokens, r.num_tokens)
                      for req_id, r in scheduler.requests.items()}
            step_start = time.perf_counter()
            outputs = engine.step()
            now = time.perf_counter()
            prefilled, decoded = _step_kind(before, scheduler.requests)
            if prefilled:
                prefill_seconds += now - step_start
            elif decoded:
                decode_steps.append((decoded, now - step_start))
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
    finally:
        del pool.get_new_blocks  # back to the class method
    return Drive(ids, start, time.perf_counter() - start, first, done, peak,
                 sum(preemptions.values()), peak_blocks[0], prefill_seconds, decode_steps)


def _step_kind(before: dict[str, tuple[int, int]], requests: dict[str, Any]
               ) -> tuple[bool, int]:
    """(whether the step computed prompt tokens, how many requests it decoded)."""
    prefilled, decoded = False, 0
    for req_id, (computed, tokens) in before.items():
        request = requests.get(req_id)
        # A request that finished in this step (gone) was decoding: only output ends a request
        # here (no max_tokens=1 in the benchmarks).
        now = request.num_computed_tokens if request is not None else computed + 1
        if now <= computed:
            continue  # not scheduled, or preempted (its count went back to 0)
        if computed < tokens - 1:
            prefilled = True
        else:
            decoded += 1
    return prefilled, decoded


def run_config(llm: Any, prompts: list[list[int]], policy: str, ratio: float, max_tokens: int,
               tag: str, prefill_budget: int | None = None) -> dict[str, Any]:
    """All requests at once; steps until idle; returns the figures of one configuration.

    Args:
        prefill_budget: compress while prefilling to this many tokens (``ratio`` is then only
            reported: the budget sets the kept count).
    """
    config = Config(policy, ratio, prefill_budget)
    result = drive(llm, prompts, config.xargs(), max_tokens, f"{tag}-{config.label}-{ratio}")
    return {"policy": config.label, "ratio": ratio, "max_tokens": max_tokens,
            "prefill_budget": prefill_budget, **result.figures()}


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
    if args.reps < 1:
        raise ValueError("--reps must be >= 1")
    if args.chunk is not None and args.chunk < 32:
        raise ValueError(f"--chunk: {args.chunk} is below 32 tokens")
    if args.prefill_budgets:
        if args.chunk is None:
            raise ValueError("--prefill-budgets needs --chunk (the chunked-prefill chunk: a "
                             "request holds at most budget + chunk while prefilling)")
        useless = [b for b in args.prefill_budgets if b + args.chunk >= args.prompt_len or b < 36]
        if useless:
            raise ValueError(f"--prefill-budgets: {useless} must hold the sinks and the window "
                             f"(>= 36) and leave budget + --chunk ({args.chunk}) below "
                             f"--prompt-len ({args.prompt_len}), else nothing is compressed "
                             "while prefilling")
        if all(p in NO_PREFILL_BUDGET for p in args.policies):
            raise ValueError(f"--prefill-budgets: no policy of --policies allows it "
                             f"({', '.join(NO_PREFILL_BUDGET)} is refused for this mode)")


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
    chunked = {} if args.chunk is None else {"max_num_batched_tokens": args.chunk,
                                             "enable_chunked_prefill": True}
    llm = LLM(model=args.model, max_model_len=args.prompt_len + max(args.max_tokens),
              enforce_eager=True, seed=0, dtype=args.dtype,
              enable_prefix_caching=False, block_size=block, max_num_seqs=64,
              num_gpu_blocks_override=args.full_requests * per_request + 1, **chunked)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    chunk = scheduler.scheduler_config.max_num_batched_tokens
    prompts = essay_prompts(args.model, args.requests, args.prompt_len)
    load_start = os.getloadavg()[0]  # 1-minute load average: what else ran on the machine
    configs = all_configurations(args.policies, args.ratios, args.prefill_budgets,
                                 args.prompt_len)
    # Warm-up outside the timings: the first step of each code path (scoring, compaction, CPU
    # attention at new shapes) pays one-off costs that would otherwise land on one config.
    for config in dict.fromkeys(Config(c.policy, 0.25, c.prefill_budget) for c in configs):
        run_config(llm, prompts[:2], config.policy, config.ratio, 4, "warmup",
                   config.prefill_budget)
    cases = [(rep, m, c) for rep in range(args.reps) for m in args.max_tokens for c in configs]
    runs: list[dict[str, Any]] = []
    for rep, max_tokens, config in tqdm(cases, desc="throughput configurations"):
        row = run_config(llm, prompts, config.policy, config.ratio, max_tokens,
                         f"t{len(runs)}", config.prefill_budget)
        runs.append({"rep": rep, **row})
    for row in runs:
        base = next(r for r in runs if r["policy"] == "none" and r["rep"] == row["rep"] and
                    r["max_tokens"] == row["max_tokens"])
        for key in ("requests_per_s", "output_tokens_per_s", "peak_running", "ttft_p50_s",
                    "tpot_p50_s"):
            row[f"{key}_vs_none"] = row[key] / base[key]
    rows = [_median_row([r for r in runs if r["policy"] == c.label and r["ratio"] == c.ratio
                         and r["max_tokens"] == m]) for m in args.max_tokens for c in configs]
    for row in rows:
        base = next(r for r in rows if r["policy"] == "none" and
                    r["max_tokens"] == row["max_tokens"])
        # The targets: peak >= 0.9 x (1 / ratio) x none's; tok/s >= 3x none at 0.25.
        row["peak_goal"] = 0.9 * base["peak_running"] / row["ratio"]
        row["peak_goal_met"] = row["peak_running"] >= row["peak_goal"]
    report = {"machine": machine(), "command": "kvcompress " + " ".join(sys.argv[1:]),
              "model": args.model, "dtype": args.dtype,
              "load_average_start_end": [load_start, os.getloadavg()[0]],
              "workload": {"requests": args.requests, "prompt_len": args.prompt_len,
                           "pool_holds_full_requests": args.full_requests,
                           "pool_blocks": args.full_requests * per_request,
                           "block_size": block, "chunk": chunk, "reps": args.reps},
              "rows": rows, "runs": runs}
    out = Path(args.out)
    write_json_csv(out, "throughput", report, rows)
    _plot(report, out / "throughput.png")
    return report


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's repetitions as one row: medians of the numbers (ratios to `none`
    taken within each repetition first), the rest from the first repetition."""
    row = {k: v for k, v in runs[0].items() if k != "rep"}
    for key, value in row.items():
        if isinstance(value, float) and key != "ratio":
            row[key] = statistics.median(r[key] for r in runs)
        elif isinstance(value, int) and not isinstance(value, bool) and key not in (
                "max_tokens", "prefill_budget", "requests"):
            row[key] = round(statistics.median(r[key] for r in runs))
    row["reps"] = len(runs)
    return row


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = report["rows"]
    variants = sorted({r["max_tokens"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
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
    for ax, title in zip(axes[:2], ("output tokens/s vs none", "peak running requests"),
                         strict=True):
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(configs))])
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].axhline(1.0, color="gray", linestyle="--")
    # Where the time went (longest outputs): steps with prefill work vs decode-only steps.
    longest = [r for r in rows if r["max_tokens"] == variants[-1]]
    if all("prefill_step_seconds" in r for r in longest):
        xs = range(len(longest))
        prefill = [r["prefill_step_seconds"] for r in longest]
        axes[2].bar(xs, prefill, 0.6, label="steps with prefill work")
        axes[2].bar(xs, [r["decode_step_seconds"] for r in longest], 0.6, bottom=prefill,
                    label="decode-only steps")
        axes[2].set_xticks(list(xs))
        axes[2].set_xticklabels([f"{r['policy']}\n{r['ratio']:g}" for r in longest],
                                fontsize=6, rotation=90)
        axes[2].set_title(f"seconds by step kind ({variants[-1]} output tokens)")
        axes[2].legend(fontsize=8)
    m = report["machine"]
    w = report["workload"]
    chunk = f", chunks of {w['chunk']}" if w.get("chunk") else ""
    fig.suptitle(f"{w['requests']} x {w['prompt_len']}-token prompts, pool for "
                 f"{w['pool_holds_full_requests']} full requests{chunk}; {m['cpu']} "
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
    parser.add_argument("--prefill-budgets", nargs="+", type=int, default=[],
                        help="also run every policy (pyramidkv excepted) compressed while "
                             "prefilling to each of these kv_prefill_budget values (tokens), "
                             "admitted by its compressed footprint; needs --chunk")
    parser.add_argument("--chunk", type=int, default=None,
                        help="chunked-prefill chunk, max_num_batched_tokens (default: vLLM's)")
    parser.add_argument("--reps", type=int, default=1,
                        help="repetitions of every configuration, interleaved (medians)")


def print_report(report: dict[str, Any]) -> None:
    if report["workload"].get("kind") == "long-output":
        from . import long_output

        long_output.print_report(report)
        return
    m = report["machine"]
    print(f"\n{report['model']} on {m['cpu']} ({m['cores']} cores), {m['date']}; "
          f"workload {report['workload']}")
    width = max(13, *(len(r["policy"]) + 1 for r in report["rows"]))
    print(f"{'policy':<{width}}{'ratio':>6}{'out':>5}{'req/s':>8}{'tok/s':>8}{'x none':>8}"
          f"{'peak':>6}{'goal':>6}{'preempt':>8}{'blocks':>7}{'TTFT p50':>10}{'p99':>7}"
          f"{'TPOT p50':>10}{'p99':>7}{'prefill s':>10}{'decode s':>9}{'batch':>6}")
    for r in report["rows"]:
        print(f"{r['policy']:<{width}}{r['ratio']:>6.2f}{r['max_tokens']:>5}"
              f"{r['requests_per_s']:>8.3f}{r['output_tokens_per_s']:>8.1f}"
              f"{r['output_tokens_per_s_vs_none']:>8.2f}{r['peak_running']:>6}"
              f"{r['peak_goal']:>6.1f}"
              f"{r['preemptions']:>8}{r.get('peak_blocks', 0):>7}"
              f"{r['ttft_p50_s']:>10.1f}{r['ttft_p99_s']:>7.1f}"
              f"{r['tpot_p50_s']:>10.3f}{r['tpot_p99_s']:>7.3f}"
              f"{r.get('prefill_step_seconds', 0.0):>10.1f}"
              f"{r.get('decode_step_seconds', 0.0):>9.1f}{r.get('decode_batch_mean', 0.0):>6.1f}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(cli)
    parsed = cli.parse_args()
    validate(parsed)
    print_report(run(parsed))
