"""Per-request policies through the OpenAI-compatible API (`vllm_xargs` via `extra_body`).

Start a server first, e.g.:
    .venv/bin/vllm serve models/smollm2 --kv-policy chunkkv --kv-ratio 0.25 --port 8000
Run: .venv/bin/python examples/openai_client.py [BASE_URL]
"""

from __future__ import annotations

import sys

from openai import BadRequestError, OpenAI

from vllm_kvcompress.haystack import needle_prompt


def main() -> None:
    base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"
    client = OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    prompt = needle_prompt(num_chars=8000, depth=0.7, seed=3)
    for xargs in ({}, {"kv_policy": "snapkv", "kv_ratio": 0.1},
                  {"kv_policy": "streamingllm", "kv_budget": 512}, {"kv_policy": "none"}):
        resp = client.chat.completions.create(
            model=model, messages=prompt.messages(), max_tokens=16, temperature=0.0,
            extra_body={"vllm_xargs": xargs, "continue_final_message": True,
                        "add_generation_prompt": False})
        print(f"{xargs or 'server default'}: {resp.choices[0].message.content!r} "
              f"(expected {prompt.answer})")
    try:  # Bad input is an HTTP 400 that names the field; the server keeps serving.
        client.completions.create(model=model, prompt="hi", max_tokens=1,
                                  extra_body={"vllm_xargs": {"kv_ratio": 1.5}})
    except BadRequestError as err:
        print("400:", err.body["message"] if isinstance(err.body, dict) else err)


if __name__ == "__main__":
    main()
