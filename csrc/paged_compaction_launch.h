// Host-side launcher of the paged compaction kernel, shared by the CUDA translation unit that
// defines it (paged_compaction.cu, compiled by nvcc) and the torch binding that calls it
// (paged_compaction_binding.cpp, compiled by the host compiler). No torch types cross this
// boundary and the launcher never throws: it returns the CUDA error, and the binding turns it
// into a Python exception. The split keeps torch out of the nvcc translation unit, so the CPU
// test suite compiles the real .cu (tests/test_kernels.py). It was also a try at a crash seen on
// the H200 image of 2026-11-26 (a failing TORCH_CHECK in the binding ends the process with
// SIGSEGV instead of raising); the crash stayed with the checks in the g++-compiled .cpp, so its
// cause is open (kernels/cuda_ext.py; callers are checked in Python before the binding).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace kvcompress {

enum class LaneType { kFloat32, kFloat16, kBFloat16 };

// Copies head h's lane of token j from src_slots[h * src_slots_stride_head + j] (or dense row j
// when src_slots is null) to dst_slots[j] (or dense row j when dst_slots is null), for j < n and
// every head; strides in elements (see paged_compaction.cuh).
cudaError_t launch_copy_lanes(LaneType type, const void* src_base, void* dst_base,
                              const int64_t* src_slots, const int64_t* dst_slots,
                              int64_t src_slots_stride_head, int64_t n, int64_t heads,
                              int64_t src_stride_block, int64_t src_stride_head,
                              int64_t src_stride_token, int64_t dst_stride_block,
                              int64_t dst_stride_head, int64_t dst_stride_token, int block_size,
                              int lane, cudaStream_t stream);

}  // namespace kvcompress
