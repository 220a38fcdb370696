// roi_pool on CUDA, the host side: argument checks (checks.h, map_set.h, as on the CPU) and the
// launch (the kernel and its launch arithmetic: roi_pool_kernel.cuh), over one map or a ragged
// batch of per-image maps. Compiled by nvcc for the GPU and by the host compiler into the
// cuda-emulated test build (host.h, device.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "../map_set.h"
#include "host.h"
#include "roi_pool_kernel.cuh"

namespace roi_kernels {
namespace {

at::Tensor run(
    const MapSet& s,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  const at::Tensor& first = s.first();
  checks::check_rois(rois, first, 5);
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  for (const at::Tensor& m : s.maps) {
    TORCH_CHECK(cuda::on_device(m), "the ", cuda::kDeviceName, " roi_pool got input on ", m.device());
  }
  checks::check_batch_index(rois, s.num_images);
  cuda::DeviceGuard guard(first.device());
  const int64_t num_boxes = rois.size(0), channels = s.channels;
  at::Tensor out = at::empty({num_boxes, channels, pooled_height, pooled_width}, first.options());
  if (num_boxes == 0 || channels == 0) {
    return out;
  }
  const at::Tensor rois_acc = checks::rois_for_kernel(rois, first.scalar_type());
  const bool channels_last = cuda::channels_last_mapping(channels, first.stride(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "roi_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto go = [&](const scalar_t* input, const auto& images) {
      cuda::pool::launch_roi_pool<scalar_t>(
          input, images, rois_acc.const_data_ptr<acc_t>(), num_boxes, channels, spatial_scale, pooled_height,
          pooled_width, channels_last, out.mutable_data_ptr<scalar_t>());
    };
    cuda::with_images<scalar_t>(s, go);
  });
  return out;
}

at::Tensor roi_pool_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return run(single_map(input), rois, spatial_scale, pooled_height, pooled_width);
}

at::Tensor roi_pool_ragged_forward_kernel(
    at::TensorList features,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return run(ragged_maps(features), rois, spatial_scale, pooled_height, pooled_width);
}

}  // namespace

ROI_KERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("roi_pool", &roi_pool_forward_kernel);
  m.impl("roi_pool_ragged", &roi_pool_ragged_forward_kernel);
}

}  // namespace roi_kernels
