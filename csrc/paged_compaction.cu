// Torch binding of the paged compaction kernel (built on demand by
// vllm_kvcompress/kernels/cuda_ext.py, only where CUDA exists).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "paged_compaction.cuh"

namespace {

void check(const torch::Tensor& cache, const torch::Tensor& src, const torch::Tensor& dst) {
  TORCH_CHECK(cache.is_cuda() && src.is_cuda() && dst.is_cuda(), "tensors must be on CUDA");
  TORCH_CHECK(cache.dim() == 4 && cache.stride(3) == 1,
              "cache must be [blocks, heads, block_size, 2*head_dim] with a contiguous last dim");
  TORCH_CHECK(src.scalar_type() == torch::kInt64 && dst.scalar_type() == torch::kInt64,
              "slots must be int64");
  TORCH_CHECK(src.dim() == 1 && src.sizes() == dst.sizes(), "slots must be 1-D, same length");
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous(), "slots must be contiguous");
}

template <typename scalar_t>
void launch(const scalar_t* from, scalar_t* to, const int64_t* src, const int64_t* dst,
            int64_t n, int64_t heads, int64_t fb, int64_t fh, int64_t ft, int64_t tb,
            int64_t th, int64_t tt, int block_size, int lane, cudaStream_t stream) {
  if (n == 0) return;
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(heads));
  const int threads = lane >= 256 ? 128 : 64;
  kvcompress::copy_lanes_kernel<scalar_t><<<grid, threads, 0, stream>>>(
      from, to, src, dst, fb, fh, ft, tb, th, tt, block_size, lane);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Moves every head's lane from src_slots[i] to dst_slots[i]. in_place: destinations may
// overlap sources, so the kept lanes are staged in a dense buffer first (gather, then scatter).
void compact_paged(torch::Tensor cache, torch::Tensor src_slots, torch::Tensor dst_slots,
                   bool in_place) {
  check(cache, src_slots, dst_slots);
  const at::cuda::OptionalCUDAGuard guard(cache.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = src_slots.size(0);
  const int64_t heads = cache.size(1);
  const int block_size = static_cast<int>(cache.size(2));
  const int lane = static_cast<int>(cache.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache.scalar_type(),
                                  "compact_paged", [&] {
    scalar_t* base = cache.data_ptr<scalar_t>();
    const int64_t* src = src_slots.data_ptr<int64_t>();
    const int64_t* dst = dst_slots.data_ptr<int64_t>();
    if (!in_place) {
      launch<scalar_t>(base, base, src, dst, n, heads, cache.stride(0), cache.stride(1),
                       cache.stride(2), cache.stride(0), cache.stride(1), cache.stride(2),
                       block_size, lane, stream);
      return;
    }
    auto staging = torch::empty({n, heads, lane}, cache.options());
    scalar_t* tmp = staging.data_ptr<scalar_t>();
    // Gather: paged source -> dense staging (token-major, dst_slots == nullptr).
    launch<scalar_t>(base, tmp, src, nullptr, n, heads, cache.stride(0), cache.stride(1),
                     cache.stride(2), heads * lane, lane, 0, block_size, lane, stream);
    // Scatter: dense staging (src_slots == nullptr) -> paged destination.
    launch<scalar_t>(tmp, base, nullptr, dst, n, heads, heads * lane, lane, 0,
                     cache.stride(0), cache.stride(1), cache.stride(2), block_size, lane,
                     stream);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compact_paged", &compact_paged, "Paged KV compaction (vllm-kvcompress)");
}
