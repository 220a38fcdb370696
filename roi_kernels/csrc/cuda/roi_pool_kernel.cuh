// roi_pool (Fast R-CNN) on CUDA, the kernel and its launch arithmetic.
//
// Design, as the CUDA roi_align (roi_align_kernel.cu):
//  * A block takes one job = (box, chunk of channels). Thread 0 snaps the box once
//    (roi_math.h's roi_pool_box); the block then computes each bin row's and bin column's
//    cells (roi_pool_bin) into shared memory, so a thread's work per output is only the max
//    over its bin's cells. Output sizes too large for the table compute roi_pool_bin in the
//    thread.
//  * NCHW (or any layout whose channels are not innermost): consecutive threads take
//    consecutive bins of one channel: contiguous stores, neighbouring bins read neighbouring
//    cells of the same rows.
//  * channels_last (channel stride 1): the 32 lanes of a warp take 32 consecutive channels of
//    one bin, so every cell read is one coalesced 128-byte load (float); outputs are staged in
//    shared memory and stored channel-major so that the stores coalesce too.
//  * The max runs in the accumulation type with roi_math.h's pool_max_init / max_update, as
//    on the CPU (from -FLT_MAX, keeping a cell only if it is greater, as torchvision does, so
//    NaN cells never win); an empty bin (pool_bin_empty) is 0.
//  * One map [N, C, H, W] or a ragged batch of per-image maps [C, H_i, W_i] (images.cuh): thread
//    0 resolves the box's image (pointer, sizes, strides) into the plan. Maps are read in place
//    with their strides; offsets are 64-bit; jobs run in a grid-stride loop.
//
// This header is compiled unchanged by nvcc (roi_pool_kernel.cu) and by the host compiler
// against the CPU executor (the cuda-emulated test build, tests/emulated/); see device.cuh.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../roi_math.h"
#include "box_jobs.cuh"
#include "device.cuh"
#include "images.cuh"

