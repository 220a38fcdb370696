// roi_align_rotated on the CPU, over one map or a ragged batch of per-image maps.
//
// The channel loop runs over packed tiles of kBlock channels (cpu/tiled.h), as roi_align's
// does: each of a sample's 4 taps is then a contiguous vector of channels instead of a scalar
// load from each of C planes. The per-box geometry (centre, rotation, grid) is computed once,
// before the tiles, along with the window of the map the box's samples read (one pass over
// its samples); each channel block then recomputes the samples' taps, a few scalar operations
// shared by B channels. Only the samples that math::rotated_scan says can land on the map are
// visited, which bounds the work of huge boxes (see roi_math.h). Each channel's sum runs over
// the samples in row-then-column order, the order of the CUDA kernel and of detectron2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../map_set.h"
#include "../roi_math.h"
#include "output_cache.h"
#include "tiled.h"

namespace roi_kernels {
namespace {

using cpu::BoxSource;
using cpu::Tile;
using cpu::Window;

// The cells a box's samples read: every sample's taps, enumerated once with the map's own
// element offsets (row stride = width) and decoded back into rows and columns.
template <typename acc_t>
Window rotated_window(
    const math::RotatedGeometry<acc_t>& g,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t height,
    int64_t width) {
  int64_t y0 = std::numeric_limits<int64_t>::max(), y1 = std::numeric_limits<int64_t>::min();
  int64_t x0 = y0, x1 = y1;
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      math::for_each_rotated_sample(g, ph, pw, height, width, width, 1, [&](const math::BilinearTaps<acc_t>& t) {
        // o1 is (y lo, x lo), o4 (y hi, x hi): the sample's corner cells.
        y0 = std::min(y0, t.o1 / width);
        x0 = std::min(x0, t.o1 % width);
        y1 = std::max(y1, t.o4 / width + 1);
        x1 = std::max(x1, t.o4 % width + 1);
      });
    }
  }
  if (y1 <= y0 || x1 <= x0) {
    return Window{};
  }
  return Window{y0, y1, x0, x1};
}

template <int B, typename acc_t>
inline void accumulate_rotated(
    const Tile<acc_t>& tile,
    const math::RotatedGeometry<acc_t>& g,
    int64_t ph,
    int64_t pw,
    int64_t height,
    int64_t width,
    acc_t* out) {
  acc_t v[B];
  for (int j = 0; j < B; ++j) {
    v[j] = acc_t(0);
  }
  // Taps computed with the tile's strides, then moved to its origin (the window's corner).
  const acc_t* t = tile.data;
  const int64_t origin = tile.at(0, 0, B);
  math::for_each_rotated_sample(g, ph, pw, height, width, tile.width * B, B, [&](const math::BilinearTaps<acc_t>& s) {
    const acc_t* p1 = t + (s.o1 + origin);
    const acc_t* p2 = t + (s.o2 + origin);
    const acc_t* p3 = t + (s.o3 + origin);
    const acc_t* p4 = t + (s.o4 + origin);
    for (int j = 0; j < B; ++j) {
      v[j] += math::bilinear_combine(s.w, p1[j], p2[j], p3[j], p4[j]);
    }
  });
  for (int j = 0; j < B; ++j) {
    out[j] = math::average(v[j], g.count);
  }
}

template <typename scalar_t, int B>
void roi_align_rotated_cpu(
    const MapSet& s,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_images = s.num_images;
  const int64_t num_boxes = rois.size(0);
  const acc_t* r = rois.const_data_ptr<acc_t>();

  // Image n of the batch (the boxes' index) is image image_of[n].second of map image_of[n].first.
  std::vector<std::pair<int64_t, int64_t>> image_of;
  for (size_t m = 0; m < s.maps.size(); ++m) {
    for (int64_t n = 0; n < s.maps[m].size(0); ++n) {
      image_of.emplace_back(static_cast<int64_t>(m), n);
    }
  }

  std::vector<math::RotatedGeometry<acc_t>> geometry(num_boxes);
  std::vector<BoxSource> sources(num_boxes);
  at::parallel_for(0, num_boxes, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* b = r + k * 6;
      int64_t n = 0;
      BoxSource& src = sources[k];
      if (!math::batch_index(b[0], num_images, n)) {
        src.map = -1;  // checked before the kernel; guarded here all the same
        continue;
      }
      geometry[k] = math::rotated_geometry<acc_t>(
          b[1], b[2], b[3], b[4], b[5], static_cast<acc_t>(spatial_scale), aligned, pooled_height, pooled_width,
          sampling_ratio);
      src.map = image_of[n].first;
      src.image = image_of[n].second;
      const at::Tensor& m = s.maps[src.map];
      src.window = rotated_window(geometry[k], pooled_height, pooled_width, m.size(2), m.size(3));
    }
  });

  const int64_t bins = pooled_height * pooled_width;
  cpu::run_tiled<scalar_t, acc_t, B>(
      s.maps, sources, s.channels, bins, out, [&](int64_t k, const Tile<acc_t>& tile, acc_t* acc) {
        const math::RotatedGeometry<acc_t>& g = geometry[k];
        const at::Tensor& m = s.maps[sources[k].map];
        const int64_t height = m.size(2), width = m.size(3);
        for (int64_t ph = 0; ph < pooled_height; ++ph) {
          for (int64_t pw = 0; pw < pooled_width; ++pw) {
            accumulate_rotated<B>(tile, g, ph, pw, height, width, acc + (ph * pooled_width + pw) * B);
          }
        }
      });
}

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
    TORCH_CHECK(m.device().is_cpu(), "the CPU roi_align_rotated got input on ", m.device());
  }
  checks::check_batch_index(rois, s.num_images, "rois");
  const at::Tensor r = checks::rois_for_kernel(rois, first.scalar_type());
  at::Tensor out = cpu::OutputCache::get().empty({r.size(0), s.channels, pooled_height, pooled_width}, first.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "roi_align_rotated", [&] {
    cpu::dispatch_block<scalar_t>(s.channels, [&](auto block) {
      constexpr int B = decltype(block)::value;
      roi_align_rotated_cpu<scalar_t, B>(
          s, r, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, out);
    });
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

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("roi_align_rotated", &roi_align_rotated_forward_kernel);
  m.impl("roi_align_rotated_ragged", &roi_align_rotated_ragged_forward_kernel);
}

}  // namespace roi_kernels
