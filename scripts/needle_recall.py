#!/usr/bin/env python
"""Which tokens of a needle's value a policy keeps, layer by layer ("explain every zero").

For the first prompts of one task of a finished ``kvcompress eval`` folder, a plain-transformers
fp32 prefill (``tests/kv_reference.py``'s ``ReferenceModel``, independent of the engine) gives
each layer's post-RoPE queries and keys; each policy then makes its OWN selection at each kept
ratio (the engine's contract: sinks and window kept, one token set per layer in ``shared``
mode), and we report which share of the asked needle value's tokens survives: over the whole
value, its first and last third, per layer (mean and minimum over layers), next to the answers
our engine and kvpress gave on the same prompt (read from the folder's predictions).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/needle_recall.py --run runs/qwen-eval \\
        --task niah_single_uuid --prompts 4 --policies chunkkv snapkv --ratios 0.5 0.25 \\
        --out runs/needle-recall

Writes ``needle_recall.json`` / ``.csv`` / ``.png`` under ``--out`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from kv_reference import ReferenceModel  # noqa: E402

from vllm_kvcompress.bench.artifacts import machine, pyplot, write_json_csv  # noqa: E402
from vllm_kvcompress.config import CompressionSpec, resolve_request  # noqa: E402

#: The eval's parameters (``kvcompress eval`` defaults); each policy takes those it declares.
PARAMS = {"kv_window": 32, "kv_chunk_size": 10, "kv_sink_tokens": 4, "kv_pool_kernel": 5}



def value_span(tokenizer: Any, ids: list[int], offset: int, answer: str) -> list[int]:
    """Token indices of ``answer`` starting at ``offset`` in ``ids``: the shortest run of tokens
    from ``offset`` whose decoded text contains the answer."""
    for end in range(offset + 1, min(offset + 200, len(ids)) + 1):
        if answer in tokenizer.decode(ids[offset:end]):
            return list(range(offset, end))
    raise ValueError(f"answer {answer!r} not found from token {offset}")


def answers_of(run: Path, sample_id: str) -> dict[str, str]:
    """``"<backend> <policy> <ratio>"`` -> answer text, turn 1, default modes."""
    found = {}
    for backend in ("vllm", "kvpress"):
        path = run / f"predictions-{backend}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["id"] == sample_id and int(row.get("turn", 1)) == 1:
                found[f"{backend} {row['policy']} {row['ratio']:g}"] = row["text"].strip()
    return found


def recall(kept: dict[int, list[list[int]]] | None, span: list[int]) -> list[dict[str, float]]:
    """Per layer: share of the span kept (mean over KV heads), of its first and last third."""
    third = max(1, len(span) // 3)
    parts = {"all": span, "head": span[:third], "tail": span[-third:]}
    rows = []
    for layer in sorted(kept or {}):
        heads = [set(h) for h in kept[layer]]
        rows.append({name: mean(sum(t in h for t in part) / len(part) for h in heads)
                     for name, part in parts.items()})
    return rows


def request_spec(policy: str, ratio: float) -> CompressionSpec:
    """The spec a request with the eval's parameters gets (those the policy does not take are
    dropped, as the eval's engine backend does through its per-policy parameters)."""
    xargs = {"kv_policy": policy, "kv_ratio": ratio}
    for key, value in PARAMS.items():
        try:
            resolve_request(CompressionSpec(), {**xargs, key: value})
        except ValueError:
            continue
        xargs[key] = value
    return resolve_request(CompressionSpec(), xargs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="an eval folder (samples.jsonl)")
    ap.add_argument("--model", default=None, help="default: the run's model")
    ap.add_argument("--task", default="niah_single_uuid")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--policies", nargs="+", default=["chunkkv", "snapkv"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.25])
    ap.add_argument("--out", type=Path, default=Path("runs/needle-recall"))
    args = ap.parse_args(argv)
    settings = json.loads((args.run / "settings-vllm.json").read_text())
    model = args.model or settings["model"]
    samples = [json.loads(line) for line in (args.run / "samples.jsonl").read_text().splitlines()]
    samples = [s for s in samples if s["task"] == args.task][:args.prompts]
    if not samples:
        print(f"needle_recall: no {args.task} prompts in {args.run}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = ReferenceModel(model)
    rows: list[dict[str, Any]] = []
    for sample in samples:
        ids = sample["input_ids"]
        span = value_span(tokenizer, ids, sample["needle_offsets"][0], sample["answers"][0])
        inputs = reference.layer_inputs(ids)
        reference.layer_inputs = lambda _ids, inputs=inputs: inputs  # one prefill per prompt
        answers = answers_of(args.run, sample["id"])
        for policy in args.policies:
            for ratio in args.ratios:
                spec = request_spec(policy, ratio)
                per_layer = recall(reference.select(ids, spec), span)
                rows.append({
                    "id": sample["id"], "policy": policy, "ratio": ratio,
                    "span_tokens": len(span),
                    "recall": mean(r["all"] for r in per_layer),
                    "recall_min_layer": min(r["all"] for r in per_layer),
                    "head_third": mean(r["head"] for r in per_layer),
                    "tail_third": mean(r["tail"] for r in per_layer),
                    "per_layer": [round(r["all"], 3) for r in per_layer],
                    "ours": answers.get(f"vllm {policy} {ratio:g}"),
                    "kvpress": answers.get(f"kvpress {policy} {ratio:g}"),
                    "answer": sample["answers"][0]})
        del reference.layer_inputs
        torch.set_num_threads(1)
    report = {"machine": machine(), "model": model, "task": args.task, "params": PARAMS,
              "rows": rows}
    write_json_csv(args.out, "needle_recall", report,
                   [{k: v for k, v in r.items() if k != "per_layer"} for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for policy in args.policies:
        for ratio in args.ratios:
            mine = [r["per_layer"] for r in rows if r["policy"] == policy and r["ratio"] == ratio]
            curve = [mean(col) for col in zip(*mine, strict=True)]
            ax.plot(curve, marker=".", label=f"{policy} {ratio:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the needle value's tokens kept")
    ax.set_title(f"{args.task}: needle value kept per layer ({len(samples)} prompts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "needle_recall.png", dpi=120)
    print("| prompt | policy | kept | value tokens | kept: all / first third / last third "
          "(min layer) | ours | kvpress | answer |")
    print("|---|---|---:|---:|---|---|---|---|")
    for r in rows:
        print(f"| {r['id']} | {r['policy']} | {r['ratio']:g} | {r['span_tokens']} | "
              f"{r['recall']:.2f} / {r['head_third']:.2f} / {r['tail_third']:.2f} "
              f"({r['recall_min_layer']:.2f}) | {r['ours']} | {r['kvpress']} | {r['answer']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
