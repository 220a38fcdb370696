// What every CUDA kernel header (cuda/*.cuh) stands on, under both of its compilers:
//  * nvcc (__CUDACC__): the CUDA runtime; a launch is <<<grid, block, 0, current stream>>>.
//  * the host compiler with ROI_KERNELS_CUDA_EMULATED: the CPU executor (emulator/executor.h)
//    supplies the keywords and built-ins, and a launch runs the grid on CPU threads.
// Only cuda::launch differs between the two; the kernels and the launch arithmetic that
// feeds them are the same lines of code. Nothing here needs ATen: the sanitizer programs
// (tests/emulated/) compile the kernel headers without it.
#pragma once

#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#elif defined(ROI_KERNELS_CUDA_EMULATED)
#include "../emulator/executor.h"
#else
#error "cuda/*.cuh are compiled by nvcc, or by the host compiler with ROI_KERNELS_CUDA_EMULATED (the CPU executor)"
#endif

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace roi_kernels {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements (capped: the loop covers the rest).
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(b, 1), int64_t(1) << 20));
}

// A 4-D map [N, C, H, W] as the kernels that read one map take it: sizes and element strides
// (any layout: NCHW, channels_last, strided views).
struct MapView {
  int64_t num_images, channels, height, width;
  int64_t stride_n, stride_c, stride_h, stride_w;
};

// Grid-stride loop with 64-bit indices: outputs of more than 2^31 elements work.
#define ROI_CUDA_KERNEL_LOOP(i, n)                                                         \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// q = t / d, r = t % d; 32-bit division when both fit (64-bit division is a long sequence).
__device__ __forceinline__ void split(int64_t t, int64_t d, int64_t& q, int64_t& r) {
  if (((t | d) >> 31) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(t) / static_cast<uint32_t>(d);
    q = q32;
    r = t - static_cast<int64_t>(q32) * d;
  } else {
    q = t / d;
    r = t - q * d;
  }
}

// The one line that differs between the GPU and the CPU executor: launch `kernel` on a grid of
// `grid` blocks of `block` threads (no dynamic shared memory: none of our kernels uses it, and
// the executor does not support it). On the GPU it is queued on the current stream.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
#if defined(__CUDACC__)
  kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  emu::launch(grid, block, [&] { kernel(args...); });
#endif
}

}  // namespace cuda
}  // namespace roi_kernels
