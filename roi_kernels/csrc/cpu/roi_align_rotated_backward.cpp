// The gradient of roi_align_rotated (detectron2's ROIAlignRotated) with respect to its input
// maps on the CPU, one map or a ragged batch of per-image maps: each bin's output gradient,
// over the bin's sample count, goes to the 4 taps of each of its samples that lands on the map
// (the samples math::for_each_rotated_sample visits, in the forward's order) with their
// bilinear weights, as detectron2's backward. The boxes get no gradient.
//
// Work and determinism: cpu/backward_common.h (tasks own (plane, channel block); each element's
// sum runs over the boxes in their order, then bins, then samples, whatever the thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// A sample's taps are recorded with the offset key y * kRowKey + x (row and column of each tap
// recoverable; maps have fewer than 2^31 rows and columns), so that a box's samples can be
// placed in any task's tile.
constexpr int64_t kRowKey = int64_t(1) << 32;

template <typename acc_t>
struct RotatedPlan {
  std::vector<math::BilinearTaps<acc_t>> taps;  // taps[begin[bin] .. begin[bin + 1]) of each bin
  std::vector<int64_t> begin;
  acc_t count = 1;
};

inline int64_t tile_offset_of(int64_t key, int64_t y0, int64_t x0, int64_t width, int64_t block) {
  return ((key / kRowKey - y0) * width + (key % kRowKey - x0)) * block;
}

template <typename scalar_t, int B>
void roi_align_rotated_backward_cpu(
    Setup& st,
    const at::Tensor& grad,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  const MapSet& s = st.set;
  const int64_t num_boxes = s.rois.size(0);
  const acc_t* rois = s.rois.const_data_ptr<acc_t>();
  const math::MapSelection selection = s.selection();
  std::vector<int64_t> base;
  const std::vector<Plane<scalar_t>> planes = cpu::backward::planes_of<scalar_t>(st.grads, st.inputs, base);
  const int64_t bins = pooled_height * pooled_width;

  std::vector<RotatedPlan<acc_t>> plans(num_boxes);
  std::vector<int64_t> plane_of(num_boxes, -1);
  std::vector<Window> box_window(num_boxes);
  std::vector<double> cost(num_boxes, 0.0);
  at::parallel_for(0, num_boxes, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* r = rois + k * 6;
      int64_t map = 0, image = 0;
      // select_map reads (index, x1, y1, x2, y2) but kSingle / kRagged use the index only.
      if (!math::select_map(selection, r, map, image)) {
        continue;
      }
      const int64_t height = s.maps[map].size(2), width = s.maps[map].size(3);
      const auto g = math::rotated_geometry<acc_t>(
          r[1], r[2], r[3], r[4], r[5], static_cast<acc_t>(spatial_scale), aligned, pooled_height, pooled_width,
          sampling_ratio);
      RotatedPlan<acc_t>& plan = plans[k];
      plan.count = g.count;
      plan.begin.assign(bins + 1, 0);
      Window w;
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          math::for_each_rotated_sample(g, ph, pw, height, width, kRowKey, 1, [&](const math::BilinearTaps<acc_t>& t) {
            plan.taps.push_back(t);
            const int64_t ylo = t.o1 / kRowKey, xlo = t.o1 % kRowKey;
            const int64_t yhi = t.o4 / kRowKey, xhi = t.o4 % kRowKey;
            w.add_cell_range(ylo, yhi + 1, xlo, xhi + 1);
          });
          plan.begin[ph * pooled_width + pw + 1] = static_cast<int64_t>(plan.taps.size());
        }
      }
      if (w.empty()) {
        continue;
      }
      box_window[k] = w;
      plane_of[k] = base[map] + image;
      cost[k] = static_cast<double>(plan.taps.size()) + 1.0;
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
  cpu::backward::run_tasks<B, scalar_t, acc_t>(
      planes, buckets, windows, cost, s.channels, /*with_input=*/false,
      [&](int64_t k, int64_t c0, int64_t cn, Tile<acc_t, B>& tile, const Tile<acc_t, B>&) {
        thread_local std::vector<acc_t> scratch;
        scratch.resize(static_cast<size_t>(bins * B));
        acc_t* g = scratch.data();
        cpu::backward::gather_grad<B>(go, strides, k, c0, cn, pooled_height, pooled_width, g);
        const RotatedPlan<acc_t>& plan = plans[k];
        const int64_t y0 = tile.win.y0, x0 = tile.win.x0, width = tile.width;
        for (int64_t bin = 0; bin < bins; ++bin) {
          acc_t* gb = g + bin * B;
          for (int j = 0; j < B; ++j) {
            gb[j] = gb[j] / plan.count;
          }
          for (int64_t i = plan.begin[bin]; i < plan.begin[bin + 1]; ++i) {
            const math::BilinearTaps<acc_t>& t = plan.taps[i];
            cpu::backward::scatter_sample<B>(
                tile.data, tile_offset_of(t.o1, y0, x0, width, B), tile_offset_of(t.o2, y0, x0, width, B),
                tile_offset_of(t.o3, y0, x0, width, B), tile_offset_of(t.o4, y0, x0, width, B), t.w, gb);
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
    int64_t sampling_ratio,
    bool aligned,
    const char* op) {
  TORCH_CHECK(grad.device().is_cpu(), "the CPU ", op, " got grad on ", grad.device());
  checks::check_rois(rois, grad, 6, "rois");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  checks::check_sampling_ratio(sampling_ratio);
  cpu::backward::check_grad(grad, rois.size(0), st.set.channels, pooled_height, pooled_width, op);
  checks::check_batch_index(rois, st.set.num_images, "rois");
  st.set.rois = checks::rois_for_kernel(rois, grad.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_rotated_backward", [&] {
    cpu::backward::dispatch_block(st.set.channels, [&](auto block) {
      constexpr int B = decltype(block)::value;
      roi_align_rotated_backward_cpu<scalar_t, B>(
          st, grad, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
    });
  });
  return st.results;
}

at::Tensor roi_align_rotated_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef input_size,
    bool channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  TORCH_CHECK(input_size.size() == 4, "roi_align_rotated_backward: input_size must be [N, C, H, W], got ", input_size);
  Setup st;
  const std::vector<bool> flags = {channels_last};
  cpu::backward::allocate(st, grad, input_size, flags, 4, {});
  st.set.scales = {spatial_scale};
  st.set.select = MapSelect::kSingle;
  st.set.num_images = input_size[0];
  return run(
      st, grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
      "roi_align_rotated_backward")[0];
}

std::vector<at::Tensor> roi_align_rotated_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  Setup st;
  cpu::backward::allocate(st, grad, sizes, cpu::backward::flags_of(channels_last), 3, {});
  st.set.scales.assign(st.grads.size(), spatial_scale);
  st.set.select = MapSelect::kRagged;
  st.set.num_images = static_cast<int64_t>(st.grads.size());
  return run(
      st, grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
      "roi_align_rotated_ragged_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("roi_align_rotated_backward", &roi_align_rotated_backward_kernel);
  m.impl("roi_align_rotated_ragged_backward", &roi_align_rotated_ragged_backward_kernel);
}

}  // namespace roi_kernels
