// ps_roi_align (R-FCN) on CUDA: one thread per output element in a 64-bit grid-stride loop, over
// one map or a ragged batch of per-image maps (images.cuh).
//
// Each thread redoes its box's geometry (a handful of flops) rather than staging it: every
// output of a ps bin reads a different input channel, so there is little to share. The input
// is read in place with its own strides (NCHW, channels_last or any other layout). The
// per-sample arithmetic is roi_math.h's (ps_align_geometry, for_each_bin_sample,
// bilinear_taps, apply_taps), the functions the CPU kernel calls, summed in the same order,
// and the build disables fused multiply-adds, so the GPU rounds as the CPU does.
//
// This header is compiled unchanged by nvcc (ps_roi_align_kernel.cu) and by the host compiler
// against the CPU executor (the cuda-emulated test build, tests/emulated/); see device.cuh.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../roi_math.h"
#include "device.cuh"
#include "images.cuh"

namespace roi_kernels {
namespace cuda {
namespace ps_align {

// Images: MapView (one map at `input`) or ImageTable (a ragged batch; `input` unused).
template <typename scalar_t, typename acc_t, typename Images>
__global__ void ps_roi_align_kernel(
    int64_t total,
    const scalar_t* __restrict__ input,
    const __grid_constant__ Images images,
    const acc_t* __restrict__ rois,
    acc_t spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
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
    const math::AlignGeometry<acc_t> g = math::ps_align_geometry<acc_t>(
        b[1], b[2], b[3], b[4], spatial_scale, pooled_height, pooled_width, sampling_ratio);
    const scalar_t* plane =
        img.data + math::ps_input_channel(c, ph, pw, pooled_height, pooled_width) * img.stride_c;
    const int64_t sH = img.stride_h, sW = img.stride_w;
    acc_t sum = 0;
    math::for_each_bin_sample(
        g, ph, pw, img.height, img.width, [&](const math::AxisTap<acc_t>& ty, const math::AxisTap<acc_t>& tx) {
          sum += math::apply_taps<acc_t>(plane, math::bilinear_taps(ty, tx, sH, sW));
        });
    out[index] = static_cast<scalar_t>(math::average(sum, g.count));
  }
}

// One thread per output element: blocks_for(total) blocks of kThreads, grid-stride.
template <typename scalar_t, typename Images>
void launch_ps_roi_align(
    int64_t total,
    const scalar_t* __restrict__ input,
    const Images& images,
    const at::opmath_type<scalar_t>* __restrict__ rois,
    at::opmath_type<scalar_t> spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    int64_t channels_out,
    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  if (total == 0) {
    return;
  }
  cuda::launch(
      &ps_roi_align_kernel<scalar_t, acc_t, Images>, dim3(blocks_for(total)), dim3(kThreads), total, input, images,
      rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, channels_out, out);
}

}  // namespace ps_align
}  // namespace cuda
}  // namespace roi_kernels
