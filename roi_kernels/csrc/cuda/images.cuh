// How the one-map CUDA kernels (roi_pool, ps_roi_align, ps_roi_pool, roi_align_rotated) find a
// box's image, in either of their two forms:
//  * one map [N, C, H, W] (MapView, with the kernel's `input` pointer): the box's image index
//    picks the image; the single-map op's arithmetic, unchanged;
//  * a ragged batch of per-image maps [C, H_i, W_i] (ImageTable): the index picks the map. Each
//    image's pointer, sizes and strides are a descriptor, passed by value for up to
//    kInlineImages images and as a device buffer beyond (as roi_align's MapTable), so the maps
//    are read in place and a batch of any sizes is one launch.
// Each kernel is instantiated for both; the overloads of box_image below are all that differs.
// Compiled unchanged by nvcc and by the host compiler (see device.cuh).
#pragma once

#include <cstdint>

#include "../roi_math.h"
#include "device.cuh"

namespace roi_kernels {
namespace cuda {

constexpr int kInlineImages = 8;

struct ImageDesc {
  const void* data;
  int64_t height, width;
  int64_t stride_c, stride_h, stride_w;
};

struct ImageTable {
  ImageDesc inline_images[kInlineImages];
  const ImageDesc* global;  // device copy of the descriptors when there are more than kInlineImages
  int64_t num_images, channels;
};

// What a kernel reads of one box's image.
template <typename scalar_t>
struct Image {
  const scalar_t* data;
  int64_t height, width;
  int64_t stride_c, stride_h, stride_w;
};

// The image of a box whose image index is v, from one map at `input`. False when v is not a
// valid index: the host has checked the indices, this guard only keeps bad input from reading
// out of bounds (the box then pools to zeros).
template <typename scalar_t, typename T>
__device__ __forceinline__ bool box_image(const scalar_t* input, const MapView& m, T v, Image<scalar_t>& img) {
  int64_t n = 0;
  if (!math::batch_index(v, m.num_images, n)) {
    return false;
  }
  img = Image<scalar_t>{input + n * m.stride_n, m.height, m.width, m.stride_c, m.stride_h, m.stride_w};
  return true;
}

// The same from a ragged batch (`input` is unused: every image has its own pointer).
template <typename scalar_t, typename T>
__device__ __forceinline__ bool box_image(const scalar_t*, const ImageTable& t, T v, Image<scalar_t>& img) {
  int64_t i = 0;
  if (!math::batch_index(v, t.num_images, i)) {
    return false;
  }
  const ImageDesc& d = t.num_images <= kInlineImages ? t.inline_images[i] : t.global[i];
  img = Image<scalar_t>{static_cast<const scalar_t*>(d.data), d.height, d.width, d.stride_c, d.stride_h, d.stride_w};
  return true;
}

}  // namespace cuda
}  // namespace roi_kernels
