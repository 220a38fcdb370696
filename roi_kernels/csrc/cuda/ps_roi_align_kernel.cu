// ps_roi_align (R-FCN) on CUDA: one thread per output element in a 64-bit grid-stride loop.
//
// Each thread redoes its box's geometry (a handful of flops) rather than staging it: every
// output of a ps bin reads a different input channel, so there is little to share. The input
// is read in place with its own strides (NCHW, channels_last or any other layout). The
// per-sample arithmetic is roi_math.h's (ps_align_geometry, for_each_bin_sample,
// bilinear_taps, apply_taps), the functions the CPU kernel calls, summed in the same order,
// and the build disables fused multiply-adds, so the GPU rounds as the CPU does.
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
__global__ void ps_roi_align_kernel(
    int64_t total,
    const scalar_t* __restrict__ input,
    MapDesc map,
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
    int64_t n = 0;
    if (!math::batch_index(b[0], map.num_images, n)) {
      out[index] = scalar_t(0);  // checked on the host; guarded here all the same
      continue;
    }
    const math::AlignGeometry<acc_t> g = math::ps_align_geometry<acc_t>(
        b[1], b[2], b[3], b[4], spatial_scale, pooled_height, pooled_width, sampling_ratio);
    const scalar_t* plane =
        input + n * map.sN + math::ps_input_channel(c, ph, pw, pooled_height, pooled_width) * map.sC;
    const int64_t sH = map.sH, sW = map.sW;
    acc_t sum = 0;
    math::for_each_bin_sample(
        g, ph, pw, map.height, map.width, [&](const math::AxisTap<acc_t>& ty, const math::AxisTap<acc_t>& tx) {
          sum += math::apply_taps<acc_t>(plane, math::bilinear_taps(ty, tx, sH, sW));
        });
    out[index] = static_cast<scalar_t>(math::average(sum, g.count));
  }
}

at::Tensor ps_roi_align_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  checks::check_map(input, 4, "input");
  checks::check_rois(rois, input, 5, "boxes");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  checks::check_sampling_ratio(sampling_ratio);
  TORCH_CHECK(input.is_cuda(), "the CUDA ps_roi_align got input on ", input.device());
  const int64_t bins = pooled_height * pooled_width;
  TORCH_CHECK(
      input.size(1) % bins == 0,
      "input has ",
      input.size(1),
      " channels, which is not a multiple of output_size[0] * output_size[1] = ",
      pooled_height,
      " * ",
      pooled_width,
      " (ps_roi_align reads C_out * PH * PW channels)");
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ps_roi_align", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ps_roi_align_kernel<scalar_t, acc_t>
        <<<cuda::blocks_for(total), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            total,
            input.const_data_ptr<scalar_t>(),
            map,
            r.const_data_ptr<acc_t>(),
            static_cast<acc_t>(spatial_scale),
            pooled_height,
            pooled_width,
            sampling_ratio,
            channels_out,
            out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CUDA, m) {
  m.impl("ps_roi_align", &ps_roi_align_forward_kernel);
}

}  // namespace roi_kernels
