// roi_align on the CPU: single map, ragged per-image maps, and FPN levels, avg and max pooling.
//
// Per box, the sample geometry is separable: the y taps of each bin row and the x taps of each
// bin column (roi_math.h's sample_range / sample_coord / axis_tap) are computed once and
// reused for every channel. The channel loop runs over packed tiles of kBlock channels
// (cpu/tiled.h), so each of a sample's 4 taps is a contiguous vector of channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../map_set.h"
#include "../roi_math.h"
#include "output_cache.h"
#include "tiled.h"

namespace roi_kernels {
namespace {

using checks::PoolMode;
using cpu::BoxSource;
using cpu::Tile;
using cpu::Window;

// The valid taps of every bin along one axis: taps[begin[p] .. begin[p + 1]) belong to bin p.
template <typename acc_t>
struct AxisPlan {
  std::vector<math::AxisTap<acc_t>> taps;
  std::vector<int64_t> begin;

  // Fills the plan and returns the cells [lo, hi) the taps read.
  void build(acc_t start, acc_t bin, int64_t pooled, int64_t grid, int64_t size, int64_t& lo, int64_t& hi) {
    taps.clear();
    begin.assign(pooled + 1, 0);
    lo = std::numeric_limits<int64_t>::max();
    hi = std::numeric_limits<int64_t>::min();
    for (int64_t p = 0; p < pooled; ++p) {
      int64_t first = 0, last = 0;
      math::sample_range(start, bin, p, grid, size, first, last);
      for (int64_t i = first; i < last; ++i) {
        math::AxisTap<acc_t> tap;
        if (math::axis_tap(math::sample_coord(start, bin, p, i, grid), size, tap)) {
          taps.push_back(tap);
          lo = std::min(lo, tap.lo);
          hi = std::max(hi, tap.hi + 1);
        }
      }
      begin[p + 1] = static_cast<int64_t>(taps.size());
    }
  }
  int64_t count(int64_t p) const {
    return begin[p + 1] - begin[p];
  }
};

template <typename acc_t>
struct AlignPlan {
  AxisPlan<acc_t> y, x;
  acc_t count = 1;
  int64_t grid = 0;  // samples per bin: grid_h * grid_w (saturating)
};

// Which map and image a box reads, per the map set's selection rule. False: no valid image.
template <typename acc_t>
bool select_map(const MapSet& s, const acc_t* r, int64_t& map, int64_t& image) {
  int64_t idx = 0;
  if (!math::batch_index(r[0], s.num_images, idx)) {
    return false;
  }
  switch (s.select) {
    case MapSelect::kSingle:
      map = 0;
      image = idx;
      break;
    case MapSelect::kRagged:
      map = idx;
      image = 0;
      break;
    case MapSelect::kLevels:
      map = math::fpn_level(r[1], r[2], r[3], r[4], s.canonical_scale, s.canonical_level, s.k_min, s.k_max);
      image = idx;
      break;
  }
  return map >= 0 && map < static_cast<int64_t>(s.maps.size());
}

template <int B, typename acc_t>
inline void accumulate_avg(const Tile<acc_t>& tile, const AlignPlan<acc_t>& plan, int64_t ph, int64_t pw, acc_t* out) {
  acc_t v[B];
  for (int j = 0; j < B; ++j) {
    v[j] = acc_t(0);
  }
  const acc_t* t = tile.data;
  for (int64_t a = plan.y.begin[ph]; a < plan.y.begin[ph + 1]; ++a) {
    const math::AxisTap<acc_t>& ty = plan.y.taps[a];
    for (int64_t b = plan.x.begin[pw]; b < plan.x.begin[pw + 1]; ++b) {
      const math::AxisTap<acc_t>& tx = plan.x.taps[b];
      const acc_t w1 = ty.h * tx.h, w2 = ty.h * tx.l, w3 = ty.l * tx.h, w4 = ty.l * tx.l;
      const acc_t* p1 = t + tile.at(ty.lo, tx.lo, B);
      const acc_t* p2 = t + tile.at(ty.lo, tx.hi, B);
      const acc_t* p3 = t + tile.at(ty.hi, tx.lo, B);
      const acc_t* p4 = t + tile.at(ty.hi, tx.hi, B);
      for (int j = 0; j < B; ++j) {
        v[j] += w1 * p1[j] + w2 * p2[j] + w3 * p3[j] + w4 * p4[j];
      }
    }
  }
  for (int j = 0; j < B; ++j) {
    out[j] = v[j] / plan.count;
  }
}

template <int B, typename acc_t>
inline void accumulate_max(const Tile<acc_t>& tile, const AlignPlan<acc_t>& plan, int64_t ph, int64_t pw, acc_t* out) {
  const int64_t valid = plan.y.count(ph) * plan.x.count(pw);
  // Off-map samples are worth 0 and take part in the max; a bin with no samples gives 0.
  const acc_t init = (plan.grid == 0 || valid < plan.grid) ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();
  acc_t v[B];
  for (int j = 0; j < B; ++j) {
    v[j] = init;
  }
  const acc_t* t = tile.data;
  for (int64_t a = plan.y.begin[ph]; a < plan.y.begin[ph + 1]; ++a) {
    const math::AxisTap<acc_t>& ty = plan.y.taps[a];
    for (int64_t b = plan.x.begin[pw]; b < plan.x.begin[pw + 1]; ++b) {
      const math::AxisTap<acc_t>& tx = plan.x.taps[b];
      const acc_t w1 = ty.h * tx.h, w2 = ty.h * tx.l, w3 = ty.l * tx.h, w4 = ty.l * tx.l;
      const acc_t* p1 = t + tile.at(ty.lo, tx.lo, B);
      const acc_t* p2 = t + tile.at(ty.lo, tx.hi, B);
      const acc_t* p3 = t + tile.at(ty.hi, tx.lo, B);
      const acc_t* p4 = t + tile.at(ty.hi, tx.hi, B);
      for (int j = 0; j < B; ++j) {
        const acc_t s = w1 * p1[j] + w2 * p2[j] + w3 * p3[j] + w4 * p4[j];
        v[j] = s > v[j] ? s : v[j];
      }
    }
  }
  for (int j = 0; j < B; ++j) {
    out[j] = v[j];
  }
}

template <typename scalar_t, int B>
void roi_align_cpu(
    const MapSet& s,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    PoolMode mode,
    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_boxes = s.rois.size(0);
  const acc_t* rois = s.rois.const_data_ptr<acc_t>();

  std::vector<AlignPlan<acc_t>> plans(num_boxes);
  std::vector<BoxSource> sources(num_boxes);
  at::parallel_for(0, num_boxes, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* r = rois + k * 5;
      BoxSource& src = sources[k];
      int64_t map = 0, image = 0;
      if (!select_map(s, r, map, image)) {
        src.map = -1;
        continue;
      }
      const at::Tensor& m = s.maps[map];
      const int64_t height = m.size(2), width = m.size(3);
      const auto g = math::align_geometry<acc_t>(
          r[1], r[2], r[3], r[4], static_cast<acc_t>(s.scales[map]), aligned, pooled_height, pooled_width,
          sampling_ratio);
      AlignPlan<acc_t>& plan = plans[k];
      plan.count = g.count;
      plan.grid = (g.grid_h > 0 && g.grid_w > 0) ? std::min<int64_t>(g.grid_h, math::kMaxGrid) *
              std::min<int64_t>(g.grid_w, math::kMaxGrid)
                                                 : 0;
      Window& w = src.window;
      plan.y.build(g.start_y, g.bin_h, pooled_height, g.grid_h, height, w.y0, w.y1);
      plan.x.build(g.start_x, g.bin_w, pooled_width, g.grid_w, width, w.x0, w.x1);
      if (w.empty()) {
        w = Window{};
      }
      src.map = map;
      src.image = image;
    }
  });

