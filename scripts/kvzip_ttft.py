"""KVzip's cost as a share of time to first token, in process (one prompt, max_tokens 1).

Usage: python scripts/kvzip_ttft.py MODEL_DIR [PROMPT_TOKENS] [DTYPE]

Runs the same prompt (random ids from the model's vocabulary) with ``none``, then ``kvzip`` at
ratio 0.25 (prefix caching off, so each run prefills the whole prompt), after one warm-up
request, and prints each run's wall time and the worker's reconstruction time.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from vllm import LLM, SamplingParams

    model = sys.argv[1]
    length = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    dtype = sys.argv[3] if len(sys.argv) > 3 else "auto"
    gc.collect()
    llm = LLM(model=model, dtype=dtype, max_model_len=length + 64, enforce_eager=True,
              enable_prefix_caching=False, max_num_batched_tokens=length + 64, seed=0)
    vocab = llm.get_tokenizer().vocab_size
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(length)]}
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker \
        .model_runner

    def timed(xargs: dict | None) -> float:
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args=xargs)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    timed(None)  # warm-up
    rows = {}
    for name, xargs in (("none", {"kv_policy": "none"}),
                        ("kvzip", {"kv_policy": "kvzip", "kv_ratio": 0.25})):
        state = getattr(runner, "_kvcompress", None)
        before = state.reconstruction_seconds if state is not None else 0.0
        seconds = timed(xargs)
        state = runner._kvcompress
        rows[name] = {"ttft_s": round(seconds, 3),
                      "reconstruction_s": round(state.reconstruction_seconds - before, 3)}
    kvzip = rows["kvzip"]
    kvzip["reconstruction_share"] = round(kvzip["reconstruction_s"] / kvzip["ttft_s"], 3)
    kvzip["ttft_vs_none"] = round(kvzip["ttft_s"] / rows["none"]["ttft_s"], 3)
    print(json.dumps({"model": model, "prompt_tokens": length, "dtype": dtype, **rows}))


if __name__ == "__main__":
    main()
