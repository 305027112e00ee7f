// Paged KV compaction for the FLASH_ATTN / TRITON_ATTN layout of vLLM 0.32:
// cache [num_blocks, num_kv_heads, block_size, lane] with lane = 2 * head_dim (K then V),
// the last dim contiguous. Head h's lane of its j-th kept token moves from
// src_slots[h * src_slots_stride_head + j] to dst_slots[j]: src_slots is [num_kv_heads, n]
// per head (stride n) or [n] shared by every head (stride 0); dst_slots [n] is always shared.
// Reference: vllm_kvcompress.engine.flash_paged_cache.FlashLayoutCache read, per-head gather,
// write.
#pragma once
#include <cstdint>

namespace kvcompress {

// Grid (cdiv(n, blockDim.y), heads): each row of threads (threadIdx.y) moves one token's lane
// of head blockIdx.y, striding over it in 16-byte words when the lane and the base addresses
// allow it, element by element otherwise. A bf16 lane of head_dim 128 is 32 words, one word per
// thread of a 32-wide row (one block per (token, head) left most threads of a block idle).
template <typename scalar_t>
__global__ void copy_lanes_kernel(const scalar_t* __restrict__ src_base,
                                  scalar_t* __restrict__ dst_base,
                                  const int64_t* __restrict__ src_slots,
                                  const int64_t* __restrict__ dst_slots,
                                  int64_t src_slots_stride_head, int64_t n,
                                  int64_t src_stride_block, int64_t src_stride_head,
                                  int64_t src_stride_token, int64_t dst_stride_block,
                                  int64_t dst_stride_head, int64_t dst_stride_token,
                                  int block_size, int lane) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= n) return;
  const int64_t head = blockIdx.y;
  // src_slots == nullptr: source is a dense [n, heads, lane] staging buffer (token-major).
  const int64_t s = src_slots ? src_slots[head * src_slots_stride_head + token] : token;
  const int64_t d = dst_slots ? dst_slots[token] : token;
  const scalar_t* from = src_slots
      ? src_base + (s / block_size) * src_stride_block + head * src_stride_head +
            (s % block_size) * src_stride_token
      : src_base + s * src_stride_block + head * src_stride_head;
  scalar_t* to = dst_slots
      ? dst_base + (d / block_size) * dst_stride_block + head * dst_stride_head +
            (d % block_size) * dst_stride_token
      : dst_base + d * dst_stride_block + head * dst_stride_head;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = (lane % kVec == 0) &&
                       (reinterpret_cast<uintptr_t>(from) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(to) % 16 == 0);
  if (aligned) {
    const int words = lane / kVec;
    const uint4* from4 = reinterpret_cast<const uint4*>(from);
    uint4* to4 = reinterpret_cast<uint4*>(to);
    for (int i = threadIdx.x; i < words; i += blockDim.x) to4[i] = from4[i];
  } else {
    for (int i = threadIdx.x; i < lane; i += blockDim.x) to[i] = from[i];
  }
}

}  // namespace kvcompress
