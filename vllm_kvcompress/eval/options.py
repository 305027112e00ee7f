"""``kvcompress eval``'s options: the command line, its checks (each error names the option,
before minutes of prompt building) and the policy parameters it gives the backends."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..policies.chunkkv import CHUNK_SIZE
from ..policies.params import COMMON_PARAMS
from .configs import (
    DEFAULT_HEAD_SELECT,
    DEFAULT_MODE,
    HEAD_SELECT,
    QUERY_AWARE,
    SETTINGS,
    head_select_supported,
)
from .stats import RESAMPLES
from .store import BACKENDS, Store
from .tasks import TASKS

POLICIES = ("streamingllm", "snapkv", "chunkkv", "pyramidkv")
RATIOS = (1.0, 0.5, 0.25, 0.1, 0.05)
#: The server's defaults, declared once in the policy layer: the eval measures what a server
#: runs unless told otherwise.
_COMMON_DEFAULTS = {p.name: p.default for p in COMMON_PARAMS}
#: ChunkKV's chunk grids (the policy layer's ``chunk_grid``).
CHUNK_GRIDS = ("after_sinks", "from_zero")


def qfilters_file(model: str) -> Path:
    """Where `make models` writes a model's Q-Filters: next to its folder, not inside (vLLM
    loads every ``*.safetensors`` in the folder as weights)."""
    folder = Path(model)
    return folder.with_name(folder.name + ".qfilters.safetensors")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/smollm2", help="model folder")
    parser.add_argument("--out", default="runs/eval",
                        help="the results store (shared by backends; runs extend it)")
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
    parser.add_argument("--setting", nargs="+", default=[QUERY_AWARE], choices=SETTINGS,
                        help="query_aware: the question is in the prompt when it is compressed; "
                        "query_agnostic: the context is compressed before the question exists "
                        "(then the question is prefilled on the compressed cache); each "
                        "configuration runs in every one listed")
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
    parser.add_argument("--prefill-variant", action="store_true",
                        help="vllm backend, query-aware: also run every policy that can "
                        "compress while prefilling (its default mode) with kv_prefill_budget "
                        "set to what its ratio keeps of the prompt (variant prefill): the same "
                        "final budget, chosen chunk by chunk (chunks of "
                        "--max-num-batched-tokens)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192,
                        help="vllm backend: the engine's prefill chunk (tokens per step)")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many samples per task, spread over the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=RESAMPLES,
                        help="bootstrap resamples of the 95%% intervals (fixed seed)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--window", type=int, default=_COMMON_DEFAULTS["window"])
    parser.add_argument("--pool-kernel", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE.default,
                        help="chunkkv: tokens per chunk (default: the server's, %(default)s)")
    parser.add_argument("--sink-tokens", type=int, default=_COMMON_DEFAULTS["sink_tokens"])
    parser.add_argument("--future-positions", type=int, default=512,
                        help="expected_attention: future positions its RoPE average covers")
    parser.add_argument("--kvzip-chunk-size", type=int, default=None,
                        help="kvzip: context tokens per reconstruction pass (kv_kvzip_chunk_size; "
                        "kvpress: KVzipPress's chunk_size); default: the engine's, 2048, "
                        "kvpress's too")
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
                        help="discard this backend's earlier predictions instead of extending "
                        "them (the store keeps every row whose prompt and settings match)")
    parser.add_argument("--report-only", action="store_true",
                        help="grade and plot what the output folder holds; run nothing")
    parser.add_argument("--merge-from", nargs="+", default=None, metavar="FOLDER",
                        help="add the rows of other results stores (runs made apart: another "
                        "machine, session or copy) that mean the same in --out, then report; "
                        "runs nothing")


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
    kvzip_chunk_size = getattr(args, "kvzip_chunk_size", None)
    if kvzip_chunk_size is not None and kvzip_chunk_size < 1:
        raise ValueError(f"--kvzip-chunk-size: {args.kvzip_chunk_size} is below 1")
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
    if getattr(args, "prefill_variant", False):
        if args.backend != "vllm":
            raise ValueError("--prefill-variant: kvpress has no compression while prefilling; "
                             "the option is for the vllm backend")
        if args.setting != [QUERY_AWARE]:
            raise ValueError("--prefill-variant: runs with --setting query_aware only (a "
                             "context compressed for reuse is not cut while prefilling)")
        if not getattr(args, "fresh", False) and not getattr(args, "report_only", False):
            stored = (Store(Path(args.out)).settings("vllm") or {}).get("prefill_chunk")
            check_prefill_chunk(getattr(args, "max_num_batched_tokens", None), stored, args.out)
    if getattr(args, "max_num_batched_tokens", 8192) < 32:
        raise ValueError(f"--max-num-batched-tokens: {args.max_num_batched_tokens} is below "
                         "32 tokens")
    for folder in getattr(args, "merge_from", None) or []:
        if not (Path(folder) / "samples.jsonl").is_file():
            raise ValueError(f"--merge-from: {folder} is not a results store (no samples.jsonl)")
        if Path(folder).resolve() == Path(args.out).resolve():
            raise ValueError(f"--merge-from: {folder} is --out itself")
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
    if len(set(args.setting)) != len(args.setting):
        raise ValueError(f"--setting: {args.setting} lists a setting twice")
    if (args.backend == "vllm" and not args.report_only
            and set(args.head_select) - {DEFAULT_HEAD_SELECT, DEFAULT_MODE}
            and not head_select_supported()):
        raise ValueError("--head-select per_head: this build's policy layer has no head_select "
                         "setting (kv_head_select) yet; run --head-select shared")



def run_params(args: argparse.Namespace) -> dict[str, Any]:
    """The policy parameters every request of the run gets (``kv_*`` extra args; the peer's
    press parameters): the window and selection parameters, and the parameters of the methods
    the run has (ChunkKV's grid when set, Expected Attention's positions, Q-Filters' file,
    KVzip's chunk size when set)."""
    params = {"window": args.window, "pool_kernel": args.pool_kernel,
              "chunk_size": args.chunk_size, "sink_tokens": args.sink_tokens}
    if getattr(args, "chunk_grid", None) is not None:
        params["chunk_grid"] = args.chunk_grid
    if "expected_attention" in args.policies:
        params["future_positions"] = args.future_positions
    if "qfilters" in args.policies:
        params["qfilters_path"] = args.qfilters
    # Only when set: unset, both backends use 2048 and the results store's keys of kvzip
    # configurations stay those of runs made before the option existed.
    if "kvzip" in args.policies and getattr(args, "kvzip_chunk_size", None) is not None:
        params["kvzip_chunk_size"] = args.kvzip_chunk_size
    return params


def check_prefill_chunk(chunk: int | None, stored: int | None, out: Any) -> None:
    """One store holds one prefill chunk (a ``prefill`` row's key does not name the chunk it was
    cut at: naming it would re-key every stored prefill row).

    Args:
        chunk: this run's ``--max-num-batched-tokens``.
        stored: the chunk the store's prefill rows were cut at, or None when it has none.
        out: the store's folder, for the message.

    Raises:
        ValueError: ``chunk`` is another than ``stored``.
    """
    if stored is not None and chunk != stored:
        raise ValueError(f"--max-num-batched-tokens {chunk}: the prefill rows in {out} "
                         f"were cut after every {stored} tokens; use {stored}, or another --out")
