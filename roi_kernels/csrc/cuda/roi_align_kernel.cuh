// roi_align on CUDA, the kernel and its launch arithmetic: single map, ragged per-image maps and FPN levels, avg and max pooling,
// each in one kernel launch.
//
// Design (why it should beat one-thread-per-output kernels that redo the box geometry):
//  * A block takes one job = (box, chunk of channels). Thread 0 picks the box's map and image
//    (roi_math.h's select_map) and its geometry (align_geometry) once; the block then fills a
//    table of the box's bilinear taps per axis in shared memory: for each bin row ph and
//    sample iy, the y tap (row offsets and weights) from for_each_axis_tap, and likewise for
//    x. The geometry is separable, so PH*gh + PW*gw taps serve all PH*PW*gh*gw samples of
//    every channel of the chunk; per sample a thread only reads two taps from shared memory,
//    issues 4 loads and does the weighted sum (bilinear_taps / apply_taps, as on the CPU).
//  * NCHW (or any layout whose channels are not innermost): consecutive threads take
//    consecutive bins (pw fastest) of one channel, so output stores are contiguous and the
//    taps of neighbouring bins fall in the same rows (shared cache lines). A chunk holds about
//    kNchwOutputs outputs so that the table is reused by many threads.
//  * channels_last (channel stride 1): a warp's 32 lanes take 32 consecutive channels of one
//    bin, so each of a sample's 4 taps is one coalesced 128-byte read (float) and every lane
//    reads the same shared-memory tap (a broadcast). The outputs are staged in shared memory
//    and written out channel-major, so the stores to the contiguous output coalesce too.
//  * Multi-scale and ragged inputs are one launch: the kernel gets a table of map descriptors
//    (pointer, sizes, strides, scale), by value for up to kInlineMaps maps and as a device
//    buffer beyond; maps are read in place with their own strides (nothing is copied or made
//    contiguous).
//  * float16 / bfloat16 are loaded and converted to float; all arithmetic is in the
//    accumulation type, in the CPU kernels' order, and the build disables fused multiply-adds,
//    so the GPU rounds as the CPU does.
//  * Boxes whose tap table does not fit in shared memory (huge boxes with adaptive sampling, or
//    very large sampling ratios or output sizes) take a slower path in the same kernel that
//    computes each sample's taps in the thread; the choice is per box, so it is uniform across
//    the block.
//  * Offsets are 64-bit; jobs run in a grid-stride loop, so any number of boxes fits a grid.
//
// This header is compiled unchanged by nvcc (roi_align_kernel.cu) and by the host compiler
// against the CPU executor (the cuda-emulated test build, tests/emulated/); see device.cuh.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../roi_math.h"
#include "box_jobs.cuh"
#include "device.cuh"

