// Torch binding of the paged compaction kernel (built on demand by
// vllm_kvcompress/kernels/cuda_ext.py, only where CUDA exists). FLASH_ATTN / TRITON_ATTN layout
// only: CPU_ATTN's `vec` layout never lives on a CUDA device (Triton covers it).
// c10/cuda headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE): the
// binding then also compiles against a CPU wheel's torch headers with nvcc, which is how it is
// checked where no GPU is present (csrc/README.md).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "paged_compaction.cuh"

namespace {

void check(const torch::Tensor& cache, const torch::Tensor& src, const torch::Tensor& dst) {
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
  if (n == 0) return;
  // One host sync for all four bounds: an out-of-range slot would read or write outside the
  // cache (compaction runs once per request and layer, so the sync is cheap next to the copy).
  const auto stacked = torch::stack({src.min(), src.max(), dst.min(), dst.max()}).cpu();
  const int64_t* bounds = stacked.data_ptr<int64_t>();
  const int64_t limit = cache.size(0) * cache.size(2);
  TORCH_CHECK(bounds[0] >= 0 && bounds[2] >= 0 && bounds[1] < limit && bounds[3] < limit,
              "slot out of range [0, ", limit, "): src_slots in [", bounds[0], ", ", bounds[1],
              "], dst_slots in [", bounds[2], ", ", bounds[3], "]");
}

template <typename scalar_t>
void launch(const scalar_t* from, scalar_t* to, const int64_t* src, const int64_t* dst,
            int64_t src_head_stride, int64_t n, int64_t heads, int64_t fb, int64_t fh,
            int64_t ft, int64_t tb, int64_t th, int64_t tt, int block_size, int lane,
            cudaStream_t stream) {
  if (n == 0) return;
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(heads));
  const int threads = lane >= 256 ? 128 : 64;
  kvcompress::copy_lanes_kernel<scalar_t><<<grid, threads, 0, stream>>>(
      from, to, src, dst, src_head_stride, fb, fh, ft, tb, th, tt, block_size, lane);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Moves head h's lane of its j-th kept token from src_slots[h, j] (src_slots [heads, n]) or
// src_slots[j] (src_slots [n], shared by every head) to dst_slots[j]. in_place: destinations
// may overlap sources, so the kept lanes are staged in a dense buffer first (gather every head's
// sources, then scatter); the two launches are ordered on one stream, so no write can precede a
// read of the same slot.
void compact_paged(torch::Tensor cache, torch::Tensor src_slots, torch::Tensor dst_slots,
                   bool in_place) {
  const c10::cuda::OptionalCUDAGuard guard(cache.device());
  check(cache, src_slots, dst_slots);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = dst_slots.size(0);
  const int64_t heads = cache.size(1);
  // Row h of a per-head [heads, n] tensor starts at h * n; a shared [n] row is read by all.
  const int64_t src_head_stride = src_slots.dim() == 2 ? n : 0;
  const int block_size = static_cast<int>(cache.size(2));
  const int lane = static_cast<int>(cache.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache.scalar_type(),
                                  "compact_paged", [&] {
    scalar_t* base = cache.data_ptr<scalar_t>();
    const int64_t* src = src_slots.data_ptr<int64_t>();
    const int64_t* dst = dst_slots.data_ptr<int64_t>();
    if (!in_place) {
      launch<scalar_t>(base, base, src, dst, src_head_stride, n, heads, cache.stride(0),
                       cache.stride(1), cache.stride(2), cache.stride(0), cache.stride(1),
                       cache.stride(2), block_size, lane, stream);
      return;
    }
    auto staging = torch::empty({n, heads, lane}, cache.options());
    scalar_t* tmp = staging.data_ptr<scalar_t>();
    // Gather: paged per-head sources -> dense staging (token-major, dst_slots == nullptr).
    launch<scalar_t>(base, tmp, src, nullptr, src_head_stride, n, heads, cache.stride(0),
                     cache.stride(1), cache.stride(2), heads * lane, lane, 0, block_size, lane,
                     stream);
    // Scatter: dense staging (src_slots == nullptr) -> shared paged destinations.
    launch<scalar_t>(tmp, base, nullptr, dst, 0, n, heads, heads * lane, lane, 0,
                     cache.stride(0), cache.stride(1), cache.stride(2), block_size, lane,
                     stream);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compact_paged", &compact_paged,
        "Paged KV compaction (vllm-kvcompress): cache, src_slots [n] or [heads, n], "
        "dst_slots [n], in_place",
        pybind11::arg("cache"), pybind11::arg("src_slots"), pybind11::arg("dst_slots"),
        pybind11::arg("in_place"));
}
