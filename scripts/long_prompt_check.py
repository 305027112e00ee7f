#!/usr/bin/env python
"""Issue 25's closing scenario: a prompt three times longer than the KV pool, served.

Starts a real `vllm serve` of SmolLM2 (float32) whose KV pool holds about 2k tokens
(``--blocks`` of 32, one of them vLLM's null block) with ``--max-model-len 8192`` and a server-wide
``--kv-prefill-budget`` (without one vLLM refuses to start: its pool could not hold one
``max_model_len`` request). Then:

1. a ~6k-token needle question (chat, streamed, the assistant's answer prefix continued) with
   ``kv_prefill_budget`` 1024: vLLM's own KV usage gauge (``vllm:kv_cache_usage_perc``) is
   sampled from ``/metrics`` while the prompt is prefilled and decoded; the answer is graded
   (the needle's 7-digit number in the text);
2. the same request with ``kv_policy: none`` (no budget: it would hold the whole prompt at once,
   more than the pool): HTTP 400 naming ``vllm_xargs.kv_prefill_budget``, streamed and not.

``--control-depths``: afterwards, an in-process engine with a pool large enough for the whole
prompt answers the same question (needle at each depth) with full KV and with each of
``--control-policies`` at the same budget and chunk: whether a wrong answer is the model's or
the compression's.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/long_prompt_check.py --out runs/long-prompt \
        --depth 1.0 --control-depths 0 0.5 0.9 1 --control-policies snapkv chunkkv keydiff

Writes ``long_prompt.json`` (the answer, the refusals, every usage sample) and
``long_prompt.png`` (usage against time, the bound ``cdiv(budget + chunk, 32)`` blocks and the
pool marked) under ``--out``; prints a summary. Exits 1 when the scenario does not hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from vllm_kvcompress.bench.artifacts import machine, pyplot
from vllm_kvcompress.haystack import needle_prompt
from vllm_kvcompress.local_server import LocalServer, metric_values

KV_USAGE = "vllm:kv_cache_usage_perc"
BLOCK = 32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sized_prompt(model: str, tokens: int, depth: float) -> tuple[Any, int]:
    """A needle prompt whose chat-templated length is within 2% of ``tokens``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    chars = tokens * 4
    for _ in range(8):
        prompt = needle_prompt(chars, depth, seed=7)
        ids = tokenizer.apply_chat_template(prompt.messages(), continue_final_message=True,
                                            tokenize=True)
        length = len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if abs(length - tokens) <= tokens * 0.02:
            break
        chars = int(chars * tokens / length)
    return prompt, length


class UsageSampler:
    """Reads vLLM's KV usage gauge from ``/metrics`` every ``period`` seconds in a thread."""

    def __init__(self, server: LocalServer, period: float) -> None:
        self.server = server
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                usage = max(metric_values(self.server.metrics(), KV_USAGE) or [0.0])
                self.samples.append((time.perf_counter() - self.start, usage))
            except OSError:
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> UsageSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ask(server: LocalServer, model: str, prompt: Any, xargs: dict[str, Any] | None,
        stream: bool) -> requests.Response:
    body: dict[str, Any] = {"model": model, "messages": prompt.messages(), "max_tokens": 16,
                            "temperature": 0.0, "stream": stream,
                            "continue_final_message": True, "add_generation_prompt": False}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if xargs:
        body["vllm_xargs"] = xargs
    return requests.post(f"{server.base_url}/v1/chat/completions", json=body, stream=stream,
                         timeout=1800)


def served(server: LocalServer, model: str, prompt: Any, budget: int, period: float
           ) -> dict[str, Any]:
    """The long request with the budget, streamed, usage sampled throughout."""
    text, first_token, usage = "", None, None
    with UsageSampler(server, period) as sampler:
        with ask(server, model, prompt, {"kv_prefill_budget": budget}, stream=True) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        text += choice["delta"]["content"]
                        if first_token is None:
                            first_token = time.perf_counter() - sampler.start
        time.sleep(2 * period)  # one more sample after the request ended
    prefill = [u for t, u in sampler.samples if first_token is None or t <= first_token]
    return {"answer": text, "expected": prompt.answer, "right": prompt.answer in text,
            "prompt_tokens": (usage or {}).get("prompt_tokens"), "ttft_s": first_token,
            "samples": sampler.samples, "samples_in_prefill": len(prefill),
            "peak_usage_in_prefill": max(prefill, default=0.0),
            "peak_usage": max((u for _, u in sampler.samples), default=0.0)}


def refused(server: LocalServer, model: str, prompt: Any) -> list[dict[str, Any]]:
    """The same request without a budget, streamed and not."""
    results = []
    for stream in (False, True):
        with ask(server, model, prompt, {"kv_policy": "none"}, stream=stream) as resp:
            body = resp.text
        error = json.loads(body).get("error", {}) if body.startswith("{") else {}
        results.append({"stream": stream, "status": resp.status_code,
                        "param": error.get("param"), "message": error.get("message", body[:300])})
    return results