namespace roi_kernels {
namespace cuda {
namespace pool {

// Bin rows / columns whose cell ranges a box may keep in shared memory.
constexpr int64_t kBinCapacity = 256;

template <typename scalar_t>
struct PoolPlan {
  Image<scalar_t> image;  // the box's image
  math::PoolBox box;
  bool valid;  // false: no valid image (the box pools to zeros)
};

// The max over rows [hs, he) and columns [ws, we) of a plane; 0 for an empty bin.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t bin_max(
    const scalar_t* plane,
    int64_t stride_h,
    int64_t stride_w,
    int64_t hs,
    int64_t he,
    int64_t ws,
    int64_t we) {
  if (math::pool_bin_empty(hs, he, ws, we)) {
    return acc_t(0);
  }
  acc_t v = math::pool_max_init<acc_t>();
  for (int64_t y = hs; y < he; ++y) {
    const scalar_t* row = plane + y * stride_h;
    for (int64_t x = ws; x < we; ++x) {
      v = math::max_update(v, static_cast<acc_t>(row[x * stride_w]));
    }
  }
  return v;
}

// Images: MapView (one map at `input`) or ImageTable (a ragged batch; `input` unused).
template <typename scalar_t, bool kChannelsLast, typename Images>
__global__ void __launch_bounds__(cuda::kThreads) roi_pool_kernel(
    const scalar_t* __restrict__ input,
    const __grid_constant__ Images images,
    const at::opmath_type<scalar_t>* __restrict__ rois,
    int64_t num_boxes,
    int64_t channels,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t chunk_channels,
    int64_t chunks,
    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ PoolPlan<scalar_t> plan;
  __shared__ int64_t row_start[kBinCapacity], row_end[kBinCapacity];
  __shared__ int64_t col_start[kBinCapacity], col_end[kBinCapacity];
  // Row stride kTileBins + 1: lanes writing one bin each hit different banks.
  __shared__ acc_t tile[kChannelsLast ? kLanes * (kTileBins + 1) : 1];

  const int64_t bins = pooled_height * pooled_width;
  const int64_t jobs = num_boxes * chunks;
  const bool tabled = pooled_height <= kBinCapacity && pooled_width <= kBinCapacity;
  for (int64_t job = blockIdx.x; job < jobs; job += gridDim.x) {
    int64_t k = 0, chunk = 0;
    split(job, chunks, k, chunk);
    const int64_t c0 = chunk * chunk_channels;
    const int64_t cn = math::min_of(chunk_channels, channels - c0);
    scalar_t* o = out + (k * channels + c0) * bins;  // cn * bins contiguous outputs

    __syncthreads();  // the previous job is done with the shared plan and tables
    if (threadIdx.x == 0) {
      const acc_t* r = rois + k * 5;
      plan.valid = box_image(input, images, r[0], plan.image);
      plan.box = math::roi_pool_box<acc_t>(r[1], r[2], r[3], r[4], static_cast<acc_t>(spatial_scale));
      plan.valid = plan.valid && plan.box.ok;
    }
    __syncthreads();
    if (!plan.valid) {
      for (int64_t t = threadIdx.x; t < cn * bins; t += blockDim.x) {
        o[t] = static_cast<scalar_t>(acc_t(0));
      }
      continue;
    }
    const math::PoolBox box = plan.box;
    const Image<scalar_t> img = plan.image;
    if (tabled) {
      for (int64_t t = threadIdx.x; t < pooled_height + pooled_width; t += blockDim.x) {
        if (t < pooled_height) {
          math::roi_pool_bin<acc_t>(box.start_y, box.roi_h, pooled_height, t, img.height, row_start[t], row_end[t]);
        } else {
          const int64_t p = t - pooled_height;
          math::roi_pool_bin<acc_t>(box.start_x, box.roi_w, pooled_width, p, img.width, col_start[p], col_end[p]);
        }
      }
      __syncthreads();
    }
    const scalar_t* base = img.data + c0 * img.stride_c;

    // Value of bin (ph, pw) of the plane.
    auto bin_value = [&](const scalar_t* plane, int64_t ph, int64_t pw) -> acc_t {
      int64_t hs, he, ws, we;
      if (tabled) {
        hs = row_start[ph];
        he = row_end[ph];
        ws = col_start[pw];
        we = col_end[pw];
      } else {
        math::roi_pool_bin<acc_t>(box.start_y, box.roi_h, pooled_height, ph, img.height, hs, he);
        math::roi_pool_bin<acc_t>(box.start_x, box.roi_w, pooled_width, pw, img.width, ws, we);
      }
      return bin_max<acc_t>(plane, img.stride_h, img.stride_w, hs, he, ws, we);
    };

    if (!kChannelsLast) {
      for (int64_t t = threadIdx.x; t < cn * bins; t += blockDim.x) {
        int64_t c = 0, bin = 0, ph = 0, pw = 0;
        split(t, bins, c, bin);
        split(bin, pooled_width, ph, pw);
        o[t] = static_cast<scalar_t>(bin_value(base + c * img.stride_c, ph, pw));
      }
    } else {
      const int lane = threadIdx.x % kLanes;
      const int warp = threadIdx.x / kLanes;
      const int warps = blockDim.x / kLanes;
      const scalar_t* plane = base + lane * img.stride_c;
      for (int64_t b0 = 0; b0 < bins; b0 += kTileBins) {
        const int64_t bn = math::min_of(kTileBins, bins - b0);
        if (lane < cn) {
          for (int64_t j = warp; j < bn; j += warps) {
            int64_t ph = 0, pw = 0;
            split(b0 + j, pooled_width, ph, pw);
            tile[lane * (kTileBins + 1) + j] = bin_value(plane, ph, pw);
          }
        }
        __syncthreads();
        write_staged_tile(tile, o, cn, bn, bins, b0);
        __syncthreads();
      }
    }
  }
}

template <typename scalar_t, typename Images>
void launch_roi_pool(
    const scalar_t* input,
    const Images& images,
    const at::opmath_type<scalar_t>* rois,
    int64_t num_boxes,
    int64_t channels,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    bool channels_last,
    scalar_t* out) {
  if (num_boxes == 0 || channels == 0) {
    return;
  }
  const LaunchShape s = launch_shape(num_boxes, channels, pooled_height * pooled_width, channels_last);
  auto go = [&](auto kernel) {
    cuda::launch(
        kernel, dim3(static_cast<unsigned int>(s.blocks)), dim3(kThreads), input, images, rois, num_boxes, channels,
        spatial_scale, pooled_height, pooled_width, s.chunk_channels, s.chunks, out);
  };
  channels_last ? go(&roi_pool_kernel<scalar_t, true, Images>) : go(&roi_pool_kernel<scalar_t, false, Images>);
}

}  // namespace pool
}  // namespace cuda
}  // namespace roi_kernels
