#!/usr/bin/env bash
# Creates .kvpress-venv (python3.11) with NVIDIA's kvpress 0.5.5, the peer backend of the accuracy
# study (vllm_kvcompress/eval/kvpress_runner.py runs in it). Kept apart from .venv because kvpress
# pins transformers < 5.3 while vLLM 0.32 needs transformers 5.x.
# CPU torch 2.13.0 (the local wheel) goes in first so that no CUDA torch is ever pulled.
# kvpress's declared dependencies are all installed (`import kvpress` imports datasets, fire,
# cachetools, requests; peft and accelerate are small and keep `pip check` clean); its extras
# (eval metrics, flash-attn) are not.
# Idempotent: a stamp keyed on this script makes a second run take a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.kvpress-venv
PIP="$VENV/bin/python -m pip"
# shellcheck source=scripts/quiet.sh
source scripts/quiet.sh

stamp_key=$(sha256sum scripts/kvpress_venv.sh | cut -c1-16)
stamp="$VENV/.kvpress-setup-$stamp_key"
versions() {
  "$VENV/bin/python" -c '
import importlib.metadata as m
print("kvpress-venv: kvpress", m.version("kvpress"), "+ transformers", m.version("transformers"),
      "+ torch", m.version("torch"))'
}
if [ -f "$stamp" ]; then
  echo "kvpress-venv: $VENV is up to date ($stamp)"
  versions
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null; then
  echo "kvpress-venv: $PYTHON not found (the local CPU torch wheel is cp311)" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "kvpress-venv: installing torch 2.13.0 (CPU), kvpress 0.5.5, transformers < 5.3 (~1 minute)"

quiet $PIP install -q "torch==2.13.0"
# torch is pinned again so that the resolver keeps the CPU build for kvpress's torch<3.
quiet $PIP install -q "torch==2.13.0" "kvpress==0.5.5" "transformers>=4.56.0,<5.3" "tqdm>=4.66.4,<5"

if $PIP list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "kvpress-venv: CUDA packages (nvidia-*) were pulled into $VENV; remove it and retry" >&2
  exit 1
fi
"$VENV/bin/python" -c 'import kvpress, tqdm, transformers, torch' || {
  echo "kvpress-venv: 'import kvpress' fails in $VENV" >&2
  exit 1
}
rm -f "$VENV"/.kvpress-setup-*
touch "$stamp"
versions