  const int64_t bins = pooled_height * pooled_width;
  cpu::run_tiled<scalar_t, acc_t, B>(
      s.maps, sources, s.channels, bins, out, [&](int64_t k, const Tile<acc_t>& tile, acc_t* acc) {
        const AlignPlan<acc_t>& plan = plans[k];
        for (int64_t ph = 0; ph < pooled_height; ++ph) {
          for (int64_t pw = 0; pw < pooled_width; ++pw) {
            acc_t* o = acc + (ph * pooled_width + pw) * B;
            if (mode == PoolMode::kAvg) {
              accumulate_avg<B>(tile, plan, ph, pw, o);
            } else {
              accumulate_max<B>(tile, plan, ph, pw, o);
            }
          }
        }
      });
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
    TORCH_CHECK(m.device().is_cpu(), "the CPU roi_align got a map on ", m.device());
  }
  const int64_t num_boxes = s.rois.size(0);
  at::Tensor out =
      cpu::OutputCache::get().empty({num_boxes, s.channels, pooled_height, pooled_width}, s.first().options());
  if (num_boxes == 0 || s.channels == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.first().scalar_type(), "roi_align", [&] {
    cpu::dispatch_block<scalar_t>(s.channels, [&](auto block) {
      constexpr int B = decltype(block)::value;
      roi_align_cpu<scalar_t, B>(s, pooled_height, pooled_width, sampling_ratio, aligned, mode, out);
    });
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

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("roi_align", &roi_align_forward_kernel);
  m.impl("roi_align_ragged", &roi_align_ragged_forward_kernel);
  m.impl("multiscale_roi_align", &multiscale_roi_align_forward_kernel);
}

}  // namespace roi_kernels
