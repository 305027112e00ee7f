#!/usr/bin/env python
"""Method audit ("explain every zero", issue 23): our scorers vs kvpress's presses on Qwen.

For Expected Attention, SAGE-KV, Q-Filters, KeyDiff, KNorm and SnapKV (the control), on the
eval's own single-needle prompts (``tasks.build_samples``: ``niah_single``, 3072 tokens, depths
0/0.25/0.5/0.75/1, seed 0, the prompts of ``kvcompress eval --tasks niah_single --lengths 3072``):

(a) per layer and KV head, our scorer and kvpress's ``press.score`` on the SAME keys, values,
    queries and hidden states (one Hugging Face forward, captured): Spearman rank correlation
    and top-k overlap over the droppable tokens (sinks and window excluded) at 25% kept;
(b) kept-token overlap: our engine's selection (``VLLM_KVCOMPRESS_RECORD_KEPT``) vs kvpress's
    selection (its ``ScorerPress.compress`` rule: ``topk(int(0.25 L))`` of its scores) and vs
    our own scorer run on the Hugging Face tensors;
(c) needle recall per layer: the fraction of the needle value's tokens kept (ours, kvpress,
    engine);
(d) accuracy at 25% kept, ours (the engine, the eval's own ``engine_backend.run``) and kvpress
    (the eval runner's shared prefill + press replay + greedy decode), same token ids, with
    bootstrap 95% intervals.

Four steps, each resumable, writing under ``--work`` (default ``runs/method-audit``)::

    .venv/bin/python scripts/method_audit.py prompts            # main venv: samples.jsonl
    .kvpress-venv/bin/python scripts/method_audit.py kvpress    # (a), (c), kvpress's (d)
    .venv/bin/python scripts/method_audit.py engine             # our engine: (b), (c), (d)
    .venv/bin/python scripts/method_audit.py report             # JSON, CSV, PNG, markdown

The ``kvpress`` step runs in ``.kvpress-venv`` (kvpress 0.5.5) and imports our policy library
(pure torch) from the repository. kvpress has no SAGE-KV press; its peer here is
``SnapKVPress(window_size=1, kernel_size=1)`` (the last prompt token's attention, averaged over
the query heads of each KV head, top-k per head), which is SAGE-KV's one-shot selection.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "models/qwen2.5-0.5b-instruct"
QFILTERS = "models/qwen2.5-0.5b-instruct.qfilters.safetensors"
WORK = "runs/method-audit"
KEPT_RATIO = 0.25
WINDOW = 32
SINKS = 4
POOL_KERNEL = 5
FUTURE_POSITIONS = 512
LENGTH = 3072
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Methods audited, in report order (the last is the control).
METHODS = ("expected_attention", "sagekv", "qfilters", "keydiff", "knorm", "snapkv")
#: Score-only ablations (not run through the engine): Expected Attention with the statistics of
#: every non-sink prompt query, as kvpress takes them, instead of the window's; KeyDiff with
#: kvpress's press fed float32 keys (it computes in the cache's dtype, bf16 here).
ABLATIONS = ("expected_attention_allq", "keydiff_fp32")
#: kvpress's selection on the same scores (its ScorerPress.compress) drops no extra tokens.
WEIGHTS_NOTE = ("Qwen2.5-Coder-0.5B-Instruct dequantized from the Q4_K_M GGUF (bf16), not the "
                "original bf16 release")


# --------------------------------------------------------------------------- small helpers


def average_ranks(values: Any) -> Any:
    """Ranks of a 1-D numpy array, ties sharing their average rank (for Spearman).

    Args:
        values: ``[n]`` numpy array.

    Returns:
        ``[n]`` float64 ranks in ``0 .. n-1``.
    """
    import numpy as np

    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(values)]))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end - 1) / 2.0
    return ranks


def spearman(first: Any, second: Any) -> float:
    """Spearman rank correlation of two 1-D numpy arrays (average ranks for ties)."""

    a, b = average_ranks(first), average_ranks(second)
    a -= a.mean()
    b -= b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def topk_overlap(first: Any, second: Any, k: int) -> float:
    """``|top_k(first) & top_k(second)| / k`` for two 1-D numpy arrays."""
    import numpy as np

    if k <= 0:
        return float("nan")
    a = set(np.argsort(-first, kind="stable")[:k].tolist())
    b = set(np.argsort(-second, kind="stable")[:k].tolist())
    return len(a & b) / k


def set_overlap(kept: list[int], other: list[int]) -> float:
    """``|kept & other| / |other|``."""
    return len(set(kept) & set(other)) / max(1, len(other))


def needle_recall(kept: list[int], span: tuple[int, int]) -> float:
    """Fraction of the needle value's tokens ``[start, end)`` in ``kept``."""
    tokens = set(range(*span))
    return len(tokens & set(kept)) / len(tokens)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- step 1: prompts


