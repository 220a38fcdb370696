// ps_roi_pool (R-FCN) on CUDA: one thread per output element in a 64-bit grid-stride loop.
//
// The input is read in place with its own strides. The box snapping, bin clipping and
// average are roi_math.h's ps_roi_pool_box / ps_roi_pool_bin / pool_bin_area, the functions
// the CPU kernel calls, and cells are summed in the same order, so the GPU rounds as the CPU
// does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../roi_math.h"
#include "cuda_common.cuh"

namespace roi_kernels {
namespace {

struct MapDesc {
  int64_t num_images, height, width;
  int64_t sN, sC, sH, sW;
};

template <typename scalar_t, typename acc_t>
__global__ void ps_roi_pool_kernel(
    int64_t total,
    const scalar_t* __restrict__ input,
    MapDesc map,
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
    int64_t n = 0;
    if (!math::batch_index(b[0], map.num_images, n)) {
      out[index] = scalar_t(0);  // checked on the host; guarded here all the same
      continue;
    }
    const math::PoolBox box = math::ps_roi_pool_box<acc_t>(b[1], b[2], b[3], b[4], spatial_scale);
    int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;
    if (box.ok) {
      math::ps_roi_pool_bin<acc_t>(box.start_y, box.roi_h, pooled_height, ph, map.height, y0, y1);
      math::ps_roi_pool_bin<acc_t>(box.start_x, box.roi_w, pooled_width, pw, map.width, x0, x1);
    }
    if (math::pool_bin_empty(y0, y1, x0, x1)) {
      out[index] = scalar_t(0);
      continue;
    }
    const scalar_t* plane =
        input + n * map.sN + math::ps_input_channel(c, ph, pw, pooled_height, pooled_width) * map.sC;
    acc_t sum = 0;
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = x0; x < x1; ++x) {
        sum += static_cast<acc_t>(plane[y * map.sH + x * map.sW]);
      }
    }
    out[index] = static_cast<scalar_t>(math::average(sum, math::pool_bin_area<acc_t>(y0, y1, x0, x1)));
  }
}

at::Tensor ps_roi_pool_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  checks::check_map(input, 4, "input");
  checks::check_rois(rois, input, 5, "boxes");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  TORCH_CHECK(input.is_cuda(), "the CUDA ps_roi_pool got input on ", input.device());
  const int64_t bins = pooled_height * pooled_width;
  TORCH_CHECK(
      input.size(1) % bins == 0,
      "input has ",
      input.size(1),
      " channels, which is not a multiple of output_size[0] * output_size[1] = ",
      pooled_height,
      " * ",
      pooled_width,
      " (ps_roi_pool reads C_out * PH * PW channels)");
  c10::cuda::CUDAGuard guard(input.device());
  checks::check_batch_index(rois, input.size(0), "boxes");
  const at::Tensor r = checks::rois_for_kernel(rois, input.scalar_type());
  const int64_t channels_out = input.size(1) / bins;
  at::Tensor out = at::empty({r.size(0), channels_out, pooled_height, pooled_width}, input.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const MapDesc map{input.size(0), input.size(2), input.size(3),
                    input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ps_roi_pool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ps_roi_pool_kernel<scalar_t, acc_t>
        <<<cuda::blocks_for(total), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            total,
            input.const_data_ptr<scalar_t>(),
            map,
            r.const_data_ptr<acc_t>(),
            static_cast<acc_t>(spatial_scale),
            pooled_height,
            pooled_width,
            channels_out,
            out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CUDA, m) {
  m.impl("ps_roi_pool", &ps_roi_pool_forward_kernel);
}

}  // namespace roi_kernels
