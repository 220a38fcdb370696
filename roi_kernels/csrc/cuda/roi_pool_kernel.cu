// roi_pool on CUDA, the host side: argument checks (checks.h, as on the CPU) and the launch
// (the kernel and its launch arithmetic: roi_pool_kernel.cuh). Compiled by nvcc for the GPU and
// by the host compiler into the cuda-emulated test build (host.h, device.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "host.h"
#include "roi_pool_kernel.cuh"

namespace roi_kernels {
namespace {

at::Tensor roi_pool_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  checks::check_map(input, 4, "input");
  checks::check_rois(rois, input, 5);
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  TORCH_CHECK(cuda::on_device(input), "the ", cuda::kDeviceName, " roi_pool got input on ", input.device());
  checks::check_batch_index(rois, input.size(0));
  cuda::DeviceGuard guard(input.device());
  const int64_t num_boxes = rois.size(0), channels = input.size(1);
  at::Tensor out = at::empty({num_boxes, channels, pooled_height, pooled_width}, input.options());
  if (num_boxes == 0 || channels == 0) {
    return out;
  }
  const at::Tensor rois_acc = checks::rois_for_kernel(rois, input.scalar_type());
  const bool channels_last = cuda::channels_last_mapping(channels, input.stride(1));
  const cuda::MapView m = cuda::map_view(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::pool::launch_roi_pool<scalar_t>(
        input.const_data_ptr<scalar_t>(), m, rois_acc.const_data_ptr<acc_t>(), num_boxes, channels, spatial_scale,
        pooled_height, pooled_width, channels_last, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

ROI_KERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("roi_pool", &roi_pool_forward_kernel);
}

}  // namespace roi_kernels
