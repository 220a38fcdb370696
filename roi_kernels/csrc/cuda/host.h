// Host-side helpers of the CUDA ops' entry points (cuda/*.cu), under both compilers:
//  * nvcc: the tensors are on a CUDA device; ops register as roi_kernels' CUDA kernels.
//  * ROI_KERNELS_CUDA_EMULATED: the same entry points take CPU tensors and run the kernels
//    through the CPU executor; they register as CPU kernels of a library of their own,
//    roi_kernels_emulated (emulator/register.cpp holds its schemas), so that nothing of it
//    can be mistaken for, or replace, the real ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../map_set.h"
#include "device.cuh"
#include "images.cuh"

#if defined(__CUDACC__)
#include <c10/cuda/CUDAGuard.h>
#endif

namespace roi_kernels {
namespace cuda {

#if defined(__CUDACC__)
constexpr const char* kDeviceName = "CUDA";
inline bool on_device(const at::Tensor& t) {
  return t.is_cuda();
}
using DeviceGuard = c10::cuda::CUDAGuard;
#else
constexpr const char* kDeviceName = "CUDA (emulated on the CPU)";
inline bool on_device(const at::Tensor& t) {
  return t.is_cpu();
}
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
#endif

// A map's sizes and strides as the one-map kernels take them.
inline MapView map_view(const at::Tensor& m) {
  return MapView{m.size(0), m.size(1), m.size(2), m.size(3), m.stride(0), m.stride(1), m.stride(2), m.stride(3)};
}

// `bytes` bytes from host memory, copied into a new device buffer for the kernels to read.
// On the GPU: pinned staging, so that the copy is queued on the stream without a host sync
// (the caching host allocator keeps the staging buffer until the copy has run).
inline at::Tensor device_copy(const void* data, int64_t bytes, c10::Device device) {
#if defined(__CUDACC__)
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), data, bytes);
  return host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
#else
  at::Tensor buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  std::memcpy(buffer.mutable_data_ptr(), data, bytes);
  return buffer;
#endif
}

// The image descriptors of a ragged batch (s: kRagged, one [1, C, H_i, W_i] map per image) as
// the one-map kernels take them, with a device copy when they do not fit inline.
struct DeviceImages {
  ImageTable table;
  at::Tensor storage;  // keeps the device copy alive until the launch is queued
};

inline DeviceImages describe_images(const MapSet& s) {
  DeviceImages d;
  std::memset(&d.table, 0, sizeof(d.table));
  std::vector<ImageDesc> descs;
  descs.reserve(s.maps.size());
  for (const at::Tensor& m : s.maps) {
    descs.push_back(ImageDesc{m.const_data_ptr(), m.size(2), m.size(3), m.stride(1), m.stride(2), m.stride(3)});
  }
  const int64_t n = static_cast<int64_t>(descs.size());
  d.table.num_images = n;
  d.table.channels = s.channels;
  if (n <= kInlineImages) {
    std::copy(descs.begin(), descs.end(), d.table.inline_images);
    d.table.global = nullptr;
  } else {
    d.storage = device_copy(descs.data(), n * static_cast<int64_t>(sizeof(ImageDesc)), s.first().device());
    d.table.global = static_cast<const ImageDesc*>(d.storage.const_data_ptr());
  }
  return d;
}

// Calls go(input, images) with what a one-map kernel reads: the single map's data and view
// (kSingle: the single-map op's arithmetic), or no single input and the image table of a
// ragged batch (kept alive until go has queued the launch).
template <typename scalar_t, typename Go>
void with_images(const MapSet& s, Go&& go) {
  if (s.select == MapSelect::kSingle) {
    go(s.first().const_data_ptr<scalar_t>(), map_view(s.first()));
  } else {
    const DeviceImages images = describe_images(s);
    go(static_cast<const scalar_t*>(nullptr), images.table);
  }
}

}  // namespace cuda
}  // namespace roi_kernels

#if defined(__CUDACC__)
#define ROI_KERNELS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(roi_kernels, CUDA, m)
#else
#define ROI_KERNELS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(roi_kernels_emulated, CPU, m)
#endif
