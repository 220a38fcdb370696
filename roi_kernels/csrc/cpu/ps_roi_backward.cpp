// The gradients of ps_roi_align and ps_roi_pool (R-FCN) with respect to their input maps on the
// CPU, one map or a ragged batch of per-image maps, as torchvision's: output channel c of bin
// (ph, pw) read input channel (c * PH + ph) * PW + pw, so its gradient goes to that channel
// only: to the 4 taps of each of the bin's samples, over the sample count (ps_roi_align), or
// evenly to the bin's cells (ps_roi_pool; an empty bin passes none). ps_roi_pool's gradient is
// torchvision's backward, whose bins are clipped to the map [0, H] x [0, W] where its forward's
// are clipped to H - 1 and W - 1 (so it is not exactly the derivative of the forward at boxes
// that reach the last row or column). The boxes get no gradient.
//
// Work and determinism: cpu/backward_common.h. A task owns a block of input channels of one
// plane; each of its channels belongs to one bin, so per box it visits that bin's samples.
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

using cpu::backward::AxisPlan;
using cpu::backward::Buckets;
using cpu::backward::Plane;
using cpu::backward::Setup;
using cpu::backward::Tile;
using cpu::backward::Window;

enum class Kind { kAlign, kPool };

// A box's bins: ps_roi_align's per-axis taps, or ps_roi_pool's cells [ys, ye) x [xs, xe).
template <typename acc_t>
struct PsPlan {
  AxisPlan<acc_t> y, x;
  acc_t count = 1;
  std::vector<int64_t> ys, ye, xs, xe;
};

template <typename scalar_t, int B>
void ps_backward_cpu(
    Kind kind,
    Setup& st,
    const at::Tensor& grad,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  using acc_t = at::opmath_type<scalar_t>;
  const MapSet& s = st.set;
  const int64_t num_boxes = s.rois.size(0);
  const acc_t* rois = s.rois.const_data_ptr<acc_t>();
  const math::MapSelection selection = s.selection();
  std::vector<int64_t> base;
  const std::vector<Plane<scalar_t>> planes = cpu::backward::planes_of<scalar_t>(st.grads, st.inputs, base);
  const int64_t bins = pooled_height * pooled_width;

  std::vector<PsPlan<acc_t>> plans(num_boxes);
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
      const acc_t scale = static_cast<acc_t>(spatial_scale);
      PsPlan<acc_t>& plan = plans[k];
      Window w;
      if (kind == Kind::kAlign) {
        const auto g = math::ps_align_geometry<acc_t>(r[1], r[2], r[3], r[4], scale, pooled_height, pooled_width, sampling_ratio);
        plan.count = g.count;
        plan.y.build(g.start_y, g.bin_h, pooled_height, g.grid_h, height, w.y0, w.y1);
        plan.x.build(g.start_x, g.bin_w, pooled_width, g.grid_w, width, w.x0, w.x1);
        cost[k] = static_cast<double>(plan.y.taps.size()) * static_cast<double>(plan.x.taps.size()) / bins + 1.0;
      } else {
        const math::PoolBox box = math::ps_roi_pool_box<acc_t>(r[1], r[2], r[3], r[4], scale);
        if (!box.ok) {
          continue;
        }
        plan.ys.resize(pooled_height);
        plan.ye.resize(pooled_height);
        plan.xs.resize(pooled_width);
        plan.xe.resize(pooled_width);
        // torchvision's ps_roi_pool backward clips the bins to the map [0, size] (its forward,
        // and ours, to size - 1): the gradient is torchvision's, so that training through
        // ps_roi_pool is what it is with torchvision.
        for (int64_t ph = 0; ph < pooled_height; ++ph) {
          math::pool_bin<acc_t>(box.start_y, box.roi_h, pooled_height, ph, height, plan.ys[ph], plan.ye[ph]);
        }
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          math::pool_bin<acc_t>(box.start_x, box.roi_w, pooled_width, pw, width, plan.xs[pw], plan.xe[pw]);
        }
        w = Window{plan.ys.front(), plan.ye.back(), plan.xs.front(), plan.xe.back()};
        cost[k] = static_cast<double>(w.y1 - w.y0) * static_cast<double>(w.x1 - w.x0) / bins + 1.0;
      }
      if (w.empty()) {
        continue;
      }
      box_window[k] = w;
      plane_of[k] = base[map] + image;
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
  const int64_t s0 = grad.stride(0), s1 = grad.stride(1), s2 = grad.stride(2), s3 = grad.stride(3);
  cpu::backward::run_tasks<B, scalar_t, acc_t>(
      planes, buckets, windows, cost, s.channels, /*with_input=*/false,
      [&](int64_t k, int64_t c0, int64_t cn, Tile<acc_t, B>& tile, const Tile<acc_t, B>&) {
        const PsPlan<acc_t>& plan = plans[k];
        for (int64_t j = 0; j < cn; ++j) {
          const int64_t ci = c0 + j;
          const int64_t c_out = ci / bins, bin = ci % bins;
          const int64_t ph = bin / pooled_width, pw = bin % pooled_width;
          const acc_t go_v = static_cast<acc_t>(go[k * s0 + c_out * s1 + ph * s2 + pw * s3]);
          if (kind == Kind::kAlign) {
            const acc_t gd = go_v / plan.count;
            for (int64_t a = plan.y.begin[ph]; a < plan.y.begin[ph + 1]; ++a) {
              const math::AxisTap<acc_t>& ty = plan.y.taps[a];
              for (int64_t b = plan.x.begin[pw]; b < plan.x.begin[pw + 1]; ++b) {
                const math::AxisTap<acc_t>& tx = plan.x.taps[b];
                const math::BilinearWeights<acc_t> w = math::bilinear_weights(ty, tx);
                tile.data[tile.at(ty.lo, tx.lo) + j] += gd * w.w1;
                tile.data[tile.at(ty.lo, tx.hi) + j] += gd * w.w2;
                tile.data[tile.at(ty.hi, tx.lo) + j] += gd * w.w3;
                tile.data[tile.at(ty.hi, tx.hi) + j] += gd * w.w4;
              }
            }
          } else {
            const int64_t ys = plan.ys[ph], ye = plan.ye[ph], xs = plan.xs[pw], xe = plan.xe[pw];
            if (math::pool_bin_empty(ys, ye, xs, xe)) {
              continue;
            }
            const acc_t gd = go_v / math::pool_bin_area<acc_t>(ys, ye, xs, xe);
            for (int64_t y = ys; y < ye; ++y) {
              for (int64_t x = xs; x < xe; ++x) {
                tile.data[tile.at(y, x) + j] += gd;
              }
            }
          }
        }
      });
}

