"""`kvcompress bench kernels`: the compression step per layer, per implementation.

For each model shape (``bench.shapes``) and prompt length, on one layer's paged cache in the
FLASH_ATTN layout (bf16, block size 16 on GPU, 128 on CPU), times:

* scoring: window attention mass of the last ``window`` queries over all keys;
* selection: ChunkKV chunk aggregation + ranking;
* compaction: moving the kept tokens (ratio 0.25) into fresh blocks;
* two baselines measured in the same run: a plain copy of the same bytes (the device's copy
  bandwidth) and the layer's causal prefill attention (``scaled_dot_product_attention``).

Implementations: the torch reference everywhere; the Triton kernels where a CUDA device exists;
``cuda`` where the CUDA C++ compaction (``csrc/``) builds (that row times the C++ compaction with
Triton's scoring and selection). Reports time per layer and per request (x layers), compaction
GB/s vs copy GB/s, scoring as a share of prefill attention, and the speed-up over torch. Writes
``kernels.json``, ``kernels.csv`` and ``kernels.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..engine.cpu_paged_cache import row_slots
from ..engine.flash_paged_cache import FlashLayoutCache
from ..policies import chunk_select, pool_scores, window_attention_scores
from .artifacts import machine, pyplot, write_json_csv
from .shapes import MODEL_SHAPES, ModelShape

RATIO, WINDOW, CHUNK, SINKS = 0.25, 32, 10, 4
CUDA_CALLS_PER_SAMPLE = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median seconds per call of ``fn`` over ``reps`` samples after one warm-up.

    On CUDA a sample is ``CUDA_CALLS_PER_SAMPLE`` back-to-back calls and one synchronisation,
    divided by the calls: a host sync per call would add its own ~10 us to kernels that take a
    few microseconds (the engine launches them back to back too). On CPU one call per sample.
    """
    calls = CUDA_CALLS_PER_SAMPLE if device.type == "cuda" else 1
    fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def bench_case(shape: ModelShape, seq_len: int, device: torch.device, reps: int,
               impls: list[str]) -> list[dict[str, Any]]:
    """All measurements for one (shape, length); one row per implementation."""
    block_size = 16 if device.type == "cuda" else 128
    dtype = torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    n_blocks = -(-seq_len // block_size)
    kept = int(RATIO * seq_len)
    n_dst = -(-kept // block_size)
    cache = torch.randn(n_blocks + n_dst + 1, shape.num_kv_heads, block_size,
                        2 * shape.head_dim, generator=gen).to(dtype).to(device)
    src = torch.arange(1, n_blocks + 1, device=device)
    dst = torch.arange(n_blocks + 1, n_blocks + 1 + n_dst, device=device)
    queries = torch.randn(shape.num_q_heads, WINDOW, shape.head_dim, generator=gen).to(
        dtype).to(device)
    access = FlashLayoutCache()
    keys, values = access.read(cache, src, seq_len)
    scores = pool_scores(window_attention_scores(queries, keys).sum(0), 5)
    kept_idx = chunk_select(scores, kept, SINKS, WINDOW, CHUNK)
    src_slots = row_slots(src, seq_len, block_size).to(device)[kept_idx.to(device)]
    dst_slots = row_slots(dst, kept, block_size).to(device)
    # Useful traffic of a compaction: read the kept tokens' K and V once, write them once.
    kept_bytes = kept * shape.num_kv_heads * 2 * shape.head_dim * cache.element_size()
    blob = torch.empty(kept_bytes // cache.element_size(), dtype=dtype, device=device)
    out = torch.empty_like(blob)
    copy_s = timed(lambda: out.copy_(blob), device, reps)
    q_full = torch.randn(1, shape.num_q_heads, seq_len, shape.head_dim, generator=gen).to(
        dtype).to(device)
    # K/V expanded to the query heads rather than ``enable_gqa``: a backend without GQA support
    # would fall back to the math path, which materialises [heads, L, L] (a terabyte at 128k).
    group = shape.num_q_heads // shape.num_kv_heads
    k_full = keys.repeat_interleave(group, dim=0).unsqueeze(0)
    v_full = values.repeat_interleave(group, dim=0).unsqueeze(0)
    attention_s = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q_full, k_full, v_full, is_causal=True), device, reps)
    rows = []
    for impl in impls:
        if impl == "torch":
            def score() -> Any:
                k, _ = access.read(cache, src, seq_len)
                return window_attention_scores(queries, k)

            def select() -> Any:
                return chunk_select(scores, kept, SINKS, WINDOW, CHUNK)

            def compact() -> None:
                k, v = access.read(cache, src, seq_len)
                access.write(cache, k[:, kept_idx], v[:, kept_idx], dst_slots)
        else:
            from ..kernels.chunk_select import chunk_means_triton, stable_descending_order
            from ..kernels.compaction import compact_paged
            from ..kernels.window_scores import paged_window_scores

            def score() -> Any:
                return paged_window_scores(queries, cache, src, seq_len)

            def select() -> Any:
                return chunk_select(scores, kept, SINKS, WINDOW, CHUNK,
                                    aggregate=chunk_means_triton, order=stable_descending_order)

            if impl == "cuda":
                from ..kernels.cuda_ext import compact_paged as compact_paged_cuda

                def compact() -> None:
                    compact_paged_cuda(cache, src_slots, dst_slots, in_place=False)
            else:
                def compact() -> None:
                    compact_paged(cache, src_slots, dst_slots, in_place=False)
        score_s = timed(score, device, reps)
        select_s = timed(select, device, reps)
        compact_s = timed(compact, device, reps)
        rows.append({
            "model": shape.name, "seq_len": seq_len, "impl": impl, "device": str(device),
            "score_ms": score_s * 1e3, "select_ms": select_s * 1e3,
            "compact_ms": compact_s * 1e3,
            "layer_ms": (score_s + select_s + compact_s) * 1e3,
            "request_ms": (score_s + select_s + compact_s) * 1e3 * shape.num_layers,
            "compact_gbps": 2 * kept_bytes / compact_s / 1e9,
            "copy_gbps": 2 * kept_bytes / copy_s / 1e9,
            "prefill_attention_ms": attention_s * 1e3,
            "score_share_of_attention": score_s / attention_s,
        })
    for row in rows:
        row["compact_vs_copy"] = row["compact_gbps"] / row["copy_gbps"]
    torch_row = next(r for r in rows if r["impl"] == "torch")
    for row in rows:
        row["speedup_vs_torch"] = torch_row["layer_ms"] / row["layer_ms"]
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impls = ["torch"]
    if device.type == "cuda":
        from ..kernels.cuda_ext import load

        impls += ["triton", "cuda"] if load() is not None else ["triton"]
    lengths = args.lengths or ([4096, 16384, 65536, 131072] if device.type == "cuda"
                               else [4096, 8192])
    shapes = [MODEL_SHAPES[name] for name in args.models]
    rows: list[dict[str, Any]] = []
    cases = [(s, n) for s in shapes for n in lengths]
    failed = []
    for shape, seq_len in tqdm(cases, desc=f"kernel benchmark on {device.type}"):
        try:
            rows += bench_case(shape, seq_len, device, args.reps, impls)
        except torch.OutOfMemoryError as err:  # one case too big must not lose the others
            failed.append(f"{shape.name} @ {seq_len}: out of memory ({str(err)[:80]})")
            print(f"kvcompress bench kernels: {failed[-1]}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    info = machine()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    report = {"machine": info, "command": "kvcompress " + " ".join(sys.argv[1:]),
              "device": device.type,
              "ratio": RATIO, "window": WINDOW, "chunk_size": CHUNK, "rows": rows,
              "failed": failed,
              "note": None if device.type == "cuda" else
              "no CUDA device: torch reference only; Triton kernels are not timed on CPU"}
    out = Path(args.out)
    write_json_csv(out, "kernels", report, rows)
    _plot(report, out / "kernels.png")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for (model, impl) in sorted({(r["model"], r["impl"]) for r in rows}):
        mine = [r for r in rows if r["model"] == model and r["impl"] == impl]
        lens = [r["seq_len"] for r in mine]
        axes[0].plot(lens, [r["layer_ms"] for r in mine], marker="o", label=f"{model} ({impl})")
        axes[1].plot(lens, [100 * r["score_share_of_attention"] for r in mine], marker="o",
                     label=f"{model} ({impl})")
    axes[0].set(xscale="log", yscale="log", xlabel="prompt tokens",
                ylabel="score + select + compact, ms / layer")
    axes[1].axhline(5, color="red", linestyle="--", label="target 5%")
    axes[1].set(xscale="log", yscale="log", xlabel="prompt tokens",
                ylabel="scoring / prefill attention, %")
    for ax in axes:
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"compression step per layer on {m.get('gpu', m['cpu'])}, {m['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/bench-kernels")
    parser.add_argument("--models", nargs="+", default=list(MODEL_SHAPES),
                        choices=list(MODEL_SHAPES))
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="prompt lengths (default: 4k-128k on GPU, 4k and 8k on CPU)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nDevice: {report['device']} ({m.get('gpu', m['cpu'])}), {m['date']}")
    if report["note"]:
        print(f"Note: {report['note']}")
    head = (f"{'model':<14}{'tokens':>8}{'impl':>8}{'score':>9}{'select':>9}{'compact':>9}"
            f"{'ms/layer':>10}{'ms/req':>9}{'GB/s':>7}{'vs copy':>8}{'attn %':>8}")
    print(head)
    for r in report["rows"]:
        print(f"{r['model']:<14}{r['seq_len']:>8}{r['impl']:>8}{r['score_ms']:>9.2f}"
              f"{r['select_ms']:>9.2f}{r['compact_ms']:>9.2f}{r['layer_ms']:>10.2f}"
              f"{r['request_ms']:>9.0f}{r['compact_gbps']:>7.1f}{r['compact_vs_copy']:>8.0%}"
              f"{100 * r['score_share_of_attention']:>7.1f}%")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(cli)
    print_report(run(cli.parse_args()))
