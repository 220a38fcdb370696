// roi_pool (Fast R-CNN) on the CPU, over one map or a ragged batch of per-image maps: per box,
// each bin's snapped rows and columns (roi_math.h's roi_pool_box / roi_pool_bin) are computed
// once; the max runs over packed tiles of kBlock channels (cpu/tiled.h), so each cell visited is
// a contiguous vector of channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Cells of each bin row / column: rows [ys[ph], ye[ph]), columns [xs[pw], xe[pw]).
struct PoolPlan {
  std::vector<int64_t> ys, ye, xs, xe;
  bool ok = true;
};

template <typename scalar_t, int B>
void roi_pool_cpu(
    const MapSet& s,
    const at::Tensor& rois_acc,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_boxes = rois_acc.size(0);
  const acc_t* rois = rois_acc.const_data_ptr<acc_t>();
  const math::MapSelection selection = s.selection();

  std::vector<PoolPlan> plans(num_boxes);
  std::vector<BoxSource> sources(num_boxes);
  at::parallel_for(0, num_boxes, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* r = rois + k * 5;
      BoxSource& src = sources[k];
      int64_t map = 0, image = 0;
      if (!math::select_map(selection, r, map, image)) {
        src.map = -1;
        continue;
      }
      const int64_t height = s.maps[map].size(2), width = s.maps[map].size(3);
      const math::PoolBox box = math::roi_pool_box<acc_t>(r[1], r[2], r[3], r[4], static_cast<acc_t>(spatial_scale));
      PoolPlan& plan = plans[k];
      plan.ok = box.ok;
      plan.ys.resize(pooled_height);
      plan.ye.resize(pooled_height);
      plan.xs.resize(pooled_width);
      plan.xe.resize(pooled_width);
      Window w;
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        math::roi_pool_bin<acc_t>(box.start_y, box.roi_h, pooled_height, ph, height, plan.ys[ph], plan.ye[ph]);
      }
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        math::roi_pool_bin<acc_t>(box.start_x, box.roi_w, pooled_width, pw, width, plan.xs[pw], plan.xe[pw]);
      }
      if (box.ok) {
        // Bins are monotone along each axis, so the first and last bins bound the window.
        w = Window{plan.ys.front(), plan.ye.back(), plan.xs.front(), plan.xe.back()};
        if (w.empty()) {
          w = Window{};
        }
      }
      src.map = map;
      src.image = image;
      src.window = w;
    }
  });

  const int64_t bins = pooled_height * pooled_width;
  cpu::run_tiled<scalar_t, acc_t, B>(
      s.maps, sources, s.channels, bins, out, [&](int64_t k, const Tile<acc_t>& tile, acc_t* acc) {
        const PoolPlan& plan = plans[k];
        for (int64_t ph = 0; ph < pooled_height; ++ph) {
          for (int64_t pw = 0; pw < pooled_width; ++pw) {
            acc_t* o = acc + (ph * pooled_width + pw) * B;
            const bool empty = !plan.ok || math::pool_bin_empty(plan.ys[ph], plan.ye[ph], plan.xs[pw], plan.xe[pw]);
            acc_t v[B];
            for (int j = 0; j < B; ++j) {
              v[j] = empty ? acc_t(0) : math::pool_max_init<acc_t>();
            }
            if (!empty) {
              const int64_t cols = plan.xe[pw] - plan.xs[pw];
              for (int64_t y = plan.ys[ph]; y < plan.ye[ph]; ++y) {
                const acc_t* row = tile.data + tile.at(y, plan.xs[pw], B);
                for (int64_t x = 0; x < cols; ++x) {
                  const acc_t* c = row + x * B;
                  for (int j = 0; j < B; ++j) {
                    v[j] = math::max_update(v[j], c[j]);
                  }
                }
              }
            }
            for (int j = 0; j < B; ++j) {
              o[j] = v[j];
            }
          }
        }
      });
}

at::Tensor run(
    const MapSet& s,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  const at::Tensor& first = s.first();
  checks::check_rois(rois, first, 5);
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  checks::check_batch_index(rois, s.num_images);
  for (const at::Tensor& m : s.maps) {
    TORCH_CHECK(m.device().is_cpu(), "the CPU roi_pool got a map on ", m.device());
  }
  const int64_t num_boxes = rois.size(0), channels = s.channels;
  at::Tensor out = cpu::OutputCache::get().empty({num_boxes, channels, pooled_height, pooled_width}, first.options());
  if (num_boxes == 0 || channels == 0) {
    return out;
  }
  const at::Tensor rois_acc = checks::rois_for_kernel(rois, first.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "roi_pool", [&] {
    cpu::dispatch_block<scalar_t>(channels, [&](auto block) {
      constexpr int B = decltype(block)::value;
      roi_pool_cpu<scalar_t, B>(s, rois_acc, spatial_scale, pooled_height, pooled_width, out);
    });
  });
  return out;
}

at::Tensor roi_pool_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return run(single_map(input), rois, spatial_scale, pooled_height, pooled_width);
}

at::Tensor roi_pool_ragged_forward_kernel(
    at::TensorList features,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return run(ragged_maps(features), rois, spatial_scale, pooled_height, pooled_width);
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("roi_pool", &roi_pool_forward_kernel);
  m.impl("roi_pool_ragged", &roi_pool_ragged_forward_kernel);
}

}  // namespace roi_kernels
