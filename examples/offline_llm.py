"""Offline vLLM with a server-wide compression default and per-request overrides.

Run: .venv/bin/python examples/offline_llm.py [MODEL_DIR]   (default models/smollm2; `make models`)
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from vllm import LLM, SamplingParams

from vllm_kvcompress.haystack import needle_prompt


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "models/smollm2"
    llm = LLM(model=model, max_model_len=8192, enforce_eager=True,
              additional_config={"kvcompress": {"policy": "chunkkv", "ratio": 0.25}})
    prompt = needle_prompt(num_chars=8000, depth=0.3, seed=1)
    for extra_args in (None, {"kv_policy": "snapkv", "kv_ratio": 0.1}, {"kv_policy": "none"}):
        params = SamplingParams(max_tokens=16, temperature=0.0, extra_args=extra_args)
        out = llm.chat(prompt.messages(), params, continue_final_message=True,
                       add_generation_prompt=False, use_tqdm=False)
        print(f"{extra_args or 'server default'}: ...{out[0].outputs[0].text!r} "
              f"(expected {prompt.answer})")


if __name__ == "__main__":
    main()
