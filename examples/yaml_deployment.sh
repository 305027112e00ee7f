#!/usr/bin/env bash
# A YAML deployment: `vllm serve MODEL --config configs/chunkkv.yaml`, flags on top win.
# Run from the repo root after `make setup models`.
set -euo pipefail
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
exec .venv/bin/vllm serve models/smollm2 --config configs/chunkkv.yaml --kv-ratio 0.1 \
  --host 127.0.0.1 --port "${PORT:-8000}" --enforce-eager --max-model-len 8192
