// Torch binding of the paged compaction kernel (built on demand by
// vllm_kvcompress/kernels/cuda_ext.py, only where CUDA exists). FLASH_ATTN / TRITON_ATTN layout
// only: CPU_ATTN's `vec` layout never lives on a CUDA device (Triton covers it). The Python
// wrapper (cuda_ext.compact_paged) checks the same things first and raises ValueError; these
// checks are the last guard for direct callers. Known defect: on the H200 image of 2026-11-26 a
// failing check here ended the process (SIGSEGV) instead of raising RuntimeError; cause open
// (tests/test_kernels.py::test_cuda_binding_raises_on_bad_input, xfail).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "paged_compaction_launch.h"

namespace {

void check(const torch::Tensor& cache, const torch::Tensor& src, const torch::Tensor& dst,
           bool check_range) {
  TORCH_CHECK(cache.is_cuda() && src.is_cuda() && dst.is_cuda(), "tensors must be on CUDA");
  TORCH_CHECK(cache.device() == src.device() && cache.device() == dst.device(),
              "cache and slots must be on one device");
  TORCH_CHECK(cache.dim() == 4 && cache.size(3) % 2 == 0 && cache.stride(3) == 1,
              "cache must be [blocks, heads, block_size, 2*head_dim] with a contiguous last dim");
  TORCH_CHECK(src.scalar_type() == torch::kInt64 && dst.scalar_type() == torch::kInt64,
              "slots must be int64 (large pools overflow int32)");
  TORCH_CHECK(dst.dim() == 1, "dst_slots must be [n], got ", dst.sizes());
  const int64_t n = dst.size(0);
  const bool shared = src.dim() == 1 && src.size(0) == n;
  const bool per_head = src.dim() == 2 && src.size(0) == cache.size(1) && src.size(1) == n;
  TORCH_CHECK(shared || per_head, "src_slots must be [n] or [num_kv_heads, n] = [",
              cache.size(1), ", ", n, "] (n from dst_slots), got ", src.sizes());
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous(), "slots must be contiguous");
  if (n == 0 || !check_range) return;
  // One host sync for all four bounds: an out-of-range slot would read or write outside the
  // cache (compaction runs once per request and layer, so the sync is cheap next to the copy).
  const auto stacked = torch::stack({src.min(), src.max(), dst.min(), dst.max()}).cpu();
  const int64_t* bounds = stacked.data_ptr<int64_t>();
  const int64_t limit = cache.size(0) * cache.size(2);
  TORCH_CHECK(bounds[0] >= 0 && bounds[2] >= 0 && bounds[1] < limit && bounds[3] < limit,
              "slot out of range [0, ", limit, "): src_slots in [", bounds[0], ", ", bounds[1],
              "], dst_slots in [", bounds[2], ", ", bounds[3], "]");
}

kvcompress::LaneType lane_type(const torch::Tensor& cache) {
  switch (cache.scalar_type()) {
    case torch::kFloat32: return kvcompress::LaneType::kFloat32;
    case torch::kFloat16: return kvcompress::LaneType::kFloat16;
    case torch::kBFloat16: return kvcompress::LaneType::kBFloat16;
    default: TORCH_CHECK(false, "cache dtype must be float32, float16 or bfloat16, got ",
                         cache.scalar_type());
  }
}

void launched(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "compaction kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// Moves head h's lane of its j-th kept token from src_slots[h, j] (src_slots [heads, n]) or
// src_slots[j] (src_slots [n], shared by every head) to dst_slots[j]. in_place: destinations
// may overlap sources, so the kept lanes are staged in a dense buffer first (gather every head's
// sources, then scatter); the two launches are ordered on one stream, so no write can precede a
// read of the same slot.
// check_range=false skips the slot-range check (a host sync) for a caller that has done it
// (cuda_ext.compact_paged); every other check always runs.
void compact_paged(torch::Tensor cache, torch::Tensor src_slots, torch::Tensor dst_slots,
                   bool in_place, bool check_range) {
  const c10::cuda::OptionalCUDAGuard guard(cache.device());
  check(cache, src_slots, dst_slots, check_range);
  const kvcompress::LaneType type = lane_type(cache);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = dst_slots.size(0);
  const int64_t heads = cache.size(1);
  // Row h of a per-head [heads, n] tensor starts at h * n; a shared [n] row is read by all.
  const int64_t src_head_stride = src_slots.dim() == 2 ? n : 0;
  const int block_size = static_cast<int>(cache.size(2));
  const int lane = static_cast<int>(cache.size(3));
  void* base = cache.data_ptr();
  const int64_t* src = src_slots.data_ptr<int64_t>();
  const int64_t* dst = dst_slots.data_ptr<int64_t>();
  if (!in_place) {
    launched(kvcompress::launch_copy_lanes(
        type, base, base, src, dst, src_head_stride, n, heads, cache.stride(0), cache.stride(1),
        cache.stride(2), cache.stride(0), cache.stride(1), cache.stride(2), block_size, lane,
        stream));
    return;
  }
  auto staging = torch::empty({n, heads, lane}, cache.options());
  void* tmp = staging.data_ptr();
  // Gather: paged per-head sources -> dense staging (token-major, dst_slots == nullptr).
  launched(kvcompress::launch_copy_lanes(
      type, base, tmp, src, nullptr, src_head_stride, n, heads, cache.stride(0), cache.stride(1),
      cache.stride(2), heads * lane, lane, 0, block_size, lane, stream));
  // Scatter: dense staging (src_slots == nullptr) -> shared paged destinations.
  launched(kvcompress::launch_copy_lanes(
      type, tmp, base, nullptr, dst, 0, n, heads, heads * lane, lane, 0, cache.stride(0),
      cache.stride(1), cache.stride(2), block_size, lane, stream));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compact_paged", &compact_paged,
        "Paged KV compaction (vllm-kvcompress): cache, src_slots [n] or [heads, n], "
        "dst_slots [n], in_place, check_range",
        pybind11::arg("cache"), pybind11::arg("src_slots"), pybind11::arg("dst_slots"),
        pybind11::arg("in_place"), pybind11::arg("check_range") = true);
}
