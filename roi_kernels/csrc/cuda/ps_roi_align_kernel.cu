// ps_roi_align on CUDA, the host side: argument checks (checks.h, as on the CPU) and the launch (the
// kernel and its launch arithmetic: ps_roi_align_kernel.cuh). Compiled by nvcc for the GPU and by the
// host compiler into the cuda-emulated test build (host.h, device.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "host.h"
#include "ps_roi_align_kernel.cuh"

namespace roi_kernels {
namespace {

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
  TORCH_CHECK(cuda::on_device(input), "the ", cuda::kDeviceName, " ps_roi_align got input on ", input.device());
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
  cuda::DeviceGuard guard(input.device());
  checks::check_batch_index(rois, input.size(0), "boxes");
  const at::Tensor r = checks::rois_for_kernel(rois, input.scalar_type());
  const int64_t channels_out = input.size(1) / bins;
  at::Tensor out = at::empty({r.size(0), channels_out, pooled_height, pooled_width}, input.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const cuda::MapView map = cuda::map_view(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ps_roi_align", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::ps_align::launch_ps_roi_align<scalar_t>(
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
  });
  return out;
}

}  // namespace

ROI_KERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("ps_roi_align", &ps_roi_align_forward_kernel);
}

}  // namespace roi_kernels
