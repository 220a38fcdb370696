// ps_roi_pool on CUDA, the host side: argument checks (checks.h, map_set.h, as on the CPU) and the
// launch (the kernel and its launch arithmetic: ps_roi_pool_kernel.cuh), over one map or a ragged
// batch of per-image maps. Compiled by nvcc for the GPU and by the host compiler into the
// cuda-emulated test build (host.h, device.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "../map_set.h"
#include "host.h"
#include "ps_roi_pool_kernel.cuh"

namespace roi_kernels {
namespace {

at::Tensor run(
    const MapSet& s,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  const at::Tensor& first = s.first();
  checks::check_rois(rois, first, 5, "boxes");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  for (const at::Tensor& m : s.maps) {
    TORCH_CHECK(cuda::on_device(m), "the ", cuda::kDeviceName, " ps_roi_pool got input on ", m.device());
  }
  const int64_t bins = pooled_height * pooled_width;
  TORCH_CHECK(
      s.channels % bins == 0,
      "input has ",
      s.channels,
      " channels, which is not a multiple of output_size[0] * output_size[1] = ",
      pooled_height,
      " * ",
      pooled_width,
      " (ps_roi_pool reads C_out * PH * PW channels)");
  cuda::DeviceGuard guard(first.device());
  checks::check_batch_index(rois, s.num_images, "boxes");
  const at::Tensor r = checks::rois_for_kernel(rois, first.scalar_type());
  const int64_t channels_out = s.channels / bins;
  at::Tensor out = at::empty({r.size(0), channels_out, pooled_height, pooled_width}, first.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "ps_roi_pool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto go = [&](const scalar_t* input, const auto& images) {
      cuda::ps_pool::launch_ps_roi_pool<scalar_t>(
          total,
          input,
          images,
          r.const_data_ptr<acc_t>(),
          static_cast<acc_t>(spatial_scale),
          pooled_height,
          pooled_width,
          channels_out,
          out.mutable_data_ptr<scalar_t>());
    };
    cuda::with_images<scalar_t>(s, go);
  });
  return out;
}

at::Tensor ps_roi_pool_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return run(single_map(input), rois, spatial_scale, pooled_height, pooled_width);
}

at::Tensor ps_roi_pool_ragged_forward_kernel(
    at::TensorList features,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return run(ragged_maps(features), rois, spatial_scale, pooled_height, pooled_width);
}

}  // namespace

ROI_KERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("ps_roi_pool", &ps_roi_pool_forward_kernel);
  m.impl("ps_roi_pool_ragged", &ps_roi_pool_ragged_forward_kernel);
}

}  // namespace roi_kernels
