// roi_align on CUDA, the host side: argument checks (map_set.h, as on the CPU), the map
// descriptors, and the launch (the kernel and its launch arithmetic: roi_align_kernel.cuh).
//
// Compiled by nvcc for the GPU, and by the host compiler into the cuda-emulated test build,
// where the same code takes CPU tensors and runs the kernel through the CPU executor
// (host.h, device.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../map_set.h"
#include "../roi_math.h"
#include "host.h"
#include "roi_align_kernel.cuh"

namespace roi_kernels {
namespace {

using checks::PoolMode;
using cuda::align::kInlineMaps;
using cuda::align::MapDesc;
using cuda::align::MapTable;

// The descriptors of the map set's maps, with a device copy when they do not fit inline.
struct DeviceMaps {
  MapTable table;
  at::Tensor storage;  // keeps the device copy alive until the launch is queued
};

DeviceMaps describe_maps(const MapSet& s) {
  DeviceMaps d;
  std::memset(&d.table, 0, sizeof(d.table));
  const int64_t n = static_cast<int64_t>(s.maps.size());
  std::vector<MapDesc> descs(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& m = s.maps[i];
    descs[i] = MapDesc{
        m.const_data_ptr(), m.size(2), m.size(3), m.stride(0), m.stride(1), m.stride(2), m.stride(3), s.scales[i]};
  }
  d.table.num = n;
  if (n <= kInlineMaps) {
    std::copy(descs.begin(), descs.end(), d.table.inline_maps);
    d.table.global = nullptr;
  } else {
    d.storage = cuda::device_copy(descs.data(), n * static_cast<int64_t>(sizeof(MapDesc)), s.first().device());
    d.table.global = static_cast<const MapDesc*>(d.storage.const_data_ptr());
  }
  return d;
}

at::Tensor run(
    const MapSet& s,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode) {
  const PoolMode mode = checks::parse_pool_mode(pool_mode);
  for (const at::Tensor& m : s.maps) {
    TORCH_CHECK(cuda::on_device(m), "the ", cuda::kDeviceName, " roi_align got a map on ", m.device());
  }
  TORCH_CHECK(cuda::on_device(s.rois), "boxes must be on the device of the maps, got ", s.rois.device());
  cuda::DeviceGuard guard(s.first().device());
  const int64_t num_boxes = s.rois.size(0);
  at::Tensor out = at::empty({num_boxes, s.channels, pooled_height, pooled_width}, s.first().options());
  if (num_boxes == 0 || s.channels == 0) {
    return out;
  }
  const DeviceMaps maps = describe_maps(s);
  const math::MapSelection sel = s.selection();
  const bool channels_last = cuda::channels_last_mapping(s.channels, s.first().stride(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.first().scalar_type(), "roi_align_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::align::launch_roi_align<scalar_t>(
        maps.table, sel, s.rois.const_data_ptr<acc_t>(), num_boxes, s.channels, pooled_height, pooled_width,
        sampling_ratio, aligned, mode == PoolMode::kMax, channels_last, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor roi_align_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode) {
  const MapSet s = map_set_single(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio);
  return run(s, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode);
}

at::Tensor roi_align_ragged_forward_kernel(
    at::TensorList features,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode) {
  const MapSet s = map_set_ragged(features, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio);
  return run(s, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode);
}

at::Tensor multiscale_roi_align_forward_kernel(
    at::TensorList features,
    const at::Tensor& rois,
    at::ArrayRef<double> spatial_scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode,
    int64_t canonical_scale,
    int64_t canonical_level) {
  const MapSet s = map_set_levels(
      features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, canonical_scale,
      canonical_level);
  return run(s, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode);
}

at::Tensor multiscale_roi_align_ragged_forward_kernel(
    at::TensorList features,
    const at::Tensor& rois,
    at::ArrayRef<double> spatial_scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode,
    int64_t canonical_scale,
    int64_t canonical_level) {
  const MapSet s = map_set_levels_ragged(
      features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, canonical_scale,
      canonical_level);
  return run(s, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode);
}

}  // namespace

ROI_KERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("roi_align", &roi_align_forward_kernel);
  m.impl("roi_align_ragged", &roi_align_ragged_forward_kernel);
  m.impl("multiscale_roi_align", &multiscale_roi_align_forward_kernel);
  m.impl("multiscale_roi_align_ragged", &multiscale_roi_align_ragged_forward_kernel);
}

}  // namespace roi_kernels
