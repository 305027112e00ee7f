#!/usr/bin/env bash
# The kernel checks that need an NVIDIA GPU, on a machine with CUDA torch + Triton + nvcc but no
# vLLM (the lent device machine): tests/test_kernels.py natively on the GPU (Triton kernels, the
# CUDA C++ compaction built by torch.utils.cpp_extension) and `kvcompress bench kernels`.
#
#   bash scripts/gpu_kernels.sh OUT_DIR [bench options...]
#
# The package is laid out as the wheel installs it (kernels/ -> vllm_kvcompress/kernels, csrc/ ->
# vllm_kvcompress/csrc) in a temporary folder on PYTHONPATH, so nothing is installed (no vLLM,
# no network) and the CUDA extension finds its sources where an installed wheel has them.
set -uo pipefail
out=${1:?usage: gpu_kernels.sh OUT_DIR [bench options...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
pkg=$(mktemp -d)
mkdir -p "$pkg/vllm_kvcompress"
cp -r "$repo/vllm_kvcompress/." "$pkg/vllm_kvcompress/"
cp -r "$repo/kernels" "$pkg/vllm_kvcompress/kernels"
cp -r "$repo/csrc" "$pkg/vllm_kvcompress/csrc"
py=${PYTHON:-python3}
export PYTHONPATH=$pkg PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Build for the lent H100/H200 (sm_90) only, not torch's whole architecture list.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(0))"
# Outside the checkout: its vllm_kvcompress/ has no kernels/ subpackage (that is the wheel's map).
cd "$pkg" || exit 1
timeout 240 "$py" -m pytest -q -p no:cacheprovider -rs "$repo/tests/test_kernels.py" \
    2>&1 | tee "$out/test_kernels.log"
tests_rc=${PIPESTATUS[0]}
timeout 270 "$py" -m vllm_kvcompress.cli bench kernels --out "$out/bench-kernels" "$@" \
    2>&1 | grep -v "it/s\]" | tee "$out/bench_kernels.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $((tests_rc || bench_rc))
