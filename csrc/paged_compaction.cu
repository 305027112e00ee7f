// The paged compaction kernel's launcher (nvcc). No torch headers and no exceptions here: the
// torch binding, its input checks and its error reporting live in paged_compaction_binding.cpp
// (paged_compaction_launch.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "paged_compaction.cuh"
#include "paged_compaction_launch.h"

namespace kvcompress {

namespace {

template <typename scalar_t>
cudaError_t launch(const void* from, void* to, const int64_t* src, const int64_t* dst,
                   int64_t src_head_stride, int64_t n, int64_t heads, int64_t fb, int64_t fh,
                   int64_t ft, int64_t tb, int64_t th, int64_t tt, int block_size, int lane,
                   cudaStream_t stream) {
  // 32 threads per token (a warp per lane), kTokensPerBlock tokens per block.
  constexpr int kTokensPerBlock = 8;
  const dim3 threads(32, kTokensPerBlock);
  const dim3 grid(static_cast<unsigned>((n + kTokensPerBlock - 1) / kTokensPerBlock),
                  static_cast<unsigned>(heads));
  copy_lanes_kernel<scalar_t><<<grid, threads, 0, stream>>>(
      static_cast<const scalar_t*>(from), static_cast<scalar_t*>(to), src, dst, src_head_stride,
      n, fb, fh, ft, tb, th, tt, block_size, lane);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_copy_lanes(LaneType type, const void* src_base, void* dst_base,
                              const int64_t* src_slots, const int64_t* dst_slots,
                              int64_t src_slots_stride_head, int64_t n, int64_t heads,
                              int64_t src_stride_block, int64_t src_stride_head,
                              int64_t src_stride_token, int64_t dst_stride_block,
                              int64_t dst_stride_head, int64_t dst_stride_token, int block_size,
                              int lane, cudaStream_t stream) {
  if (n == 0 || heads == 0) return cudaSuccess;
  switch (type) {
    case LaneType::kFloat32:
      return launch<float>(src_base, dst_base, src_slots, dst_slots, src_slots_stride_head, n,
                           heads, src_stride_block, src_stride_head, src_stride_token,
                           dst_stride_block, dst_stride_head, dst_stride_token, block_size,
                           lane, stream);
    case LaneType::kFloat16:
      return launch<__half>(src_base, dst_base, src_slots, dst_slots, src_slots_stride_head, n,
                            heads, src_stride_block, src_stride_head, src_stride_token,
                            dst_stride_block, dst_stride_head, dst_stride_token, block_size,
                            lane, stream);
    case LaneType::kBFloat16:
      return launch<__nv_bfloat16>(src_base, dst_base, src_slots, dst_slots,
                                   src_slots_stride_head, n, heads, src_stride_block,
                                   src_stride_head, src_stride_token, dst_stride_block,
                                   dst_stride_head, dst_stride_token, block_size, lane, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kvcompress
