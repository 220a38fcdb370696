// The images of a one-map op's batch (ps_roi_align, ps_roi_pool, roi_align_rotated on the CPU)
// as one table, whether they come from one map [N, C, H, W] or from a ragged batch of
// per-image maps [C, H_i, W_i]: a box's image index picks its entry, which holds everything the
// kernels read of the image (its first element, sizes and strides).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../map_set.h"

namespace roi_kernels {
namespace cpu {

template <typename scalar_t>
struct Image {
  const scalar_t* data;
  int64_t height, width;
  int64_t stride_c, stride_h, stride_w;
};

// One entry per image, in the order of the boxes' image indices (s.num_images entries).
template <typename scalar_t>
std::vector<Image<scalar_t>> images_of(const MapSet& s) {
  std::vector<Image<scalar_t>> images;
  images.reserve(static_cast<size_t>(s.num_images));
  for (const at::Tensor& m : s.maps) {
    const scalar_t* data = m.const_data_ptr<scalar_t>();
    for (int64_t n = 0; n < m.size(0); ++n) {
      images.push_back(Image<scalar_t>{data + n * m.stride(0), m.size(2), m.size(3), m.stride(1), m.stride(2), m.stride(3)});
    }
  }
  return images;
}

}  // namespace cpu
}  // namespace roi_kernels
