// roi_align on the CPU: single map, ragged per-image maps, and FPN levels (stacked or per image),
// avg and max pooling.
//
// Per box, the sample geometry is separable: the y taps of each bin row and the x taps of each
// bin column (roi_math.h's for_each_axis_tap: sample_range / sample_coord / axis_tap) are
// computed once and reused for every channel. The channel loop runs over packed tiles of
// kBlock channels (cpu/tiled.h), so each of a sample's 4 taps is a contiguous vector of channels.
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

// The valid taps of every bin along one axis: taps[begin[p] .. begin[p + 1]) belong to bin p,
// on_map[p] of them.
template <typename acc_t>
struct AxisPlan {
  std::vector<math::AxisTap<acc_t>> taps;
  std::vector<int64_t> begin;
  std::vector<int64_t> on_map;

  // Fills the plan and returns the cells [lo, hi) the taps read.
  void build(acc_t start, acc_t bin, int64_t pooled, int64_t grid, int64_t size, int64_t& lo, int64_t& hi) {
    taps.clear();
    begin.assign(pooled + 1, 0);
    on_map.assign(pooled, 0);
    lo = std::numeric_limits<int64_t>::max();
    hi = std::numeric_limits<int64_t>::min();
    for (int64_t p = 0; p < pooled; ++p) {
      math::for_each_axis_tap(start, bin, p, grid, size, [&](int64_t, const math::AxisTap<acc_t>& tap) {
        taps.push_back(tap);
        lo = std::min(lo, tap.lo);
        hi = std::max(hi, tap.hi + 1);
      });
      begin[p + 1] = static_cast<int64_t>(taps.size());
      // (the number of taps just added; counted by the function the CUDA kernel calls)
      on_map[p] = math::axis_samples_on_map(start, bin, p, grid, size);
    }
  }
};

template <typename acc_t>
struct AlignPlan {
  AxisPlan<acc_t> y, x;
  acc_t count = 1;
  int64_t samples = 0;  // samples per bin: grid_h * grid_w
};

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
      const math::BilinearWeights<acc_t> w = math::bilinear_weights(ty, tx);
      const acc_t* p1 = t + tile.at(ty.lo, tx.lo, B);
      const acc_t* p2 = t + tile.at(ty.lo, tx.hi, B);
      const acc_t* p3 = t + tile.at(ty.hi, tx.lo, B);
      const acc_t* p4 = t + tile.at(ty.hi, tx.hi, B);
      for (int j = 0; j < B; ++j) {
        v[j] += math::bilinear_combine(w, p1[j], p2[j], p3[j], p4[j]);
      }
    }
  }
  for (int j = 0; j < B; ++j) {
    out[j] = math::average(v[j], plan.count);
  }
}

template <int B, typename acc_t>
inline void accumulate_max(const Tile<acc_t>& tile, const AlignPlan<acc_t>& plan, int64_t ph, int64_t pw, acc_t* out) {
  const acc_t init = math::align_max_init<acc_t>(plan.samples, plan.y.on_map[ph] * plan.x.on_map[pw]);
  acc_t v[B];
  for (int j = 0; j < B; ++j) {
    v[j] = init;
  }
  const acc_t* t = tile.data;
  for (int64_t a = plan.y.begin[ph]; a < plan.y.begin[ph + 1]; ++a) {
    const math::AxisTap<acc_t>& ty = plan.y.taps[a];
    for (int64_t b = plan.x.begin[pw]; b < plan.x.begin[pw + 1]; ++b) {
      const math::AxisTap<acc_t>& tx = plan.x.taps[b];
      const math::BilinearWeights<acc_t> w = math::bilinear_weights(ty, tx);
      const acc_t* p1 = t + tile.at(ty.lo, tx.lo, B);
      const acc_t* p2 = t + tile.at(ty.lo, tx.hi, B);
      const acc_t* p3 = t + tile.at(ty.hi, tx.lo, B);
      const acc_t* p4 = t + tile.at(ty.hi, tx.hi, B);
      for (int j = 0; j < B; ++j) {
        v[j] = math::max_update(v[j], math::bilinear_combine(w, p1[j], p2[j], p3[j], p4[j]));
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
  const math::MapSelection selection = s.selection();

  std::vector<AlignPlan<acc_t>> plans(num_boxes);
  std::vector<BoxSource> sources(num_boxes);
  // A box's plan takes ~1 us: parallel only for many boxes.
  at::parallel_for(0, num_boxes, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* r = rois + k * 5;
      BoxSource& src = sources[k];
      int64_t map = 0, image = 0;
      if (!math::select_map(selection, r, map, image)) {
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
      plan.samples = g.samples;
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

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("roi_align", &roi_align_forward_kernel);
  m.impl("roi_align_ragged", &roi_align_ragged_forward_kernel);
  m.impl("multiscale_roi_align", &multiscale_roi_align_forward_kernel);
  m.impl("multiscale_roi_align_ragged", &multiscale_roi_align_ragged_forward_kernel);
}

}  // namespace roi_kernels
