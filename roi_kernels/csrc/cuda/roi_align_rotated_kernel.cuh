// roi_align_rotated on CUDA: one thread per output element in a 64-bit grid-stride loop, over one
// map or a ragged batch of per-image maps (images.cuh).
//
// Each thread visits only the samples of its bin that math::rotated_scan says can land on the
// map (the bound on the work of huge boxes, see roi_math.h), in row-then-column order, with
// math::for_each_rotated_sample, the loop the CPU kernel runs; the build disables fused multiply-adds,
// so the GPU rounds as the CPU does. The input is read in place with its own strides.
//
// This header is compiled unchanged by nvcc (roi_align_rotated_kernel.cu) and by the host compiler
// against the CPU executor (the cuda-emulated test build, tests/emulated/); see device.cuh.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../roi_math.h"
#include "device.cuh"
#include "images.cuh"

namespace roi_kernels {
namespace cuda {
namespace rotated {

// Images: MapView (one map at `input`) or ImageTable (a ragged batch; `input` unused).
template <typename scalar_t, typename acc_t, typename Images>
__global__ void roi_align_rotated_kernel(
    int64_t total,
    const scalar_t* __restrict__ input,
    const __grid_constant__ Images images,
    const acc_t* __restrict__ rois,
    acc_t spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    scalar_t* __restrict__ out) {
  ROI_CUDA_KERNEL_LOOP(index, total) {
    const int64_t pw = index % pooled_width;
    const int64_t ph = (index / pooled_width) % pooled_height;
    const int64_t c = (index / (pooled_width * pooled_height)) % images.channels;
    const int64_t k = index / (pooled_width * pooled_height * images.channels);
    const acc_t* b = rois + k * 6;
    Image<scalar_t> img;
    if (!box_image(input, images, b[0], img)) {
      out[index] = scalar_t(0);  // checked on the host; guarded here all the same
      continue;
    }
    const math::RotatedGeometry<acc_t> g = math::rotated_geometry<acc_t>(
        b[1], b[2], b[3], b[4], b[5], spatial_scale, aligned, pooled_height, pooled_width, sampling_ratio);
    const scalar_t* plane = img.data + c * img.stride_c;
    acc_t sum = 0;
    math::for_each_rotated_sample(
        g, ph, pw, img.height, img.width, img.stride_h, img.stride_w, [&](const math::BilinearTaps<acc_t>& t) {
          sum += math::apply_taps<acc_t>(plane, t);
        });
    out[index] = static_cast<scalar_t>(math::average(sum, g.count));
  }
}

// One thread per output element: blocks_for(total) blocks of kThreads, grid-stride.
template <typename scalar_t, typename Images>
void launch_roi_align_rotated(
    int64_t total,
    const scalar_t* __restrict__ input,
    const Images& images,
    const at::opmath_type<scalar_t>* __restrict__ rois,
    at::opmath_type<scalar_t> spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  if (total == 0) {
    return;
  }
  cuda::launch(
      &roi_align_rotated_kernel<scalar_t, acc_t, Images>, dim3(blocks_for(total)), dim3(kThreads), total, input,
      images, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, out);
}

}  // namespace rotated
}  // namespace cuda
}  // namespace roi_kernels
