// A tiny kernel for testing the test harness itself (tests/test_sanitizers.py): each block
// reverses its 256-element slice of `in` through a shared table, in a grid-stride loop. It
// uses what the real kernels use (shared memory, __syncthreads, grid-stride jobs, a partial
// last slice), and the tests plant one-line defects in copies of it (an index changed, an
// off-by-one read of the shared table or of the input, a barrier removed or made divergent)
// to show that the comparison, AddressSanitizer, ThreadSanitizer and the executor's barrier
// check each catch theirs.
#pragma once

#include <cstdint>

#include "cuda/device.cuh"

namespace tiny {

constexpr int kThreads = 256;

__global__ void block_reverse(const float* __restrict__ in, int64_t n, float* __restrict__ out) {
  __shared__ float tile[kThreads];
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n;
       base += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t len = n - base < blockDim.x ? n - base : blockDim.x;
    const int64_t i = base + threadIdx.x;
    if (threadIdx.x < len) {
      tile[threadIdx.x] = in[i];
    }
    __syncthreads();
    if (threadIdx.x < len) {
      out[i] = tile[len - 1 - threadIdx.x];
    }
    __syncthreads();  // the next slice overwrites the table
  }
}

inline void launch_block_reverse(const float* in, int64_t n, float* out, unsigned int blocks) {
  roi_kernels::cuda::launch(&block_reverse, dim3(blocks), dim3(kThreads), in, n, out);
}

}  // namespace tiny
