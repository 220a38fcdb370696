// roi_align_rotated on CUDA, the host side: argument checks (checks.h, map_set.h, as on the CPU)
// and the launch (the kernel and its launch arithmetic: roi_align_rotated_kernel.cuh), over one
// map or a ragged batch of per-image maps. Compiled by nvcc for the GPU and by the host compiler
// into the cuda-emulated test build (host.h, device.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "../map_set.h"
#include "host.h"
#include "roi_align_rotated_kernel.cuh"

namespace roi_kernels {
namespace {

at::Tensor run(
    const MapSet& s,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  const at::Tensor& first = s.first();
  checks::check_rois(rois, first, 6, "rois");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  checks::check_sampling_ratio(sampling_ratio);
  for (const at::Tensor& m : s.maps) {
    TORCH_CHECK(cuda::on_device(m), "the ", cuda::kDeviceName, " roi_align_rotated got input on ", m.device());
  }
  cuda::DeviceGuard guard(first.device());
  checks::check_batch_index(rois, s.num_images, "rois");
  const at::Tensor r = checks::rois_for_kernel(rois, first.scalar_type());
  at::Tensor out = at::empty({r.size(0), s.channels, pooled_height, pooled_width}, first.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "roi_align_rotated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto go = [&](const scalar_t* input, const auto& images) {
      cuda::rotated::launch_roi_align_rotated<scalar_t>(
          total,
          input,
          images,
          r.const_data_ptr<acc_t>(),
          static_cast<acc_t>(spatial_scale),
          pooled_height,
          pooled_width,
          sampling_ratio,
          aligned,
          out.mutable_data_ptr<scalar_t>());
    };
    cuda::with_images<scalar_t>(s, go);
  });
  return out;
}

at::Tensor roi_align_rotated_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  return run(single_map(input), rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
}

at::Tensor roi_align_rotated_ragged_forward_kernel(
    at::TensorList features,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  return run(ragged_maps(features), rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
}

}  // namespace

ROI_KERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("roi_align_rotated", &roi_align_rotated_forward_kernel);
  m.impl("roi_align_rotated_ragged", &roi_align_rotated_ragged_forward_kernel);
}

}  // namespace roi_kernels
