// What roi_align's and roi_pool's CUDA kernels share: a block takes one job = (box, chunk of
// channels), in a grid-stride loop over jobs. NCHW maps: a chunk holds about kNchwOutputs
// outputs, so that the block's shared tables serve many threads. channels_last maps: a warp's
// lanes take kLanes consecutive channels of one bin (coalesced loads), the outputs are staged
// in a [kLanes][kTileBins + 1] shared tile and written out channel-major (coalesced stores).
// Compiled unchanged by nvcc and by the host compiler (see device.cuh).
#pragma once

#include <cstdint>

#include "../roi_math.h"
#include "device.cuh"

namespace roi_kernels {
namespace cuda {

constexpr int kLanes = 32;              // channels of a channels_last chunk: one per lane
constexpr int64_t kTileBins = 64;       // bins per pass of the channels_last output staging
constexpr int64_t kNchwOutputs = 2048;  // target outputs per NCHW job
constexpr int64_t kMaxBlocks = int64_t(1) << 22;
static_assert(kTileBins % (kThreads / kLanes) == 0, "a warp's bins step by the warps of a block");

// How a batch of boxes is cut into jobs.
struct LaunchShape {
  int64_t chunk_channels;
  int64_t chunks;
  int64_t blocks;
};

inline LaunchShape launch_shape(int64_t num_boxes, int64_t channels, int64_t bins, bool channels_last) {
  LaunchShape s;
  s.chunk_channels =
      channels_last ? kLanes : math::max_of<int64_t>(1, math::min_of<int64_t>(channels, kNchwOutputs / bins));
  s.chunks = (channels + s.chunk_channels - 1) / s.chunk_channels;
  s.blocks = math::min_of(num_boxes * s.chunks, kMaxBlocks);
  return s;
}

// Whether the kernel maps threads for channels_last (lanes over channels): the first map's
// layout decides; every map is read with its own strides, so a set that mixes layouts is
// still read correctly.
inline bool channels_last_mapping(int64_t channels, int64_t channel_stride) {
  return channels > 1 && channel_stride == 1;
}

// Writes the staged tile of one channels_last pass to the job's outputs: cn channels of bn
// bins starting at bin b0, into o's [cn][bins] layout (consecutive threads, consecutive bins).
// cn * bn <= kLanes * kTileBins: 32-bit arithmetic (a 64-bit division is a call, whose saved
// registers ptxas counts as spills).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_staged_tile(
    const acc_t* tile,
    scalar_t* o,
    int64_t cn,
    int64_t bn,
    int64_t bins,
    int64_t b0) {
  const int tile_n = static_cast<int>(cn * bn), tile_w = static_cast<int>(bn);
  for (int t = threadIdx.x; t < tile_n; t += blockDim.x) {
    const int c = t / tile_w, j = t - c * tile_w;
    o[c * bins + b0 + j] = static_cast<scalar_t>(tile[c * (kTileBins + 1) + j]);
  }
}

}  // namespace cuda
}  // namespace roi_kernels
