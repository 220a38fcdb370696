// The gradient of roi_pool with respect to its input maps on the CPU (one map or a ragged
// batch of per-image maps), exactly as torchvision's: each bin's output gradient goes to the
// cell that gave the bin's maximum, recomputed here from the input as the forward chose it (the
// first cell, rows then columns, whose value beats the running maximum, which starts at
// -FLT_MAX; an empty bin, a bin of NaN cells and a box with a NaN coordinate pass none). The
// boxes get no gradient.
//
// Work and determinism: cpu/backward_common.h (tasks own (plane, channel block); each element's
// sum runs over the boxes in their order, then the bins, whatever the thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../checks.h"
#include "../map_set.h"
#include "../roi_math.h"
#include "backward_common.h"

namespace roi_kernels {
namespace {

using cpu::backward::Buckets;
using cpu::backward::Plane;
using cpu::backward::Setup;
using cpu::backward::Tile;
using cpu::backward::Window;

// Cells of each bin row / column: rows [ys[ph], ye[ph]), columns [xs[pw], xe[pw]).
struct PoolPlan {
  std::vector<int64_t> ys, ye, xs, xe;
};

template <typename scalar_t, int B>
void roi_pool_backward_cpu(Setup& st, const at::Tensor& grad, double spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  using acc_t = at::opmath_type<scalar_t>;
  const MapSet& s = st.set;
  const int64_t num_boxes = s.rois.size(0);
  const acc_t* rois = s.rois.const_data_ptr<acc_t>();
  const math::MapSelection selection = s.selection();
  std::vector<int64_t> base;
  const std::vector<Plane<scalar_t>> planes = cpu::backward::planes_of<scalar_t>(st.grads, st.inputs, base);

  std::vector<PoolPlan> plans(num_boxes);
  std::vector<int64_t> plane_of(num_boxes, -1);
  std::vector<Window> box_window(num_boxes);
  std::vector<double> cost(num_boxes, 0.0);
  at::parallel_for(0, num_boxes, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* r = rois + k * 5;
      int64_t map = 0, image = 0;
      if (!math::select_map(selection, r, map, image)) {
        continue;
      }
      const int64_t height = s.maps[map].size(2), width = s.maps[map].size(3);
      const math::PoolBox box = math::roi_pool_box<acc_t>(r[1], r[2], r[3], r[4], static_cast<acc_t>(spatial_scale));
      if (!box.ok) {
        continue;
      }
      PoolPlan& plan = plans[k];
      plan.ys.resize(pooled_height);
      plan.ye.resize(pooled_height);
      plan.xs.resize(pooled_width);
      plan.xe.resize(pooled_width);
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        math::roi_pool_bin<acc_t>(box.start_y, box.roi_h, pooled_height, ph, height, plan.ys[ph], plan.ye[ph]);
      }
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        math::roi_pool_bin<acc_t>(box.start_x, box.roi_w, pooled_width, pw, width, plan.xs[pw], plan.xe[pw]);
      }
      // Bins are monotone along each axis, so the first and last bins bound the window.
      Window w{plan.ys.front(), plan.ye.back(), plan.xs.front(), plan.xe.back()};
      if (w.empty()) {
        continue;
      }
      box_window[k] = w;
      plane_of[k] = base[map] + image;
      cost[k] = static_cast<double>(w.y1 - w.y0) * static_cast<double>(w.x1 - w.x0) + 1.0;
    }
  });
  const int64_t num_planes = static_cast<int64_t>(planes.size());
  const Buckets buckets = cpu::backward::bucket_boxes(plane_of, num_planes);
  std::vector<Window> windows(num_planes);
  for (int64_t p = 0; p < num_planes; ++p) {
    for (int64_t i = buckets.begin[p]; i < buckets.begin[p + 1]; ++i) {
      windows[p].add(box_window[buckets.boxes[i]]);
    }
  }

  const scalar_t* go = grad.const_data_ptr<scalar_t>();
  const int64_t strides[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
  const int64_t bins = pooled_height * pooled_width;
  cpu::backward::run_tasks<B, scalar_t, acc_t>(
      planes, buckets, windows, cost, s.channels, /*with_input=*/true,
      [&](int64_t k, int64_t c0, int64_t cn, Tile<acc_t, B>& tile, const Tile<acc_t, B>& in_tile) {
        thread_local std::vector<acc_t> scratch;
        scratch.resize(static_cast<size_t>(bins * B));
        acc_t* g = scratch.data();
        cpu::backward::gather_grad<B>(go, strides, k, c0, cn, pooled_height, pooled_width, g);
        const PoolPlan& plan = plans[k];
        for (int64_t ph = 0; ph < pooled_height; ++ph) {
          for (int64_t pw = 0; pw < pooled_width; ++pw) {
            if (math::pool_bin_empty(plan.ys[ph], plan.ye[ph], plan.xs[pw], plan.xe[pw])) {
              continue;
            }
            acc_t best[B];
            int64_t arg[B];
            for (int j = 0; j < B; ++j) {
              best[j] = math::pool_max_init<acc_t>();
              arg[j] = -1;
            }
            for (int64_t y = plan.ys[ph]; y < plan.ye[ph]; ++y) {
              for (int64_t x = plan.xs[pw]; x < plan.xe[pw]; ++x) {
                const int64_t o = in_tile.at(y, x);
                const acc_t* c = in_tile.data + o;
                for (int j = 0; j < B; ++j) {
                  if (c[j] > best[j]) {
                    best[j] = c[j];
                    arg[j] = o;
                  }
                }
              }
            }
            const acc_t* gb = g + (ph * pooled_width + pw) * B;
            for (int64_t j = 0; j < cn; ++j) {
              if (arg[j] >= 0) {
                tile.data[arg[j] + j] += gb[j];
              }
            }
          }
        }
      });
}