namespace roi_kernels {
namespace cuda {
namespace align {

constexpr int kInlineMaps = 8;
// Taps per axis that a box may keep in shared memory (e.g. 7 bins x 2 samples uses 14).
constexpr int64_t kTapCapacity = 256;

struct MapDesc {
  const void* data;
  int64_t height, width;
  int64_t stride_n, stride_c, stride_h, stride_w;
  double scale;
};

struct MapTable {
  MapDesc inline_maps[kInlineMaps];
  const MapDesc* global;  // device copy of the descriptors when there are more than kInlineMaps
  int64_t num;
};

// A tap of one axis (math::AxisTap) whose lo and hi are element offsets (index * the axis
// stride), so that math::bilinear_taps(ty, tx, 1, 1) gives a sample's offsets into the plane.
// lo < 0 marks a sample that is off the map and contributes 0.
template <typename acc_t>
using SharedTap = math::AxisTap<acc_t>;

enum BoxState : int { kEmpty = 0, kSharedTaps = 1, kComputedTaps = 2 };

template <typename scalar_t, typename acc_t>
struct BoxPlan {
  const scalar_t* base;  // the box's image in its map
  int64_t height, width;
  int64_t stride_c, stride_h, stride_w;
  math::AlignGeometry<acc_t> g;
  int state;
};

// One bin from the shared tap table: ys = the gh y taps of row ph, xs = the gw x taps of
// column pw. Sums (or maxes) the samples in the CPU kernel's order, rows then columns.
template <bool kMax, typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t bin_from_table(
    const scalar_t* plane,
    const SharedTap<acc_t>* ys,
    const SharedTap<acc_t>* xs,
    int64_t gh,
    int64_t gw,
    int64_t samples,
    acc_t count) {
  acc_t v;
  if (kMax) {
    int64_t vy = 0, vx = 0;
    for (int64_t i = 0; i < gh; ++i) {
      vy += ys[i].lo >= 0;
    }
    for (int64_t i = 0; i < gw; ++i) {
      vx += xs[i].lo >= 0;
    }
    v = math::align_max_init<acc_t>(samples, vy * vx);
  } else {
    v = acc_t(0);
  }
  for (int64_t a = 0; a < gh; ++a) {
    const SharedTap<acc_t> ty = ys[a];
    if (ty.lo < 0) {
      continue;
    }
    for (int64_t b = 0; b < gw; ++b) {
      const SharedTap<acc_t> tx = xs[b];
      if (tx.lo < 0) {
        continue;
      }
      const acc_t s = math::apply_taps<acc_t>(plane, math::bilinear_taps(ty, tx, 1, 1));
      v = kMax ? math::max_update(v, s) : v + s;
    }
  }
  return kMax ? v : math::average(v, count);
}

// One bin with every tap computed in the thread (boxes whose table does not fit).
template <bool kMax, typename scalar_t, typename acc_t>
__device__ acc_t bin_computed(const BoxPlan<scalar_t, acc_t>& b, const scalar_t* plane, int64_t ph, int64_t pw) {
  const math::AlignGeometry<acc_t>& g = b.g;
  acc_t v = acc_t(0);
  if (kMax) {
    v = math::align_max_init<acc_t>(
        g.samples,
        math::axis_samples_on_map(g.start_y, g.bin_h, ph, g.grid_h, b.height) *
            math::axis_samples_on_map(g.start_x, g.bin_w, pw, g.grid_w, b.width));
  }
  const int64_t stride_h = b.stride_h, stride_w = b.stride_w;
  math::for_each_bin_sample(g, ph, pw, b.height, b.width, [&](const math::AxisTap<acc_t>& ty, const math::AxisTap<acc_t>& tx) {
    const acc_t s = math::apply_taps<acc_t>(plane, math::bilinear_taps(ty, tx, stride_h, stride_w));
    v = kMax ? math::max_update(v, s) : v + s;
  });
  return kMax ? v : math::average(v, g.count);
}

// The g taps of bin p along one axis, into the shared table (offsets scaled by the axis
// stride; lo = -1 for a sample that is off the map), as for_each_axis_tap gives them to the
// CPU kernel.
template <typename acc_t>
__device__ __forceinline__ void fill_taps(
    SharedTap<acc_t>* out,
    acc_t start,
    acc_t bin,
    int64_t p,
    int64_t g,
    int64_t size,
    int64_t stride) {
  for (int64_t i = 0; i < g; ++i) {
    out[i].lo = -1;
    out[i].hi = -1;
    out[i].h = acc_t(0);
    out[i].l = acc_t(0);
  }
  math::for_each_axis_tap(start, bin, p, g, size, [&](int64_t i, const math::AxisTap<acc_t>& t) {
    out[i].lo = t.lo * stride;
    out[i].hi = t.hi * stride;
    out[i].h = t.h;
    out[i].l = t.l;
  });
}

template <typename scalar_t, typename acc_t>
__device__ void make_plan(
    BoxPlan<scalar_t, acc_t>& plan,
    const MapTable& maps,
    const math::MapSelection& sel,
    const acc_t* r,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  plan.state = kEmpty;
  int64_t map = 0, image = 0;
  // The host has range-checked the indices; select_map checks them again so that bad input
  // can never read out of bounds (the box then pools to zeros).
  if (!math::select_map(sel, r, map, image)) {
    return;
  }
  const MapDesc d = maps.num <= kInlineMaps ? maps.inline_maps[map] : maps.global[map];
  const math::AlignGeometry<acc_t> g = math::align_geometry<acc_t>(
      r[1], r[2], r[3], r[4], static_cast<acc_t>(d.scale), aligned, pooled_height, pooled_width, sampling_ratio);
  plan.base = static_cast<const scalar_t*>(d.data) + image * d.stride_n;
  plan.height = d.height;
  plan.width = d.width;
  plan.stride_c = d.stride_c;
  plan.stride_h = d.stride_h;
  plan.stride_w = d.stride_w;
  plan.g = g;
  // Divisions, not products: pooled sizes and grids are user-controlled and may overflow.
  const bool fits = g.grid_h <= kTapCapacity / pooled_height && g.grid_w <= kTapCapacity / pooled_width;
  plan.state = fits ? kSharedTaps : kComputedTaps;
}

template <typename scalar_t, bool kMax, bool kChannelsLast>
__global__ void __launch_bounds__(cuda::kThreads) roi_align_kernel(
    const __grid_constant__ MapTable maps,
    const math::MapSelection sel,
    const at::opmath_type<scalar_t>* __restrict__ rois,
    int64_t num_boxes,
    int64_t channels,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    int64_t chunk_channels,
    int64_t chunks,
    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ BoxPlan<scalar_t, acc_t> plan;
  __shared__ SharedTap<acc_t> y_taps[kTapCapacity];
  __shared__ SharedTap<acc_t> x_taps[kTapCapacity];
  // Row stride kTileBins + 1: lanes writing one bin each hit different banks.
  __shared__ acc_t tile[kChannelsLast ? kLanes * (kTileBins + 1) : 1];

  const int64_t bins = pooled_height * pooled_width;
  const int64_t jobs = num_boxes * chunks;
  for (int64_t job = blockIdx.x; job < jobs; job += gridDim.x) {
    int64_t k = 0, chunk = 0;
    split(job, chunks, k, chunk);
    const int64_t c0 = chunk * chunk_channels;
    const int64_t cn = math::min_of(chunk_channels, channels - c0);
    scalar_t* o = out + (k * channels + c0) * bins;  // cn * bins contiguous outputs

    __syncthreads();  // the previous job is done with the shared plan and tables
    if (threadIdx.x == 0) {
      make_plan(plan, maps, sel, rois + k * 5, pooled_height, pooled_width, sampling_ratio, aligned);
    }
    __syncthreads();
    const int state = plan.state;
    if (state == kEmpty) {
      for (int64_t t = threadIdx.x; t < cn * bins; t += blockDim.x) {
        o[t] = static_cast<scalar_t>(acc_t(0));
      }
      continue;
    }
    const int64_t gh = plan.g.grid_h, gw = plan.g.grid_w;
    if (state == kSharedTaps) {
      // One thread per bin row and per bin column.
      for (int64_t t = threadIdx.x; t < pooled_height + pooled_width; t += blockDim.x) {
        if (t < pooled_height) {
          fill_taps(y_taps + t * gh, plan.g.start_y, plan.g.bin_h, t, gh, plan.height, plan.stride_h);
        } else {
          const int64_t p = t - pooled_height;
          fill_taps(x_taps + p * gw, plan.g.start_x, plan.g.bin_w, p, gw, plan.width, plan.stride_w);
        }
      }
      __syncthreads();
    }
    // Only what the table path needs goes to registers; the computed path reads the shared plan.
    const scalar_t* base = plan.base + c0 * plan.stride_c;
    const int64_t stride_c = plan.stride_c, samples = plan.g.samples;
    const acc_t count = plan.g.count;

    if (!kChannelsLast) {
      for (int64_t t = threadIdx.x; t < cn * bins; t += blockDim.x) {
        int64_t c = 0, bin = 0, ph = 0, pw = 0;
        split(t, bins, c, bin);
        split(bin, pooled_width, ph, pw);
        const scalar_t* p = base + c * stride_c;
        const acc_t v = state == kSharedTaps
            ? bin_from_table<kMax>(p, y_taps + ph * gh, x_taps + pw * gw, gh, gw, samples, count)
            : bin_computed<kMax>(plan, p, ph, pw);
        o[t] = static_cast<scalar_t>(v);
      }
    } else {
      const int lane = threadIdx.x % kLanes;
      const int warp = threadIdx.x / kLanes;
      const int warps = blockDim.x / kLanes;
      const scalar_t* p = base + lane * stride_c;
      // A warp's bins are warp, warp + warps, ... across the passes (kTileBins is a multiple
      // of warps), so (ph, pw) advances by steps instead of a division per bin (a 64-bit
      // division is a call, whose saved registers ptxas counts as spills).
      int64_t ph = 0, pw = warp;
      while (pw >= pooled_width) {
        pw -= pooled_width;
        ++ph;
      }
      for (int64_t b0 = 0; b0 < bins; b0 += kTileBins) {
        const int64_t bn = math::min_of(kTileBins, bins - b0);
        for (int64_t j = warp; j < bn; j += warps) {
          if (lane < cn) {
            tile[lane * (kTileBins + 1) + j] = state == kSharedTaps
                ? bin_from_table<kMax>(p, y_taps + ph * gh, x_taps + pw * gw, gh, gw, samples, count)
                : bin_computed<kMax>(plan, p, ph, pw);
          }
          pw += warps;
          while (pw >= pooled_width) {
            pw -= pooled_width;
            ++ph;
          }
        }
        __syncthreads();
        write_staged_tile(tile, o, cn, bn, bins, b0);
        __syncthreads();
      }
    }
  }
}

template <typename scalar_t>
void launch_roi_align(
    const MapTable& table,
    const math::MapSelection& sel,
    const at::opmath_type<scalar_t>* rois,
    int64_t num_boxes,
    int64_t channels,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    bool is_max,
    bool channels_last,
    scalar_t* out) {
  if (num_boxes == 0 || channels == 0) {
    return;
  }
  const LaunchShape s = launch_shape(num_boxes, channels, pooled_height * pooled_width, channels_last);
  auto go = [&](auto kernel) {
    cuda::launch(
        kernel, dim3(static_cast<unsigned int>(s.blocks)), dim3(kThreads), table, sel, rois, num_boxes, channels,
        pooled_height, pooled_width, sampling_ratio, aligned, s.chunk_channels, s.chunks, out);
  };
  if (channels_last) {
    is_max ? go(&roi_align_kernel<scalar_t, true, true>) : go(&roi_align_kernel<scalar_t, false, true>);
  } else {
    is_max ? go(&roi_align_kernel<scalar_t, true, false>) : go(&roi_align_kernel<scalar_t, false, false>);
  }
}

}  // namespace align
}  // namespace cuda
}  // namespace roi_kernels