def step_prompts(args: argparse.Namespace) -> None:
    """Builds the eval's niah_single prompts and each needle value's token span."""
    from transformers import AutoTokenizer

    from vllm_kvcompress.eval.tasks import build_samples

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    samples = build_samples(tokenizer, ["niah_single"], [LENGTH], list(DEPTHS),
                            args.per_cell, seed=0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = []
    for sample in samples:
        record = sample.to_json()
        start = sample.needle_offsets[0]
        value = sample.answers[0]
        end = start
        while value not in tokenizer.decode(sample.input_ids[start:end]):
            end += 1
        record["needle_span"] = [start, end]
        lines.append(json.dumps(record))
    (work / "samples.jsonl").write_text("\n".join(lines) + "\n")
    print(f"method_audit: {len(samples)} prompts -> {work / 'samples.jsonl'}")


# --------------------------------------------------------------------------- step 2: kvpress


def _our_scorers(qfilters_path: str) -> dict[str, tuple[Any, Any]]:
    """Method -> (our scorer, its model data) for every audited method and ablation."""
    from vllm_kvcompress.policies.expected_attention import ExpectedAttention
    from vllm_kvcompress.policies.keydiff import KeyDiff
    from vllm_kvcompress.policies.knorm import KeyNorm
    from vllm_kvcompress.policies.qfilters import QFilters, load_filters
    from vllm_kvcompress.policies.sagekv import SageKV
    from vllm_kvcompress.policies.snapkv import SnapKV

    filters = load_filters(qfilters_path)
    return {
        "expected_attention": (ExpectedAttention(FUTURE_POSITIONS), None),
        "expected_attention_allq": (ExpectedAttention(FUTURE_POSITIONS), None),
        "sagekv": (SageKV(1), None),
        "qfilters": (QFilters(), filters),
        "keydiff": (KeyDiff(), None),
        "keydiff_fp32": (KeyDiff(), None),
        "knorm": (KeyNorm(), None),
        "snapkv": (SnapKV(POOL_KERNEL), None),
    }


def _kvpress_presses(qfilters_path: str) -> dict[str, Any]:
    """Method -> kvpress press at 25% kept (compression_ratio 0.75), built as the eval does."""
    import kvpress

    from vllm_kvcompress.eval.kvpress_peer.presses import build_press, press_spec

    params = {"window": WINDOW, "pool_kernel": POOL_KERNEL, "sink_tokens": SINKS,
              "future_positions": FUTURE_POSITIONS, "qfilters_path": qfilters_path}
    presses = {m: build_press(press_spec(m, KEPT_RATIO, params))
               for m in METHODS if m != "sagekv"}
    presses["expected_attention_allq"] = presses["expected_attention"]
    presses["keydiff_fp32"] = presses["keydiff"]
    # SAGE-KV's peer: the last token's attention, per KV head, no pooling.
    presses["sagekv"] = kvpress.SnapKVPress(compression_ratio=1 - KEPT_RATIO, window_size=1,
                                            kernel_size=1)
    return presses


def _capture_queries() -> tuple[dict[int, Any], Any]:
    """Wraps the model's sdpa attention (kvpress's patched one included) to record each
    layer's post-RoPE queries; returns the store and a function restoring the original."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    store: dict[int, Any] = {}
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def capture(module: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        store[module.layer_idx] = query[0].detach()
        return original(module, query, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = capture

    def restore() -> None:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original

    return store, restore


def _observation(layer: int, num_layers: int, keys: Any, values: Any, queries: Any,
                 rotary: Any, model_data: Any, all_queries: bool) -> Any:
    """Our ``LayerObservation`` for one layer (batch 1 tensors, ``[H, L, D]``)."""
    from vllm_kvcompress.policies import LayerObservation

    seq_len = keys.shape[1]
    budget = math.ceil(KEPT_RATIO * seq_len)
    window = seq_len - SINKS if all_queries else WINDOW
    return LayerObservation(
        seq_len=seq_len, budget=seq_len if all_queries else budget, sink_tokens=SINKS,
        window=window, layer_idx=layer, num_layers=num_layers, num_kv_heads=keys.shape[0],
        queries=queries[:, -window:], keys=keys, values=values, model_data=model_data,
        rotary=rotary)


def step_kvpress(args: argparse.Namespace) -> None:
    """(a), (c) and kvpress's (d): one forward per prompt, scores of both sides, then kvpress's
    compressed generation per method (the eval runner's shared prefill and press replay)."""
    import numpy as np
    import torch

    from vllm_kvcompress.eval.kvpress_peer import generation, replay
    from vllm_kvcompress.eval.kvpress_peer.runner import load_model
    from vllm_kvcompress.eval.tasks import score_answer
    from vllm_kvcompress.policies import TopK
    from vllm_kvcompress.policies.rotary import Rotary

    torch.set_num_threads(1)
    work = Path(args.work)
    samples = read_jsonl(work / "samples.jsonl")[: args.limit]
    scores_path, preds_path = work / "scores-kvpress.jsonl", work / "predictions-kvpress.jsonl"
    kept_dir = work / "kept-kvpress"
    kept_dir.mkdir(exist_ok=True)
    done = {r["id"] for r in read_jsonl(preds_path)}
    model, tokenizer = load_model(Path(args.model), args.dtype)
    eos = generation.eos_token_ids(model)
    num_layers = model.config.num_hidden_layers
    rotary = Rotary.from_hf(model, model.config.max_position_embeddings)
    ours = _our_scorers(args.qfilters)
    presses = _kvpress_presses(args.qfilters)
    for sample in samples:
        if sample["id"] in done:
            continue
        ids, span = sample["input_ids"], tuple(sample["needle_span"])
        seq_len = len(ids)
        started = time.perf_counter()
        queries, restore = _capture_queries()
        try:
            shared = replay.shared_prefill(model, ids)
        finally:
            restore()
        n_kept_ours = math.ceil(KEPT_RATIO * seq_len)
        n_kept_kvpress = runner_n_kept(seq_len)
        middle = slice(SINKS, seq_len - WINDOW)
        k_middle = n_kept_ours - SINKS - WINDOW
        kept_arrays: dict[str, Any] = {}
        for method, (scorer, model_data) in ours.items():
            press = presses[method]
            policy = TopK(scorer, head_select="per_head")
            rows = []
            kept_ours_all, kept_kvpress_all = [], []
            with torch.inference_mode(), press(model):
                for call in shared.calls:
                    layer = call.module.layer_idx
                    keys, values = call.keys[0], call.values[0]
                    obs = _observation(layer, num_layers, keys, values, queries[layer], rotary,
                                       model_data, method.endswith("_allq"))
                    our_scores = scorer.score(obs).float()
                    cast = (lambda t: t.float()) if method.endswith("_fp32") else (lambda t: t)
                    kv_scores = press.score(call.module, call.kwargs["hidden_states"],
                                            cast(call.keys), cast(call.values), None,
                                            call.kwargs)[0]
                    kvpress_kept = kv_scores.topk(n_kept_kvpress, dim=-1).indices.sort(-1).values
                    if method.endswith("_allq"):  # select with the usual sinks and window
                        obs = _observation(layer, num_layers, keys, values, queries[layer],
                                           rotary, model_data, False)
                    our_kept = policy.select(obs, our_scores)
                    ours_np = our_scores.numpy()
                    kv_np = kv_scores.float().numpy()
                    for head in range(keys.shape[0]):
                        a, b = ours_np[head, middle], kv_np[head, middle]
                        mine, theirs = our_kept[head].tolist(), kvpress_kept[head].tolist()
                        rows.append({
                            "layer": layer, "head": head,
                            "spearman": spearman(a, b),
                            "topk_overlap": topk_overlap(a, b, k_middle),
                            "kept_overlap": set_overlap(mine, theirs),
                            "needle_recall_ours": needle_recall(mine, span),
                            "needle_recall_kvpress": needle_recall(theirs, span),
                        })
                    kept_ours_all.append(our_kept.numpy().astype(np.int16))
                    kept_kvpress_all.append(kvpress_kept.numpy().astype(np.int16))
            kept_arrays[f"{method}/ours"] = np.stack(kept_ours_all)
            kept_arrays[f"{method}/kvpress"] = np.stack(kept_kvpress_all)
            append_jsonl(scores_path, {"id": sample["id"], "method": method,
                                       "seq_len": seq_len, "needle_span": list(span),
                                       "rows": rows})
        np.savez_compressed(kept_dir / f"{sample['id']}.npz", **kept_arrays)
        # kvpress's accuracy (d): the eval runner's replay + greedy decode, per press.
        for method in ("none", *METHODS):
            press = None if method == "none" else presses[method]
            result = replay.generate_shared(model, press, shared, sample["max_tokens"], eos)
            text = tokenizer.decode(result["output_ids"], skip_special_tokens=True)
            append_jsonl(preds_path, {
                "id": sample["id"], "policy": method, "backend": "kvpress",
                "ratio": 1.0 if method == "none" else KEPT_RATIO, "text": text,
                "score": score_answer(text, sample["answers"], sample["match"]),
                "kept_tokens": result["kept_tokens"], "prompt_tokens": seq_len,
                "peer": "SnapKVPress(window_size=1, kernel_size=1)" if method == "sagekv"
                else None})
        del shared
        print(f"method_audit kvpress: {sample['id']} done in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def runner_n_kept(seq_len: int) -> int:
    """kvpress's kept count at our ratio (``compute_n_kept``: ``int(L * (1 - cr))``)."""
    return max(1, int(seq_len * (1 - (1 - KEPT_RATIO))))


# --------------------------------------------------------------------------- step 3: engine


def step_engine(args: argparse.Namespace) -> None:
    """Our engine on the same prompts (the eval's ``engine_backend.run``, prefix reuse on),
    recording every compaction's kept indices; writes predictions and kept indices."""

    os.environ["VLLM_KVCOMPRESS_RECORD_KEPT"] = "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import vllm

    from vllm_kvcompress.eval import engine_backend
    from vllm_kvcompress.eval.engine_backend import config_key
    from vllm_kvcompress.eval.tasks import EvalSample, score_answer

    work = Path(args.work)
    records = read_jsonl(work / "samples.jsonl")[: args.limit]
    samples = [EvalSample(id=r["id"], task=r["task"], length=r["length"], depth=r["depth"],
                          input_ids=r["input_ids"], answers=r["answers"], match=r["match"],
                          max_tokens=r["max_tokens"], needle_offsets=r["needle_offsets"])
               for r in records]
    methods = args.methods or list(METHODS)
    configs = [config_key(m, KEPT_RATIO, "per_head") for m in methods]
    # Request files are named relative to the operator's allowed directory (issue 22's
    # admission); engine_backend.operator_settings allows the file's folder but its requests
    # send the path as given, so send the bare name and allow its folder here.
    qfilters = Path(args.qfilters).resolve()
    params = {"window": WINDOW, "pool_kernel": POOL_KERNEL, "sink_tokens": SINKS,
              "future_positions": FUTURE_POSITIONS, "qfilters_path": qfilters.name}
    engine_backend.operator_settings = lambda _params: {
        "kvcompress": {"allowed_file_dir": str(qfilters.parent)}}
    engines: list[Any] = []
    original = vllm.LLM

    class RecordingLLM(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            engines.append(self)

    raw = work / "engine-raw.jsonl"
    kept_dir = work / "kept-engine"
    kept_dir.mkdir(exist_ok=True)
    # Groups of prompts, one engine each: every group's kept indices are saved when it ends.
    for start in range(0, len(samples), args.group):
        group = samples[start:start + args.group]
        engines.clear()
        vllm.LLM = RecordingLLM
        try:
            engine_backend.run(group, configs, params, args.model, raw, dtype=args.dtype)
        finally:
            vllm.LLM = original
        if engines:
            _save_engine_kept(engines[0], kept_dir)
        engines.clear()
        gc.collect()
    by_id = {s.id: s for s in samples}
    preds = work / "predictions-engine.jsonl"
    lines = []
    for row in read_jsonl(raw):
        sample = by_id.get(row["id"])
        if sample is None:
            continue
        lines.append(json.dumps({
            "id": row["id"], "policy": row["policy"], "backend": "engine",
            "ratio": row["ratio"], "text": row["text"],
            "score": score_answer(row["text"], sample.answers, sample.match),
            "kept_tokens": row["kept_tokens"], "prompt_tokens": row["prompt_tokens"]}))
    preds.write_text("\n".join(lines) + "\n")
    print(f"method_audit engine: {len(lines)} predictions -> {preds}")


def _save_engine_kept(llm: Any, kept_dir: Path) -> None:
    """Writes the engine's recorded kept indices, ``[layers, kv_heads, kept]`` per policy, one
    ``.npz`` per prompt (merged with what is already there)."""
    import numpy as np

    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    by_sample: dict[str, dict[str, Any]] = {}
    for request_id, layers in runner._kvcompress.kept_log.items():
        sample_id, policy = request_id.split("|")[:2]
        stacked = np.stack([np.asarray(layers[layer], dtype=np.int16) for layer in sorted(layers)])
        by_sample.setdefault(sample_id, {})[policy] = stacked
    for sample_id, arrays in by_sample.items():
        path = kept_dir / f"{sample_id}.npz"
        if path.exists():
            arrays = {**dict(np.load(path)), **arrays}
        np.savez_compressed(path, **arrays)


# --------------------------------------------------------------------------- step 4: report


def _median(values: list[float]) -> float:
    import numpy as np

    clean = [v for v in values if v == v]
    return float(np.median(clean)) if clean else float("nan")


def step_report(args: argparse.Namespace) -> None:
    """Summaries (JSON, CSV), the per-layer plot and the markdown tables."""
    import numpy as np

    from vllm_kvcompress.eval.stats import bootstrap_ci, paired_bootstrap_ci

    work = Path(args.work)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = {r["id"]: r for r in read_jsonl(work / "samples.jsonl")}
    score_rows = read_jsonl(work / "scores-kvpress.jsonl")
    methods = [*METHODS, *ABLATIONS]
    # Per method and layer, over prompts and KV heads.
    per_layer: dict[str, dict[int, dict[str, list[float]]]] = {}
    for record in score_rows:
        layers = per_layer.setdefault(record["method"], {})
        for row in record["rows"]:
            cell = layers.setdefault(row["layer"], {})
            for key in ("spearman", "topk_overlap", "kept_overlap", "needle_recall_ours",
                        "needle_recall_kvpress"):
                cell.setdefault(key, []).append(row[key])
    # (b) engine vs kvpress and vs our scorer on the HF tensors; engine needle recall.
    engine_stats: dict[str, dict[str, list[float]]] = {}
    for sample_id, sample in samples.items():
        kvpress_path = work / "kept-kvpress" / f"{sample_id}.npz"
        engine_path = work / "kept-engine" / f"{sample_id}.npz"
        if not (kvpress_path.exists() and engine_path.exists()):
            continue
        kvpress_kept, engine_kept = np.load(kvpress_path), np.load(engine_path)
        span = tuple(sample["needle_span"])
        for method in METHODS:
            if method not in engine_kept.files or f"{method}/kvpress" not in kvpress_kept.files:
                continue
            engine = engine_kept[method]
            theirs, mine = kvpress_kept[f"{method}/kvpress"], kvpress_kept[f"{method}/ours"]
            stats = engine_stats.setdefault(method, {})
            for layer in range(engine.shape[0]):
                for head in range(engine.shape[1]):
                    kept = engine[layer, head].tolist()
                    stats.setdefault(f"vs_kvpress/{layer}", []).append(
                        set_overlap(kept, theirs[layer, head].tolist()))
                    stats.setdefault(f"vs_ours_hf/{layer}", []).append(
                        set_overlap(kept, mine[layer, head].tolist()))
                    stats.setdefault(f"recall/{layer}", []).append(needle_recall(kept, span))
    # (d) accuracy.
    preds = read_jsonl(work / "predictions-kvpress.jsonl") + \
        read_jsonl(work / "predictions-engine.jsonl")
    accuracy: dict[tuple[str, str], dict[str, float]] = {}
    # Side by side on the same prompts: those both backends finished (either alone otherwise).
    finished = [{p["id"] for p in preds if p["backend"] == backend} for backend in
                ("engine", "kvpress")]
    common = (finished[0] & finished[1]) or finished[0] or finished[1]
    for backend in ("engine", "kvpress"):
        for method in ("none", *METHODS):
            scores = {p["id"]: p["score"] for p in preds if p["backend"] == backend
                      and p["policy"] == method and p["id"] in common}
            if scores:
                accuracy[(backend, method)] = scores
    summary: dict[str, Any] = {"weights": WEIGHTS_NOTE, "kept_ratio": KEPT_RATIO,
                               "window": WINDOW, "sink_tokens": SINKS, "methods": {}}
    csv_lines = ["method,layer,spearman_median,topk_overlap_mean,kept_overlap_mean,"
                 "needle_recall_ours,needle_recall_kvpress,engine_vs_kvpress,"
                 "engine_vs_ours_hf,needle_recall_engine"]
    for method in methods:
        layers = per_layer.get(method, {})
        if not layers:
            continue
        stats = engine_stats.get(method, {})
        entry: dict[str, Any] = {"layers": []}
        for layer in sorted(layers):
            cell = layers[layer]
            row = {
                "layer": layer,
                "spearman_median": _median(cell["spearman"]),
                "topk_overlap_mean": float(np.mean(cell["topk_overlap"])),
                "kept_overlap_mean": float(np.mean(cell["kept_overlap"])),
                "needle_recall_ours": float(np.mean(cell["needle_recall_ours"])),
                "needle_recall_kvpress": float(np.mean(cell["needle_recall_kvpress"])),
                "engine_vs_kvpress": _mean_or_nan(stats.get(f"vs_kvpress/{layer}")),
                "engine_vs_ours_hf": _mean_or_nan(stats.get(f"vs_ours_hf/{layer}")),
                "needle_recall_engine": _mean_or_nan(stats.get(f"recall/{layer}")),
            }
            entry["layers"].append(row)
            csv_lines.append(",".join([method] + [f"{row[k]:.4f}" if isinstance(row[k], float)
                                                  else str(row[k]) for k in list(row)]))
        all_rows = [r for rec in score_rows if rec["method"] == method for r in rec["rows"]]
        entry["overall"] = {
            "prompts": len({rec["id"] for rec in score_rows if rec["method"] == method}),
            "spearman_median": _median([r["spearman"] for r in all_rows]),
            "spearman_min_layer": min(r["spearman_median"] for r in entry["layers"]),
            "topk_overlap_mean": float(np.mean([r["topk_overlap"] for r in all_rows])),
            "kept_overlap_mean": float(np.mean([r["kept_overlap"] for r in all_rows])),
            "needle_recall_ours": float(np.mean([r["needle_recall_ours"] for r in all_rows])),
            "needle_recall_kvpress": float(np.mean([r["needle_recall_kvpress"]
                                                    for r in all_rows])),
            "engine_vs_kvpress": _mean_or_nan([v for k, vs in stats.items()
                                               if k.startswith("vs_kvpress/") for v in vs]),
            "engine_vs_ours_hf": _mean_or_nan([v for k, vs in stats.items()
                                               if k.startswith("vs_ours_hf/") for v in vs]),
            "needle_recall_engine": _mean_or_nan([v for k, vs in stats.items()
                                                  if k.startswith("recall/") for v in vs]),
        }
        for backend in ("engine", "kvpress"):
            scores = accuracy.get((backend, method.removesuffix("_allq")))
            if scores and not method.endswith("_allq"):
                mean, low, high = _ci(list(scores.values()), bootstrap_ci)
                entry[f"accuracy_{backend}"] = {"n": len(scores), "mean": mean,
                                                "ci95": [low, high]}
        ours, theirs = accuracy.get(("engine", method)), accuracy.get(("kvpress", method))
        if ours and theirs and not method.endswith("_allq"):
            paired = sorted(set(ours) & set(theirs))
            first, second = [ours[i] for i in paired], [theirs[i] for i in paired]
            diff = paired_bootstrap_ci(first, second)
            entry["accuracy_diff_ours_minus_kvpress"] = {
                "n": len(paired), "mean": (sum(first) - sum(second)) / len(paired),
                "ci95": _jsonable(diff)}
        summary["methods"][method] = entry
    for backend in ("engine", "kvpress"):
        scores = accuracy.get((backend, "none"))
        if scores:
            mean, low, high = _ci(list(scores.values()), bootstrap_ci)
            summary[f"full_kv_{backend}"] = {"n": len(scores), "mean": mean, "ci95": [low, high]}
    (out_dir / "method-audit.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "method-audit.csv").write_text("\n".join(csv_lines) + "\n")
    _plot(summary, out_dir / "method-audit.png")
    print(_markdown(summary))


def _mean_or_nan(values: list[float] | None) -> float:
    import numpy as np

    return float(np.mean(values)) if values else float("nan")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return float(value) if isinstance(value, int | float) else value


def _ci(scores: list[float], bootstrap: Any) -> tuple[float, float, float]:
    """Mean and bootstrap 95% interval, whatever shape ``bootstrap_ci`` returns."""
    result = bootstrap(scores)
    mean = sum(scores) / len(scores)
    if isinstance(result, dict):
        low, high = result.get("low", result.get("ci", [None, None])[0]), \
            result.get("high", result.get("ci", [None, None])[1])
    else:
        low, high = result[-2], result[-1]
    return mean, float(low), float(high)


def _plot(summary: dict[str, Any], path: Path) -> None:
    """Per-layer median Spearman (ours vs kvpress) and needle recall, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    for method, entry in summary["methods"].items():
        layers = [r["layer"] for r in entry["layers"]]
        line, = left.plot(layers, [r["spearman_median"] for r in entry["layers"]],
                          marker="o", ms=3, label=method)
        right.plot(layers, [r["needle_recall_ours"] for r in entry["layers"]], marker="o",
                   ms=3, color=line.get_color(), label=f"{method} (ours)")
        right.plot(layers, [r["needle_recall_kvpress"] for r in entry["layers"]], ls="--",
                   color=line.get_color())
    left.set(xlabel="layer", ylabel="Spearman, ours vs kvpress (median over heads, prompts)",
             title="(a) same keys/queries: score rank correlation")
    left.axhline(1.0, color="grey", lw=0.5)
    right.set(xlabel="layer", ylabel="needle value tokens kept (mean)",
              title="(c) needle recall at 25% kept: ours solid, kvpress dashed")
    left.legend(fontsize=7)
    fig.suptitle(f"Method audit on {WEIGHTS_NOTE}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _markdown(summary: dict[str, Any]) -> str:
    """The tables for docs/method-audit.md."""

    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None or value != value else f"{value:.{digits}f}"

    def acc(entry: dict[str, Any] | None) -> str:
        if not entry:
            return "-"
        low, high = entry["ci95"]
        return f"{entry['mean']:.2f} [{low:.2f}, {high:.2f}] (n={entry['n']})"

    def diff(entry: dict[str, Any] | None) -> str:
        if not entry or entry["ci95"] is None:
            return "-"
        low, high = entry["ci95"]
        return f"{entry['mean']:+.2f} [{low:+.2f}, {high:+.2f}]"

    lines = ["| method | Spearman median (min layer) | top-k overlap | kept overlap | "
             "needle recall ours / kvpress / engine | engine vs kvpress | engine vs ours-HF | "
             "accuracy ours | accuracy kvpress | ours - kvpress (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, entry in summary["methods"].items():
        o = entry["overall"]
        lines.append(
            f"| {method} | {fmt(o['spearman_median'], 3)} ({fmt(o['spearman_min_layer'], 3)}) | "
            f"{fmt(o['topk_overlap_mean'])} | {fmt(o['kept_overlap_mean'])} | "
            f"{fmt(o['needle_recall_ours'])} / {fmt(o['needle_recall_kvpress'])} / "
            f"{fmt(o['needle_recall_engine'])} | {fmt(o['engine_vs_kvpress'])} | "
            f"{fmt(o['engine_vs_ours_hf'])} | {acc(entry.get('accuracy_engine'))} | "
            f"{acc(entry.get('accuracy_kvpress'))} | "
            f"{diff(entry.get('accuracy_diff_ours_minus_kvpress'))} |")
    lines.append("")
    lines.append(f"full KV: ours {acc(summary.get('full_kv_engine'))}, kvpress "
                 f"{acc(summary.get('full_kv_kvpress'))}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("prompts", "kvpress", "engine", "report"))
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--qfilters", default=QFILTERS)
    parser.add_argument("--work", default=WORK, help="intermediate files (resumable)")
    parser.add_argument("--out", default="docs/img", help="report: JSON, CSV and PNG folder")
    parser.add_argument("--per-cell", type=int, default=4, help="prompts per depth (prompts)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--methods", nargs="+", default=None, help="engine: methods to run")
    parser.add_argument("--group", type=int, default=5, help="engine: prompts per engine")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"prompts": step_prompts, "kvpress": step_kvpress, "engine": step_engine,
     "report": step_report}[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
