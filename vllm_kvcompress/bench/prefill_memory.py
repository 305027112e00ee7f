"""`kvcompress bench prefill-memory`: a prompt's peak KV with and without compression while
prefilling (``prefill_budget``), against prompt length.

One in-process engine, chunked prefill of ``--chunk`` tokens, one request alone per
(prompt length, configuration), stepped until it has produced its first token; after every step
the blocks the request holds are read from the scheduler's manager. ``none`` holds its whole
prompt at the end of prefill (linear in the length); with ``prefill_budget`` a request never
holds more than ``cdiv(budget + chunk, block_size)`` blocks (flat). Also reported: time to first
token (the prefill's attention reads at most budget + chunk keys per chunk instead of the whole
prefix) and the cuts made.

The default model is a tiny random Llama (4 layers, GQA 2, head_dim 64) built here with
``max_position_embeddings`` raised to the longest prompt: block counts do not depend on the
weights, and it reaches 32k tokens in minutes on a CPU. ``--model`` takes any folder (its own
context limit applies). Writes ``prefill_memory.json``, ``.csv`` and ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .artifacts import machine, pyplot, write_json_csv


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[2048, 4096, 8192, 16384, 32768], help="prompt lengths")
    parser.add_argument("--budget", type=int, default=1024, help="prefill_budget (tokens)")
    parser.add_argument("--chunk", type=int, default=512,
                        help="chunked-prefill chunk (max_num_batched_tokens)")
    parser.add_argument("--policy", default="snapkv", help="policy of the compressed runs")
    parser.add_argument("--window", type=int, default=32, help="observation window")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=None,
                        help="model folder (default: a tiny random Llama built under --out)")
    parser.add_argument("--out", default="runs/prefill-memory", help="output folder")


def validate(args: argparse.Namespace) -> None:
    """Raises ValueError for settings that cannot run (one line)."""
    if min(args.lengths) <= args.budget + args.chunk:
        raise ValueError(f"--lengths must exceed --budget + --chunk ({args.budget + args.chunk})"
                         " to show anything")
    if args.budget < args.window + 4:
        raise ValueError("--budget must hold the window and the sinks")


def tiny_model(out: Path, positions: int) -> Path:
    """The tiny random Llama with ``positions`` RoPE positions (its config edited)."""
    from ..models.prepare import prepare_tiny_llama

    folder = prepare_tiny_llama(out / "tiny-llama-long")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("max_position_embeddings", 0) < positions:
        config["max_position_embeddings"] = positions
        config_path.write_text(json.dumps(config, indent=2))
    return folder


def measure(llm: Any, prompt: list[int], xargs: dict[str, Any] | None, tag: str
            ) -> dict[str, Any]:
    """One request alone until its first token.

    Returns:
        ``peak_blocks``: the most blocks the request's block table held (read right after
        each allocation, before a compaction in the same step frees any); ``peak_pool_blocks``:
        the most blocks in use in the pool at any allocation, which also counts a compaction's
        fresh destination blocks while the source ones are still held; TTFT; steps; cuts.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    usable = pool.num_gpu_blocks - 1  # the null block is never handed out
    stats = scheduler._kvcompress.stats
    cuts_before = stats.prefill_compactions
    peak = {"request": 0, "pool": 0}
    allocate, take = manager.allocate_new_blocks, pool.get_new_blocks

    def allocate_new_blocks(request_id: str, *args: Any, **kwargs: Any) -> Any:
        result = allocate(request_id, *args, **kwargs)
        peak["request"] = max(peak["request"], len(manager.req_to_blocks[request_id]))
        return result

    def get_new_blocks(*args: Any, **kwargs: Any) -> Any:
        result = take(*args, **kwargs)
        peak["pool"] = max(peak["pool"], usable - pool.get_num_free_blocks())
        return result

    manager.allocate_new_blocks, pool.get_new_blocks = allocate_new_blocks, get_new_blocks
    try:
        engine.add_request(tag, {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                          extra_args=xargs))
        steps = 0
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        ttft = time.perf_counter() - start
    finally:
        del manager.allocate_new_blocks, pool.get_new_blocks  # back to the class methods
    return {"peak_blocks": peak["request"], "peak_pool_blocks": peak["pool"], "ttft_s": ttft,
            "steps": steps, "cuts": stats.prefill_compactions - cuts_before}


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # The tiny model's positions are raised above; vLLM checks max_model_len against the
    # config it reads, so this is only needed for a --model with a shorter context.
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    from vllm import LLM

    out = Path(args.out)
    longest = max(args.lengths)
    model = args.model or str(tiny_model(out, longest + 64))
    blocks = cdiv(longest + 64, args.block_size) + 16  # room for `none`'s longest prompt
    llm = LLM(model=model, max_model_len=longest + 64, block_size=args.block_size,
              max_num_batched_tokens=args.chunk, max_num_seqs=4, enforce_eager=True,
              enable_prefix_caching=False, dtype=args.dtype, seed=0,
              num_gpu_blocks_override=blocks)
    vocab = llm.get_tokenizer().vocab_size
    configs: list[tuple[str, dict[str, Any] | None]] = [
        ("none", None),
        (f"{args.policy} prefill_budget {args.budget}",
         {"kv_policy": args.policy, "kv_prefill_budget": args.budget,
          "kv_window": args.window})]
    rows = []
    bar = tqdm(total=len(args.lengths) * len(configs), desc="prefill memory", unit="run")
    for length in args.lengths:
        prompt = [(7 + 31 * i) % (vocab - 10) + 5 for i in range(length)]
        for label, xargs in configs:
            row = measure(llm, prompt, xargs, f"{label}-{length}")
            rows.append({"config": label, "prompt_len": length, **row,
                         "bound_blocks": cdiv(args.budget + args.chunk, args.block_size)
                         if xargs else cdiv(length, args.block_size)})
            bar.update()
    bar.close()
    report = {"machine": machine(), "settings": {
        "model": model, "lengths": args.lengths, "budget": args.budget, "chunk": args.chunk,
        "policy": args.policy, "window": args.window, "block_size": args.block_size,
        "dtype": args.dtype}, "rows": rows}
    write_json_csv(out, "prefill_memory", report, rows)
    plot(rows, args, out / "prefill_memory.png")
    return report


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == label]
        lengths = [r["prompt_len"] for r in mine]
        left.plot(lengths, [r["peak_blocks"] for r in mine], marker="o", label=label)
        if any(r["cuts"] for r in mine):
            left.plot(lengths, [r["peak_pool_blocks"] for r in mine], marker="x",
                      linestyle=":", label=f"{label}: pool, with a cut's fresh blocks")
        right.plot(lengths, [r["ttft_s"] for r in mine], marker="o", label=label)
    bound = cdiv(args.budget + args.chunk, args.block_size)
    left.axhline(bound, color="gray", linestyle="--",
                 label=f"cdiv(budget + chunk, {args.block_size})")
    for axis, title in ((left, "peak KV blocks held by the request"),
                        (right, "time to first token (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prompt tokens")
        axis.set_title(title)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_report(report: dict[str, Any]) -> None:
    print(f"{'config':<34} {'prompt':>7} {'peak blocks':>12} {'bound':>6} {'pool peak':>10} "
          f"{'cuts':>5} {'TTFT s':>8}")
    for row in report["rows"]:
        print(f"{row['config']:<34} {row['prompt_len']:>7} {row['peak_blocks']:>12} "
              f"{row['bound_blocks']:>6} {row['peak_pool_blocks']:>10} {row['cuts']:>5} "
              f"{row['ttft_s']:>8.2f}")
