"""`kvcompress bench decode-quality`: what decode-time compression costs a long generation.

Every prompt is generated greedily with full KV (``none``) and with ``--policy`` at each
``decode_budget`` (512 / 1,024 / 2,048 by default), ``--max-tokens`` (1,024) tokens each, in one
in-process engine on this machine. Per budget, always next to full KV on the same prompts, with
95% bootstrap intervals over prompts:

* **token agreement** with the full-KV output over the first 256 and 1,024 generated tokens:
  ``prefix`` (length of the common prefix / n: greedy outputs part for good at the first
  difference) and ``positional`` (share of equal tokens at equal positions);
* **long-range recall**: a 7-digit number for a city sits early in a ~1,500-token essay (depth
  jittered over 0-0.4, far behind any recent window), and the instruction asks for a long essay
  FIRST and the number only at the very end; the score is whether the number appears in the
  output, and where (the generated-token index), so a budget that keeps only the recent past
  shows what it forgot (``late_recall``: stated at generated token >= 256, i.e. after a long
  preamble, as instructed). The full-KV score on the same prompts is the ceiling.

Writes ``decode_quality.json``, ``decode_quality.csv`` and ``decode_quality.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..eval.stats import bootstrap_ci, paired_bootstrap_ci
from .artifacts import machine, pyplot, write_json_csv

CITY_DEPTHS = (0.0, 0.1, 0.2, 0.3, 0.4)
#: Generated tokens before which a stated answer does not count as "late" recall.
LATE = 256
INSTRUCTION = ("First write a long, detailed essay of at least 700 words about the ideas in the "
               "text above. Only after the essay, on its last line, write: \"The special magic "
               "number for {city} is\" followed by the number given in the text.")


def build_prompts(model: str, count: int, chars: int) -> list[dict[str, Any]]:
    """``count`` chat prompts: an essay with a needle early on, then the long-answer
    instruction. Depths cycle over ``CITY_DEPTHS``; numbers and cities vary by seed."""
    from transformers import AutoTokenizer

    from ..haystack import needle_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = []
    for i in range(count):
        needle = needle_prompt(chars + 37 * i, CITY_DEPTHS[i % len(CITY_DEPTHS)], seed=1000 + i)
        city = needle.question.split(" for ", 1)[1].split(" mentioned")[0]
        text = f"{needle.context}\n\n{INSTRUCTION.format(city=city)}"
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        prompts.append({"ids": list(ids), "answer": needle.answer, "depth": needle.depth})
    return prompts


def agreement(output: list[int], full: list[int], n: int) -> tuple[float, float]:
    """(prefix, positional) agreement over the first ``n`` tokens of the full-KV output."""
    span = min(n, len(full))
    if span == 0:
        return 1.0, 1.0
    prefix = 0
    while prefix < span and prefix < len(output) and output[prefix] == full[prefix]:
        prefix += 1
    same = sum(1 for i in range(min(span, len(output))) if output[i] == full[i])
    return prefix / span, same / span


def answer_position(text_ids: list[int], tokenizer: Any, answer: str) -> int | None:
    """Generated-token index where the answer first appears in the output, or ``None``."""
    text = tokenizer.decode(text_ids)
    if answer not in text:
        return None
    low, high = 1, len(text_ids)
    while low < high:  # the shortest prefix whose text contains the answer
        mid = (low + high) // 2
        if answer in tokenizer.decode(text_ids[:mid]):
            high = mid
        else:
            low = mid + 1
    return low


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    prompts = build_prompts(args.model, args.prompts, args.context_chars)
    longest = max(len(p["ids"]) for p in prompts)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    llm = LLM(model=args.model, max_model_len=longest + args.max_tokens, enforce_eager=True,
              seed=0, dtype=args.dtype, enable_prefix_caching=False,
              max_num_seqs=args.prompts, max_num_batched_tokens=4096)
    configs: list[tuple[str, int | None]] = [("none", None)] + [
        (args.policy, b) for b in args.decode_budgets]
    outputs: dict[int, list[list[int]]] = {}
    for policy, budget in tqdm(configs, desc="decode-quality configurations"):
        xargs = ({"kv_policy": "none"} if budget is None else
                 {"kv_policy": policy, "kv_decode_budget": budget,
                  "kv_decode_interval": args.decode_interval})
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                                extra_args=xargs)
        results = llm.generate([{"prompt_token_ids": p["ids"]} for p in prompts], params,
                               use_tqdm=False)
        outputs[budget or 0] = [list(r.outputs[0].token_ids) for r in results]
    full = outputs[0]
    per_prompt, rows = [], []
    found_full = [answer_position(out, tokenizer, p["answer"]) is not None
                  for out, p in zip(full, prompts, strict=True)]
    for policy, budget in configs:
        key = budget or 0
        scores: dict[str, list[float]] = {"prefix@256": [], "positional@256": [],
                                          "prefix@1024": [], "positional@1024": [],
                                          "recall": [], "late_recall": []}
        positions = []
        for i, (out, prompt) in enumerate(zip(outputs[key], prompts, strict=True)):
            for n in (256, 1024):
                prefix, positional = agreement(out, full[i], n)
                scores[f"prefix@{n}"].append(prefix)
                scores[f"positional@{n}"].append(positional)
            where = answer_position(out, tokenizer, prompt["answer"])
            scores["recall"].append(float(where is not None))
            # Stated only after a long preamble (>= LATE generated tokens): the strict check.
            scores["late_recall"].append(float(where is not None and where >= LATE))
            if where is not None:
                positions.append(where)
            per_prompt.append({"policy": policy, "decode_budget": key, "prompt": i,
                               "prompt_tokens": len(prompt["ids"]), "depth": prompt["depth"],
                               "answer_found_at": where, "output_tokens": len(out)})
        row: dict[str, Any] = {"policy": policy, "decode_budget": key,
                               "decode_interval": args.decode_interval if budget else 0,
                               "prompts": len(prompts)}
        for name, values in scores.items():
            ci = bootstrap_ci(values)
            row[name] = statistics.fmean(values)
            row[f"{name}_low"], row[f"{name}_high"] = ci
        diff = paired_bootstrap_ci(scores["recall"], [float(f) for f in found_full])
        row["recall_minus_full"] = row["recall"] - statistics.fmean(map(float, found_full))
        row["recall_minus_full_low"], row["recall_minus_full_high"] = diff
        row["answer_position_median"] = statistics.median(positions) if positions else None
        rows.append(row)
    report = {"machine": machine(), "command": "kvcompress " + " ".join(sys.argv[1:]),
              "model": args.model, "dtype": args.dtype,
              "workload": {"prompts": len(prompts), "max_tokens": args.max_tokens,
                           "prompt_tokens_median": statistics.median(len(p["ids"])
                                                                     for p in prompts),
                           "depths": sorted({p["depth"] for p in prompts}),
                           "decode_interval": args.decode_interval, "policy": args.policy},
              "rows": rows, "per_prompt": per_prompt}
    out = Path(args.out)
    write_json_csv(out, "decode_quality", report, rows)
    _plot(report, out / "decode_quality.png")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = report["rows"]
    labels = ["full KV" if not r["decode_budget"] else f"budget {r['decode_budget']}"
              for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.2
    for j, name in enumerate(("prefix@256", "positional@256", "prefix@1024", "positional@1024")):
        xs = [i + (j - 1.5) * width for i in range(len(rows))]
        values = [r[name] for r in rows]
        errors = [[v - r[f"{name}_low"] for v, r in zip(values, rows, strict=True)],
                  [r[f"{name}_high"] - v for v, r in zip(values, rows, strict=True)]]
        axes[0].bar(xs, values, width, yerr=errors, capsize=2, label=name)
    axes[0].set_xticks(range(len(rows)))
    axes[0].set_xticklabels(labels)
    axes[0].set_title("agreement with the full-KV greedy output (95% CI)")
    axes[0].legend(fontsize=8)
    for j, name in enumerate(("recall", "late_recall")):
        values = [r[name] for r in rows]
        errors = [[v - r[f"{name}_low"] for v, r in zip(values, rows, strict=True)],
                  [r[f"{name}_high"] - v for v, r in zip(values, rows, strict=True)]]
        axes[1].bar([i + (j - 0.5) * 0.35 for i in range(len(rows))], values, 0.35,
                    yerr=errors, capsize=3, label=name)
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels(labels)
    axes[1].legend(fontsize=8)
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title("long-range recall: the early number stated after a long essay")
    w, m = report["workload"], report["machine"]
    fig.suptitle(f"{report['model']} ({report['dtype']}), {w['prompts']} prompts of ~"
                 f"{w['prompt_tokens_median']:.0f} tokens, {w['max_tokens']} generated, policy "
                 f"{w['policy']}, interval {w['decode_interval']}; {m['cpu']} ({m['cores']} "
                 f"cores), {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validate(args: argparse.Namespace) -> None:
    from ..policies.registry import policy_names

    if args.policy not in set(policy_names()) - {"none"}:
        raise ValueError(f"--policy: unknown {args.policy!r}")
    small = [b for b in args.decode_budgets if b < 36 + args.decode_interval]
    if small:
        raise ValueError(f"--decode-budgets: {small} leave no room for the sinks (4), the "
                         f"window (32) and --decode-interval ({args.decode_interval})")
    if args.prompts < 4 or args.max_tokens < 256:
        raise ValueError("--prompts must be >= 4 and --max-tokens >= 256")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/smollm2")
    parser.add_argument("--out", default="runs/bench-decode-quality")
    parser.add_argument("--prompts", type=int, default=15)
    parser.add_argument("--context-chars", type=int, default=5600,
                        help="essay characters per prompt (~1,500 tokens with the instruction)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--decode-budgets", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--decode-interval", type=int, default=128)
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--dtype", default="float32",
                        help="float32: no bf16 rounding differences between configurations")


def print_report(report: dict[str, Any]) -> None:
    m, w = report["machine"], report["workload"]
    print(f"\n{report['model']} ({report['dtype']}) on {m['cpu']} ({m['cores']} cores), "
          f"{m['date']}; {w}")
    names = ("prefix@256", "positional@256", "prefix@1024", "positional@1024", "recall",
             "late_recall")
    print(f"{'config':<14}" + "".join(f"{n:>22}" for n in names) + f"{'found at':>10}")
    for r in report["rows"]:
        name = "full KV" if not r["decode_budget"] else f"budget {r['decode_budget']}"
        cells = "".join(f"{r[n]:>11.2f} [{r[n + '_low']:.2f},{r[n + '_high']:.2f}]"
                        for n in names)
        print(f"{name:<14}{cells}{r['answer_position_median']!s:>10}")
