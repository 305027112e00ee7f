"""Cost of one long-prompt request on this machine: dtype x policy, one request at a time.

Sizes an evaluation grid before it runs: for each dtype it starts one offline vLLM engine
(prefix caching off, so every request prefills its whole prompt), sends the same needle prompts
(``eval/tasks.py``'s ``niah_single``) once per policy, and reports the mean seconds a request
takes (prefill + answer) and how many answers were right. Example::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=4 \\
      .venv/bin/python scripts/request_cost.py --model models/qwen2.5-0.5b-instruct \\
      --out runs/request-cost/qwen2.5-0.5b.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

POLICIES = {"none": {"kv_policy": "none"},
            "chunkkv@0.25": {"kv_policy": "chunkkv", "kv_ratio": 0.25}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--length", type=int, default=3072, help="prompt + answer tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                        help="needle depths: one prompt each")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args()


def _tokens_kept(llm: Any) -> int | None:
    """Prompt tokens the plugin kept so far (in-process engine only; None if unreachable)."""
    try:
        return llm.llm_engine.engine_core.engine_core.scheduler._kvcompress.stats.tokens_kept
    except AttributeError:
        return None


def measure_dtype(args: argparse.Namespace, dtype: str, samples: list[Any]) -> dict[str, Any]:
    """Loads the model in ``dtype`` and times every (policy, prompt) request, one at a time."""
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.eval.tasks import score_answer

    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=dtype, max_model_len=args.length + 256, enforce_eager=True,
              seed=0, block_size=32, enable_prefix_caching=False, max_num_seqs=4)
    load_s = time.perf_counter() - start
    warm = SamplingParams(max_tokens=2, temperature=0.0)
    llm.generate([{"prompt_token_ids": samples[0].input_ids[:256]}], warm, use_tqdm=False)
    rows = []
    for policy in args.policies:
        for sample in samples:
            params = SamplingParams(max_tokens=sample.max_tokens, temperature=0.0,
                                    extra_args=POLICIES[policy])
            kept_before = _tokens_kept(llm)
            start = time.perf_counter()
            output = llm.generate([{"prompt_token_ids": sample.input_ids}], params,
                                  use_tqdm=False)[0].outputs[0]
            seconds = time.perf_counter() - start
            kept = _tokens_kept(llm) - kept_before if kept_before is not None else None
            correct = score_answer(output.text, sample.answers, sample.match)
            rows.append({"dtype": dtype, "policy": policy, "sample": sample.id,
                         "prompt_tokens": len(sample.input_ids), "kept_tokens": kept,
                         "output_tokens": len(output.token_ids), "seconds": round(seconds, 2),
                         "correct": correct, "answer": output.text, "expected": sample.answers})
            print(f"{dtype:>9} {policy:>13} {sample.id:>24} {len(sample.input_ids):>5} tok "
                  f"kept {kept} {seconds:6.1f} s correct={correct:.0f} {output.text!r}",
                  flush=True)
    del llm
    return {"dtype": dtype, "load_seconds": round(load_s, 1), "requests": rows}


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    from vllm_kvcompress.eval.tasks import build_samples

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    samples = build_samples(tokenizer, ["niah_single"], [args.length], args.depths, 1, seed=0)
    runs = [measure_dtype(args, dtype, samples) for dtype in args.dtypes]
    print(f"\n{'dtype':>9} {'policy':>13} {'s/request':>10} {'correct':>8}  (load s)")
    for run in runs:
        for policy in args.policies:
            rows = [r for r in run["requests"] if r["policy"] == policy]
            mean_s = statistics.mean(r["seconds"] for r in rows)
            print(f"{run['dtype']:>9} {policy:>13} {mean_s:>10.1f} "
                  f"{sum(r['correct'] for r in rows):>4.0f}/{len(rows)}  ({run['load_seconds']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "length": args.length,
                                        "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