std::vector<at::Tensor> run(
    Setup& st,
    const at::Tensor& grad,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    const char* op) {
  TORCH_CHECK(grad.device().is_cpu(), "the CPU ", op, " got grad on ", grad.device());
  checks::check_rois(rois, grad, 5);
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  cpu::backward::check_grad(grad, rois.size(0), st.set.channels, pooled_height, pooled_width, op);
  for (size_t m = 0; m < st.inputs.size(); ++m) {
    TORCH_CHECK(
        st.inputs[m].scalar_type() == grad.scalar_type() && st.inputs[m].device().is_cpu(),
        op,
        ": input map ",
        m,
        " must be a CPU tensor of grad's dtype (",
        grad.scalar_type(),
        "), got ",
        st.inputs[m].scalar_type(),
        " on ",
        st.inputs[m].device());
  }
  checks::check_batch_index(rois, st.set.num_images);
  st.set.rois = checks::rois_for_kernel(rois, grad.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward", [&] {
    cpu::backward::dispatch_block(st.set.channels, [&](auto block) {
      constexpr int B = decltype(block)::value;
      roi_pool_backward_cpu<scalar_t, B>(st, grad, spatial_scale, pooled_height, pooled_width);
    });
  });
  return st.results;
}

at::Tensor roi_pool_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& input,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  Setup st;
  checks::check_map(input, 4, "input");
  const std::vector<bool> flags = {cpu::backward::prefers_channels_last(input)};
  const at::Tensor inputs[1] = {input};
  cpu::backward::allocate(st, grad, input.sizes(), flags, 4, at::TensorList(inputs, 1));
  st.set.scales = {spatial_scale};
  st.set.select = MapSelect::kSingle;
  st.set.num_images = input.size(0);
  return run(st, grad, rois, spatial_scale, pooled_height, pooled_width, "roi_pool_backward")[0];
}

std::vector<at::Tensor> roi_pool_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::TensorList features,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  const MapSet maps = ragged_maps(features);  // checks the list
  std::vector<int64_t> sizes;
  std::vector<bool> flags(features.size());
  for (size_t i = 0; i < features.size(); ++i) {
    sizes.insert(sizes.end(), features[i].sizes().begin(), features[i].sizes().end());
    flags[i] = cpu::backward::prefers_channels_last(features[i]);
  }
  Setup st;
  cpu::backward::allocate(st, grad, sizes, flags, 3, features);
  st.set.scales.assign(st.grads.size(), spatial_scale);
  st.set.select = MapSelect::kRagged;
  st.set.num_images = maps.num_images;
  return run(st, grad, rois, spatial_scale, pooled_height, pooled_width, "roi_pool_ragged_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("roi_pool_backward", &roi_pool_backward_kernel);
  m.impl("roi_pool_ragged_backward", &roi_pool_ragged_backward_kernel);
}

}  // namespace roi_kernels
