"""The ``vllm`` backend of ``kvcompress eval``: the real engine (offline, in process, batched).

Every (sample, policy, ratio) is one request with its policy in ``extra_args``, exactly what a
``vllm_xargs`` request does through the server.

Prefix reuse: with prefix caching on (the default), samples run in groups: first the full-KV
baseline (policy ``none``) of every sample in the group, then every other configuration of the
group in one batch. Those requests hit the prompt's cached, uncompressed blocks and recompute
only the policy's observation window (the engine caps prefix hits so the window gets queries),
then compress as usual. It is the engine's ordinary path for a repeated prompt and saves one full
prefill per configuration; ``--no-prefix-reuse`` prefills every request from scratch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import CompressionSpec
from .tasks import EvalSample

BACKEND = "vllm"


def config_key(policy: str, ratio: float) -> tuple[str, float]:
    """How a configuration is named in files; ``none`` is always ratio 1.0."""
    return (policy, 1.0) if policy == "none" else (policy, float(ratio))


def read_done(path: Path) -> set[tuple[str, str, float]]:
    """(sample id, policy, ratio) triples already in a predictions file (for resuming)."""
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            done.add((row["id"], row["policy"], float(row["ratio"])))
    return done


def _groups(samples: list[EvalSample], max_tokens: int) -> Iterable[list[EvalSample]]:
    """Consecutive samples whose prompts fit ``max_tokens`` together (the cache must hold them
    between the baseline pass and the compressed pass)."""
    group: list[EvalSample] = []
    used = 0
    for sample in samples:
        if group and used + len(sample.input_ids) > max_tokens:
            yield group
            group, used = [], 0
        group.append(sample)
        used += len(sample.input_ids)
    if group:
        yield group


def run(samples: list[EvalSample], configs: list[tuple[str, float]], params: dict[str, Any],
        model: str, out: Path, dtype: str = "float32", prefix_reuse: bool = True,
        group_tokens: int = 40_000) -> Path:
    """Runs every (sample, config) not already in ``out`` and appends one JSON line each.

    Args:
        samples: the prompts (token ids) with their answer lengths.
        configs: (policy, kept ratio); ``("none", 1.0)`` is added if missing (the baseline).
        params: policy parameters shared by all configs (window, pool_kernel, chunk_size,
            sink_tokens), as ``kv_*`` extra args.
        model: model folder.
        out: the predictions JSONL (appended; existing lines are kept and skipped).
        dtype: engine dtype (``float32`` matches the kvpress side).
        prefix_reuse: see the module docstring.
        group_tokens: prompt tokens per group under prefix reuse.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The pool must hold a group's full prompts plus the compressed copies.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    configs = [config_key(p, r) for p, r in configs]
    if ("none", 1.0) not in configs:
        configs.insert(0, ("none", 1.0))
    done = read_done(out)
    todo = [(s, c) for s in samples for c in configs if (s.id, *c) not in done]
    if not todo:
        return out
    max_len = max(len(s.input_ids) + s.max_tokens for s in samples)
    llm = LLM(model=model, max_model_len=max(max_len, 1024), enforce_eager=True, seed=0,
              dtype=dtype, block_size=32, enable_prefix_caching=prefix_reuse,
              max_num_seqs=64, max_num_batched_tokens=8192)
    engine = llm.llm_engine
    bar = tqdm(total=len(todo), desc="eval (vllm-kvcompress)", unit="req")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as sink:
        groups = _groups(samples, group_tokens) if prefix_reuse else [samples]
        for group in groups:
            ids = {s.id for s in group}
            mine = [(s, c) for s, c in todo if s.id in ids]
            baseline = [(s, c) for s, c in mine if c == ("none", 1.0)]
            rest = [(s, c) for s, c in mine if c != ("none", 1.0)]
            for batch in ((baseline, rest) if prefix_reuse else (baseline + rest,)):
                _run_batch(engine, SamplingParams, batch, params, sink, bar)
    bar.close()
    return out


def _run_batch(engine: Any, sampling_params: Any, batch: list[tuple[EvalSample,
               tuple[str, float]]], params: dict[str, Any], sink: Any, bar: tqdm) -> None:
    """Adds the batch's requests and steps the engine until they are all finished."""
    pending: dict[str, tuple[EvalSample, tuple[str, float]]] = {}
    for n, (sample, (policy, ratio)) in enumerate(batch):
        xargs = {"kv_policy": policy}
        if policy != "none":
            xargs.update({"kv_ratio": ratio, **{f"kv_{k}": v for k, v in params.items()}})
        request_id = f"{sample.id}|{policy}|{ratio}|{n}"
        engine.add_request(request_id, {"prompt_token_ids": sample.input_ids},
                           sampling_params(max_tokens=sample.max_tokens, temperature=0.0,
                                           extra_args=xargs))
        pending[request_id] = (sample, (policy, ratio))
    while pending:
        for output in engine.step():
            if not output.finished or output.request_id not in pending:
                continue
            sample, (policy, ratio) = pending.pop(output.request_id)
            spec = CompressionSpec(policy=policy, ratio=None if policy == "none" else ratio,
                                   **({} if policy == "none" else params))
            prompt_tokens = len(sample.input_ids)
            kept = spec.kept_tokens(prompt_tokens)
            completion = output.outputs[0]
            sink.write(json.dumps({
                "id": sample.id, "policy": policy, "ratio": ratio, "text": completion.text,
                "output_ids": list(completion.token_ids), "prompt_tokens": prompt_tokens,
                "kept_tokens": prompt_tokens if kept is None else min(kept, prompt_tokens),
                "finish_reason": completion.finish_reason, "backend": BACKEND}) + "\n")
            sink.flush()
            bar.update(1)
