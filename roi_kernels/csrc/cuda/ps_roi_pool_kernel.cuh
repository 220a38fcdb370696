// ps_roi_pool (R-FCN) on CUDA: one thread per output element in a 64-bit grid-stride loop, over
// one map or a ragged batch of per-image maps (images.cuh).
//
// The input is read in place with its own strides. The box snapping, bin clipping and
// average are roi_math.h's ps_roi_pool_box / ps_roi_pool_bin / pool_bin_area, the functions
// the CPU kernel calls, and cells are summed in the same order, so the GPU rounds as the CPU
// does.
//
// This header is compiled unchanged by nvcc (ps_roi_pool_kernel.cu) and by the host compiler
// against the CPU executor (the cuda-emulated test build, tests/emulated/); see device.cuh.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../roi_math.h"
#include "device.cuh"
#include "images.cuh"

namespace roi_kernels {
namespace cuda {
namespace ps_pool {

// Images: MapView (one map at `input`) or ImageTable (a ragged batch; `input` unused).
template <typename scalar_t, typename acc_t, typename Images>
__global__ void ps_roi_pool_kernel(
    int64_t total,
    const scalar_t* __restrict__ input,
    const __grid_constant__ Images images,
    const acc_t* __restrict__ rois,
    acc_t spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t channels_out,
    scalar_t* __restrict__ out) {
  ROI_CUDA_KERNEL_LOOP(index, total) {
    const int64_t pw = index % pooled_width;
    const int64_t ph = (index / pooled_width) % pooled_height;
    const int64_t c = (index / (pooled_width * pooled_height)) % channels_out;
    const int64_t k = index / (pooled_width * pooled_height * channels_out);
    const acc_t* b = rois + k * 5;
    Image<scalar_t> img;
    if (!box_image(input, images, b[0], img)) {
      out[index] = scalar_t(0);  // checked on the host; guarded here all the same
      continue;
    }
    const math::PoolBox box = math::ps_roi_pool_box<acc_t>(b[1], b[2], b[3], b[4], spatial_scale);
    int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;
    if (box.ok) {
      math::ps_roi_pool_bin<acc_t>(box.start_y, box.roi_h, pooled_height, ph, img.height, y0, y1);
      math::ps_roi_pool_bin<acc_t>(box.start_x, box.roi_w, pooled_width, pw, img.width, x0, x1);
    }
    if (math::pool_bin_empty(y0, y1, x0, x1)) {
      out[index] = scalar_t(0);
      continue;
    }
    const scalar_t* plane =
        img.data + math::ps_input_channel(c, ph, pw, pooled_height, pooled_width) * img.stride_c;
    acc_t sum = 0;
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = x0; x < x1; ++x) {
        sum += static_cast<acc_t>(plane[y * img.stride_h + x * img.stride_w]);
      }
    }
    out[index] = static_cast<scalar_t>(math::average(sum, math::pool_bin_area<acc_t>(y0, y1, x0, x1)));
  }
}

// One thread per output element: blocks_for(total) blocks of kThreads, grid-stride.
template <typename scalar_t, typename Images>
void launch_ps_roi_pool(
    int64_t total,
    const scalar_t* __restrict__ input,
    const Images& images,
    const at::opmath_type<scalar_t>* __restrict__ rois,
    at::opmath_type<scalar_t> spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t channels_out,
    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  if (total == 0) {
    return;
  }
  cuda::launch(
      &ps_roi_pool_kernel<scalar_t, acc_t, Images>, dim3(blocks_for(total)), dim3(kThreads), total, input, images,
      rois, spatial_scale, pooled_height, pooled_width, channels_out, out);
}

}  // namespace ps_pool
}  // namespace cuda
}  // namespace roi_kernels
