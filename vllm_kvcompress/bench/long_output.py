"""`kvcompress bench throughput --workload long-output`: long generations under memory pressure.

Decode-time compression (``decode_budget``) against ``none`` in one in-process engine, on this
machine, side by side:

* **throughput**: ``requests`` prompts of ``prompt_len`` tokens, ``max_tokens`` output tokens
  each (512 / 2,048 by default), all arriving at once, in a KV pool that holds
  ``full_requests`` (4) uncompressed requests: output tokens/s, peak running, preemptions,
  TPOT p50/p99, per configuration and as a ratio to ``none``;
* **KV held, by vLLM's own gauge**: one request alone per configuration; after every engine
  step vLLM's KV usage (``kv_cache_manager.usage``, the number behind
  ``vllm:kv_cache_usage_perc``) times the pool size gives the blocks it holds, compared with
  ``cdiv(decode_budget + decode_interval, block_size)``; plotted over the generation;
* **per-step plugin work** at batch ``remap_batch`` (64): every request carries evicted tokens
  (prompt-compressed, key-only policy), decode steps without compaction work; the worker's own
  timers (step boundaries, the evicted-count remap, per-layer hook) against the step's wall
  time; and the same with decode-time compression's query ring (a query-reading policy).

Writes ``long_output.json``, ``long_output.csv`` and ``long_output.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .artifacts import machine, pyplot, write_json_csv
from .overhead import essay_prompts
from .throughput import drive


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def engine_parts(llm: Any) -> tuple[Any, Any]:
    """(scheduler, model runner) of an in-process engine."""
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler, core.model_executor.driver_worker.worker.model_runner


def xargs_of(policy: str, budget: int | None, interval: int) -> dict[str, Any]:
    if policy == "none" or budget is None:
        return {"kv_policy": "none"}
    return {"kv_policy": policy, "kv_decode_budget": budget, "kv_decode_interval": interval}


def run_workload(llm: Any, prompts: list[list[int]], xargs: dict[str, Any], max_tokens: int,
                 tag: str, trace: bool = False) -> dict[str, Any]:
    """All requests at once, stepped until idle (``throughput.drive``).

    Returns:
        The figures of one configuration, plus the peak of vLLM's KV usage and the decode-time
        compactions; with ``trace``, also ``usage_blocks``: the blocks in use (vLLM's usage
        gauge times the pool's usable blocks) after every step.
    """
    scheduler, _ = engine_parts(llm)
    pool_blocks = scheduler.kv_cache_manager.block_pool.num_gpu_blocks
    stats = scheduler._kvcompress.stats if scheduler._kvcompress else None
    compactions_before = stats.decode_compactions if stats else 0
    usage_blocks: list[int] = []
    peak_usage = [0.0]

    def observe(sched: Any) -> None:
        usage = sched.kv_cache_manager.usage
        peak_usage[0] = max(peak_usage[0], usage)
        if trace:
            usage_blocks.append(round(usage * (pool_blocks - 1)))  # the null block excluded

    result = drive(llm, prompts, xargs, max_tokens, tag, after_step=observe)
    row = {**result.figures(), "peak_kv_usage": peak_usage[0],
           "decode_compactions": (stats.decode_compactions if stats else 0) - compactions_before}
    if trace:
        row["usage_blocks"] = usage_blocks
    return row


def plugin_step_share(llm: Any, prompts: list[list[int]], xargs: dict[str, Any],
                      max_tokens: int, tag: str) -> dict[str, Any]:
    """The plugin's own per-step time on decode steps without compaction work, every running
    request carrying evicted tokens, as a share of the step's wall time (medians)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler, runner = engine_parts(llm)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            extra_args=xargs)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": prompt}, params)
    stats = scheduler._kvcompress.stats
    shares, remap_shares, step_ms = [], [], []
    while engine.has_unfinished_requests():
        state = getattr(runner, "_kvcompress", None)
        before = _plugin_seconds(state)
        compactions = stats.requests_compressed + stats.decode_compactions
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        state = runner._kvcompress
        evicted = state.evicted_rows
        all_decoding = (len(scheduler.running) == len(prompts) and not scheduler.waiting and
                        all(r.num_output_tokens > 0 for r in scheduler.running) and
                        evicted.any(len(prompts)) and
                        bool(evicted.rows[:len(prompts)].all()))
        if all_decoding and compactions == stats.requests_compressed + stats.decode_compactions:
            spent = _plugin_seconds(state) - before
            shares.append(spent[0] / wall)
            remap_shares.append(spent[1] / wall)
            step_ms.append(wall * 1e3)
    if not shares:
        raise RuntimeError("no decode step without compaction work was observed")
    return {"steps_measured": len(shares), "batch": len(prompts),
            "step_ms_p50": statistics.median(step_ms),
            "plugin_share_p50": statistics.median(shares),
            "plugin_share_max": max(shares),
            "remap_share_p50": statistics.median(remap_shares)}


def _plugin_seconds(state: Any) -> Any:
    """(all plugin work, the remap alone) in seconds so far."""
    import numpy as np

    if state is None:
        return np.zeros(2)
    remap = state.evicted_rows.seconds
    return np.array([state.step_seconds + remap + state.compaction_seconds, remap])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The long-output workload; ``args`` from ``throughput.add_arguments``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    block = args.block_size
    prompt_len, max_tokens = args.prompt_len, args.max_tokens[0]
    interval = args.decode_interval
    per_request = cdiv(prompt_len + max_tokens, block)
    batch = max(args.requests, args.remap_batch)
    if prompt_len // 2 < 36 + prompt_len // 4:
        raise ValueError("--prompt-len: the long-output workload needs >= 160 tokens")
    llm = LLM(model=args.model, max_model_len=prompt_len + max_tokens, enforce_eager=True,
              seed=0, dtype=args.dtype, enable_prefix_caching=False, block_size=block,
              max_num_seqs=max(64, args.remap_batch), max_num_batched_tokens=4096,
              num_gpu_blocks_override=args.full_requests * per_request + 1)
    prompts = essay_prompts(args.model, batch, prompt_len)
    configs = [("none", None)] + [(args.decode_policy, b) for b in args.decode_budgets]
    for policy, budget in configs:  # warm-up: first steps of each code path
        run_workload(llm, prompts[:2], xargs_of(policy, budget, interval), 4, f"warm-{budget}")
    rows, traces = [], {}
    with tqdm(total=2 * len(configs) + 2, desc="long-output workload") as bar:
        for policy, budget in configs:
            row = run_workload(llm, prompts[:args.requests], xargs_of(policy, budget, interval),
                               max_tokens, f"load-{budget}")
            rows.append({"policy": policy, "decode_budget": budget or 0,
                         "decode_interval": interval if budget else 0, **row})
            bar.update()
        for policy, budget in configs:
            solo = run_workload(llm, prompts[:1], xargs_of(policy, budget, interval),
                                max_tokens, f"solo-{budget}", trace=True)
            traces[str(budget or 0)] = solo["usage_blocks"]
            row = next(r for r in rows if r["decode_budget"] == (budget or 0))
            row["solo_max_blocks_by_gauge"] = max(solo["usage_blocks"])
            row["block_bound"] = cdiv(budget + interval, block) if budget else per_request
            bar.update()
        # Per-step plugin work at batch remap_batch, in an engine whose pool holds them all:
        # prompt-compressed (key-only, no ring) and decode-compressed with a query-reading
        # policy (ring writes every step; compacted once at the end of the prefill, the next
        # compaction is further away than the 48 steps measured).
        wide = LLM(model=args.model, max_model_len=prompt_len + 64, enforce_eager=True, seed=0,
                   dtype=args.dtype, enable_prefix_caching=False, block_size=block,
                   max_num_seqs=args.remap_batch, max_num_batched_tokens=8192,
                   num_gpu_blocks_override=args.remap_batch * cdiv(prompt_len + 64, block) + 1)
        remap_prompts = prompts[:args.remap_batch]
        run_workload(wide, remap_prompts[:2], {"kv_policy": "knorm", "kv_ratio": 0.25}, 4,
                     "warm-wide")
        steps = plugin_step_share(wide, remap_prompts, {"kv_policy": "knorm", "kv_ratio": 0.25},
                                  48, "remap-knorm")
        bar.update()
        ring = plugin_step_share(
            wide, remap_prompts, {"kv_policy": "snapkv", "kv_decode_budget": prompt_len // 2,
                                  "kv_decode_interval": prompt_len // 4}, 48, "remap-ring")
        bar.update()
    base = rows[0]
    for row in rows:
        row["output_tokens_per_s_vs_none"] = row["output_tokens_per_s"] / \
            base["output_tokens_per_s"]
        row["tpot_p50_vs_none"] = row["tpot_p50_s"] / base["tpot_p50_s"]
        row["held_within_bound"] = row["solo_max_blocks_by_gauge"] <= row["block_bound"]
    report = {"machine": machine(), "command": "kvcompress " + " ".join(sys.argv[1:]),
              "model": args.model,
              "workload": {"kind": "long-output", "requests": args.requests,
                           "prompt_len": prompt_len, "max_tokens": max_tokens,
                           "pool_holds_full_requests": args.full_requests,
                           "pool_blocks": args.full_requests * per_request + 1,
                           "block_size": block, "decode_interval": interval},
              "rows": rows, "usage_trace_blocks": traces,
              "plugin_step_work": {"prompt_compressed_knorm": steps,
                                   "decode_ring_snapkv": ring}}
    out = Path(args.out)
    write_json_csv(out, "long_output", report, rows)
    _plot(report, out / "long_output.png")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = report["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    labels = ["none" if not r["decode_budget"] else f"{r['policy']}\nbudget {r['decode_budget']}"
              for r in rows]
    axes[0].bar(labels, [r["output_tokens_per_s"] for r in rows])
    axes[0].set_title("output tokens/s (all requests at once)")
    axes[1].bar(labels, [r["peak_running"] for r in rows], color="tab:orange")
    axes[1].set_title("peak running requests")
    for budget, trace in report["usage_trace_blocks"].items():
        label = "none" if budget == "0" else f"decode_budget {budget}"
        axes[2].plot(range(len(trace)), trace, label=label)
    axes[2].set_title("one request alone: blocks in use (vLLM's usage gauge)")
    axes[2].set_xlabel("engine step")
    axes[2].legend(fontsize=8)
    w, m = report["workload"], report["machine"]
    fig.suptitle(f"{w['requests']} x {w['prompt_len']}-token prompts, {w['max_tokens']} output "
                 f"tokens, pool for {w['pool_holds_full_requests']} full requests; {m['cpu']} "
                 f"({m['cores']} cores), {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(report: dict[str, Any]) -> None:
    m, w = report["machine"], report["workload"]
    print(f"\n{report['model']} on {m['cpu']} ({m['cores']} cores), {m['date']}; workload {w}")
    print(f"{'config':<26}{'tok/s':>8}{'x none':>8}{'peak':>6}{'preempt':>8}{'TPOT p50':>10}"
          f"{'p99':>8}{'compactions':>12}{'solo blocks':>12}{'bound':>6}")
    for r in report["rows"]:
        name = "none" if not r["decode_budget"] else f"{r['policy']} budget {r['decode_budget']}"
        print(f"{name:<26}{r['output_tokens_per_s']:>8.1f}"
              f"{r['output_tokens_per_s_vs_none']:>8.2f}{r['peak_running']:>6}"
              f"{r['preemptions']:>8}{r['tpot_p50_s']:>10.3f}{r['tpot_p99_s']:>8.3f}"
              f"{r['decode_compactions']:>12}{r['solo_max_blocks_by_gauge']:>12}"
              f"{r['block_bound']:>6}")
    for name, work in report["plugin_step_work"].items():
        print(f"per-step plugin work, {name}: {100 * work['plugin_share_p50']:.2f}% of a "
              f"{work['step_ms_p50']:.0f} ms step at batch {work['batch']} (remap "
              f"{100 * work['remap_share_p50']:.3f}%, max {100 * work['plugin_share_max']:.2f}%,"
              f" {work['steps_measured']} steps)")