std::vector<at::Tensor> run(
    Kind kind,
    Setup& st,
    const at::Tensor& grad,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    const char* op) {
  TORCH_CHECK(grad.device().is_cpu(), "the CPU ", op, " got grad on ", grad.device());
  checks::check_rois(rois, grad, 5, "boxes");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  checks::check_sampling_ratio(sampling_ratio);
  const int64_t bins = pooled_height * pooled_width;
  TORCH_CHECK(
      st.set.channels % bins == 0,
      op,
      ": the input has ",
      st.set.channels,
      " channels, which is not a multiple of output_size[0] * output_size[1] = ",
      pooled_height,
      " * ",
      pooled_width);
  cpu::backward::check_grad(grad, rois.size(0), st.set.channels / bins, pooled_height, pooled_width, op);
  checks::check_batch_index(rois, st.set.num_images, "boxes");
  st.set.rois = checks::rois_for_kernel(rois, grad.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_roi_backward", [&] {
    cpu::backward::dispatch_block(st.set.channels, [&](auto block) {
      constexpr int B = decltype(block)::value;
      ps_backward_cpu<scalar_t, B>(kind, st, grad, spatial_scale, pooled_height, pooled_width, sampling_ratio);
    });
  });
  return st.results;
}

std::vector<at::Tensor> single(
    Kind kind,
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef input_size,
    bool channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    const char* op) {
  TORCH_CHECK(input_size.size() == 4, op, ": input_size must be [N, C, H, W], got ", input_size);
  Setup st;
  const std::vector<bool> flags = {channels_last};
  cpu::backward::allocate(st, grad, input_size, flags, 4, {});
  st.set.scales = {spatial_scale};
  st.set.select = MapSelect::kSingle;
  st.set.num_images = input_size[0];
  return run(kind, st, grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, op);
}

std::vector<at::Tensor> ragged(
    Kind kind,
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    const char* op) {
  Setup st;
  cpu::backward::allocate(st, grad, sizes, cpu::backward::flags_of(channels_last), 3, {});
  st.set.scales.assign(st.grads.size(), spatial_scale);
  st.set.select = MapSelect::kRagged;
  st.set.num_images = static_cast<int64_t>(st.grads.size());
  return run(kind, st, grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, op);
}

at::Tensor ps_roi_align_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef input_size,
    bool channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  return single(
      Kind::kAlign, grad, rois, input_size, channels_last, spatial_scale, pooled_height, pooled_width, sampling_ratio,
      "ps_roi_align_backward")[0];
}

std::vector<at::Tensor> ps_roi_align_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  return ragged(
      Kind::kAlign, grad, rois, sizes, channels_last, spatial_scale, pooled_height, pooled_width, sampling_ratio,
      "ps_roi_align_ragged_backward");
}

at::Tensor ps_roi_pool_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef input_size,
    bool channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return single(
      Kind::kPool, grad, rois, input_size, channels_last, spatial_scale, pooled_height, pooled_width, 1,
      "ps_roi_pool_backward")[0];
}

std::vector<at::Tensor> ps_roi_pool_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return ragged(
      Kind::kPool, grad, rois, sizes, channels_last, spatial_scale, pooled_height, pooled_width, 1,
      "ps_roi_pool_ragged_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("ps_roi_align_backward", &ps_roi_align_backward_kernel);
  m.impl("ps_roi_align_ragged_backward", &ps_roi_align_ragged_backward_kernel);
  m.impl("ps_roi_pool_backward", &ps_roi_pool_backward_kernel);
  m.impl("ps_roi_pool_ragged_backward", &ps_roi_pool_ragged_backward_kernel);
}

}  // namespace roi_kernels