def control(model: str, depths: list[float], policies: list[str], budget: int, chunk: int,
            tokens: int) -> list[dict[str, Any]]:
    """Full KV vs each policy at ``budget`` on the same prompts, in process, on a pool that holds
    the whole prompt (greedy, 16 tokens)."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=8192, enforce_eager=True, dtype="float32",
              max_num_batched_tokens=chunk, block_size=BLOCK, enable_prefix_caching=False,
              seed=0)
    rows = []
    for depth in depths:
        prompt, length = sized_prompt(model, tokens, depth)
        for policy in ["none", *policies]:
            xargs = {"kv_policy": policy} if policy == "none" else {
                "kv_policy": policy, "kv_prefill_budget": budget}
            out = llm.chat([prompt.messages()], SamplingParams(
                max_tokens=16, temperature=0.0, extra_args=xargs), use_tqdm=False,
                continue_final_message=True, add_generation_prompt=False)
            text = out[0].outputs[0].text
            rows.append({"depth": depth, "prompt_tokens": length, "policy": policy,
                         "prefill_budget": None if policy == "none" else budget,
                         "answer": text, "right": prompt.answer in text})
            print(f"control: depth {depth} {policy}: {text!r} "
                  f"({'right' if rows[-1]['right'] else 'wrong'})", flush=True)
    return rows


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    usable = report["pool_blocks"]
    ok = report["served"]
    times = [t for t, _ in ok["samples"]]
    ax.plot(times, [u * usable for _, u in ok["samples"]], marker=".",
            label="blocks in use (vLLM usage gauge x usable blocks)")
    ax.axhline(report["bound_blocks"], color="tab:red", linestyle="--",
               label=f"cdiv(budget {report['budget']} + chunk {report['chunk']}, 32)")
    ax.axhline(usable, color="gray", linestyle=":", label=f"pool ({usable} blocks)")
    if ok["ttft_s"] is not None:
        ax.axvline(ok["ttft_s"], color="tab:green", linestyle="-.", label="first token")
    ax.set_xlabel("seconds since the request")
    ax.set_ylabel("KV blocks")
    ax.set_title(f"{ok['prompt_tokens']}-token prompt on a {usable * BLOCK}-token pool; "
                 f"{report['machine']['date']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2")
    parser.add_argument("--blocks", type=int, default=65,
                        help="KV blocks of 32 (one is vLLM's null block): 65 hold 2,048 tokens")
    parser.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--budget", type=int, default=1024, help="kv_prefill_budget")
    parser.add_argument("--tokens", type=int, default=6000, help="prompt tokens (about)")
    parser.add_argument("--depth", type=float, default=1.0,
                        help="needle depth, 0..1 (default: in the prompt's last chunk; SmolLM2 "
                             "misses it at 0.5 even with full KV, see --control-depths)")
    parser.add_argument("--policy", default="snapkv", help="server policy")
    parser.add_argument("--period", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=Path("runs/long-prompt"))
    parser.add_argument("--control-depths", type=float, nargs="*", default=[],
                        help="needle depths of the full-KV control (in process)")
    parser.add_argument("--control-policies", nargs="*", default=["snapkv"],
                        help="policies the control runs at --budget next to full KV")
    args = parser.parse_args()

    prompt, length = sized_prompt(args.model, args.tokens, args.depth)
    usable = args.blocks - 1
    print(f"prompt: {length} tokens (needle at depth {args.depth}); pool: {usable} blocks = "
          f"{usable * BLOCK} tokens", flush=True)
    server_args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "8192",
                   "--block-size", str(BLOCK), "--max-num-batched-tokens", str(args.chunk),
                   "--num-gpu-blocks-override", str(args.blocks), "--max-num-seqs", "4",
                   "--kv-policy", args.policy, "--kv-prefill-budget", str(args.budget)]
    args.out.mkdir(parents=True, exist_ok=True)
    with LocalServer(args.model, server_args, args.out / "serve.log",
                     env={"VLLM_CPU_KVCACHE_SPACE": "1"}, startup_timeout=600) as server:
        ok = served(server, args.model, prompt, args.budget, args.period)
        no = refused(server, args.model, prompt)
    report = {"machine": machine(), "command": "scripts/long_prompt_check.py " +
              " ".join(sys.argv[1:]), "model": args.model, "policy": args.policy,
              "budget": args.budget, "chunk": args.chunk, "pool_blocks": usable,
              "bound_blocks": cdiv(args.budget + args.chunk, BLOCK), "served": ok,
              "refused": no}
    if args.control_depths:
        report["control"] = control(args.model, args.control_depths, args.control_policies,
                                    args.budget, args.chunk, args.tokens)
    (args.out / "long_prompt.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "long_prompt.png")
    peak = ok["peak_usage_in_prefill"] * usable
    print(f"served: {ok['prompt_tokens']} prompt tokens, answer {ok['answer']!r} "
          f"({'right' if ok['right'] else 'WRONG'}, expected {ok['expected']}), TTFT "
          f"{ok['ttft_s']:.1f} s; KV usage during prefill: peak {ok['peak_usage_in_prefill']:.1%}"
          f" of the pool = {peak:.0f} of {usable} blocks (bound {report['bound_blocks']}), "
          f"{ok['samples_in_prefill']} samples")
    for r in no:
        print(f"without a budget ({'stream' if r['stream'] else 'no stream'}): HTTP "
              f"{r['status']} {r['param']}: {r['message'][:160]}")
    holds = (ok["right"] and peak <= report["bound_blocks"] + 0.5
             and all(r["status"] == 400 for r in no))
    print(f"wrote {args.out}/long_prompt.json, long_prompt.png; scenario "
          f"{'holds' if holds else 'does NOT hold'}")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
