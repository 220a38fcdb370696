// The gradient of roi_align with respect to its input maps on the CPU: single map, ragged
// per-image maps and FPN levels (stacked or per image), avg and max pooling. The boxes get no
// gradient (as in torchvision).
//
// avg: each bin's output gradient, over the bin's sample count, goes to the 4 taps of each of
// its samples with their bilinear weights (torchvision's roi_align backward). max: it goes to
// the 4 taps of the one sample that gave the bin's maximum (mmcv's max mode), recomputed from
// the input: the first sample, in the forward's order, whose value beats the running maximum,
// which starts as math::align_max_init (0 when some samples are off the map; such a bin whose
// maximum is one of those zeros gets no gradient).
//
// Work and determinism: cpu/backward_common.h (tasks own (plane, channel block); each element's
// sum runs over the boxes in their order, then bins, then samples, whatever the thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <vector>

#include "../checks.h"
#include "../map_set.h"
#include "../roi_math.h"
#include "backward_common.h"

namespace roi_kernels {
namespace {

using checks::PoolMode;
using cpu::backward::AxisPlan;
using cpu::backward::Buckets;
using cpu::backward::Plane;
using cpu::backward::Setup;
using cpu::backward::Tile;
using cpu::backward::Window;

template <typename acc_t>
struct BoxPlan {
  AxisPlan<acc_t> y, x;
  acc_t count = 1;
  int64_t samples = 0;
};

template <typename scalar_t, int B>
void roi_align_backward_cpu(
    Setup& st,
    const at::Tensor& grad,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    PoolMode mode) {
  using acc_t = at::opmath_type<scalar_t>;
  const MapSet& s = st.set;
  const int64_t num_boxes = s.rois.size(0);
  const acc_t* rois = s.rois.const_data_ptr<acc_t>();
  const math::MapSelection selection = s.selection();
  std::vector<int64_t> base;
  const std::vector<Plane<scalar_t>> planes = cpu::backward::planes_of<scalar_t>(st.grads, st.inputs, base);

  std::vector<BoxPlan<acc_t>> plans(num_boxes);
  std::vector<int64_t> plane_of(num_boxes, -1);
  std::vector<Window> box_window(num_boxes);
  std::vector<double> cost(num_boxes, 0.0);
  at::parallel_for(0, num_boxes, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* r = rois + k * 5;
      int64_t map = 0, image = 0;
      if (!math::select_map(selection, r, map, image)) {
        continue;
      }
      const at::Tensor& m = s.maps[map];
      const auto g = math::align_geometry<acc_t>(
          r[1], r[2], r[3], r[4], static_cast<acc_t>(s.scales[map]), aligned, pooled_height, pooled_width,
          sampling_ratio);
      BoxPlan<acc_t>& plan = plans[k];
      plan.count = g.count;
      plan.samples = g.samples;
      Window w;
      plan.y.build(g.start_y, g.bin_h, pooled_height, g.grid_h, m.size(2), w.y0, w.y1);
      plan.x.build(g.start_x, g.bin_w, pooled_width, g.grid_w, m.size(3), w.x0, w.x1);
      if (w.empty()) {
        continue;  // no sample on the map: no gradient
      }
      box_window[k] = w;
      plane_of[k] = base[map] + image;
      cost[k] = static_cast<double>(plan.y.taps.size()) * static_cast<double>(plan.x.taps.size()) + 1.0;
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
      planes, buckets, windows, cost, s.channels, mode == PoolMode::kMax,
      [&](int64_t k, int64_t c0, int64_t cn, Tile<acc_t, B>& tile, const Tile<acc_t, B>& in_tile) {
        thread_local std::vector<acc_t> scratch;
        scratch.resize(static_cast<size_t>(bins * B));
        acc_t* g = scratch.data();
        cpu::backward::gather_grad<B>(go, strides, k, c0, cn, pooled_height, pooled_width, g);
        const BoxPlan<acc_t>& plan = plans[k];
        for (int64_t ph = 0; ph < pooled_height; ++ph) {
          const int64_t ya = plan.y.begin[ph], yb = plan.y.begin[ph + 1];
          for (int64_t pw = 0; pw < pooled_width; ++pw) {
            const int64_t xa = plan.x.begin[pw], xb = plan.x.begin[pw + 1];
            acc_t* gb = g + (ph * pooled_width + pw) * B;
            if (mode == PoolMode::kAvg) {
              for (int j = 0; j < B; ++j) {
                gb[j] = gb[j] / plan.count;
              }
              for (int64_t a = ya; a < yb; ++a) {
                const math::AxisTap<acc_t>& ty = plan.y.taps[a];
                for (int64_t b = xa; b < xb; ++b) {
                  const math::AxisTap<acc_t>& tx = plan.x.taps[b];
                  cpu::backward::scatter_sample<B>(
                      tile.data, tile.at(ty.lo, tx.lo), tile.at(ty.lo, tx.hi), tile.at(ty.hi, tx.lo),
                      tile.at(ty.hi, tx.hi), math::bilinear_weights(ty, tx), gb);
                }
              }
              continue;
            }
            // max: which sample gave each channel's maximum
            const acc_t init = math::align_max_init<acc_t>(plan.samples, (yb - ya) * (xb - xa));
            acc_t best[B];
            int64_t arg[B];
            for (int j = 0; j < B; ++j) {
              best[j] = init;
              arg[j] = -1;
            }
            const int64_t nx = xb - xa;
            for (int64_t a = ya; a < yb; ++a) {
              const math::AxisTap<acc_t>& ty = plan.y.taps[a];
              for (int64_t b = xa; b < xb; ++b) {
                const math::AxisTap<acc_t>& tx = plan.x.taps[b];
                const math::BilinearWeights<acc_t> w = math::bilinear_weights(ty, tx);
                const acc_t* p1 = in_tile.data + in_tile.at(ty.lo, tx.lo);
                const acc_t* p2 = in_tile.data + in_tile.at(ty.lo, tx.hi);
                const acc_t* p3 = in_tile.data + in_tile.at(ty.hi, tx.lo);
                const acc_t* p4 = in_tile.data + in_tile.at(ty.hi, tx.hi);
                const int64_t sample = (a - ya) * nx + (b - xa);
                for (int j = 0; j < B; ++j) {
                  const acc_t v = math::bilinear_combine(w, p1[j], p2[j], p3[j], p4[j]);
                  if (v > best[j]) {
                    best[j] = v;
                    arg[j] = sample;
                  }
                }
              }
            }
            for (int64_t j = 0; j < cn; ++j) {
              if (arg[j] < 0) {
                continue;
              }
              const math::AxisTap<acc_t>& ty = plan.y.taps[ya + arg[j] / nx];
              const math::AxisTap<acc_t>& tx = plan.x.taps[xa + arg[j] % nx];
              const math::BilinearWeights<acc_t> w = math::bilinear_weights(ty, tx);
              const acc_t gj = gb[j];
              tile.data[tile.at(ty.lo, tx.lo) + j] += gj * w.w1;
              tile.data[tile.at(ty.lo, tx.hi) + j] += gj * w.w2;
              tile.data[tile.at(ty.hi, tx.lo) + j] += gj * w.w3;
              tile.data[tile.at(ty.hi, tx.hi) + j] += gj * w.w4;
            }
          }
        }
      });
}

std::vector<at::Tensor> run(
    Setup& st,
    const at::Tensor& grad,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode,
    const char* op) {
  const PoolMode mode = checks::parse_pool_mode(pool_mode);
  TORCH_CHECK(grad.device().is_cpu(), "the CPU ", op, " got grad on ", grad.device());
  checks::check_rois(rois, grad, 5);
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_sampling_ratio(sampling_ratio);
  cpu::backward::check_grad(grad, rois.size(0), st.set.channels, pooled_height, pooled_width, op);
  if (mode == PoolMode::kMax) {
    TORCH_CHECK(
        st.inputs.size() == st.grads.size(),
        op,
        ": max pooling needs the forward's input maps (",
        st.grads.size(),
        "), got ",
        st.inputs.size());
    for (size_t m = 0; m < st.inputs.size(); ++m) {
      TORCH_CHECK(
          st.inputs[m].sizes() == st.grads[m].sizes() && st.inputs[m].scalar_type() == grad.scalar_type() &&
              st.inputs[m].device().is_cpu(),
          op,
          ": input map ",
          m,
          " must be a CPU tensor of grad's dtype and of the given sizes ",
          st.grads[m].sizes(),
          ", got ",
          st.inputs[m].sizes());
    }
  } else {
    st.inputs.clear();
  }
  checks::check_batch_index(rois, st.set.num_images);
  st.set.rois = checks::rois_for_kernel(rois, grad.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward", [&] {
    cpu::backward::dispatch_block(st.set.channels, [&](auto block) {
      constexpr int B = decltype(block)::value;
      roi_align_backward_cpu<scalar_t, B>(st, grad, pooled_height, pooled_width, sampling_ratio, aligned, mode);
    });
  });
  return st.results;
}

at::Tensor roi_align_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const std::optional<at::Tensor>& input,
    at::IntArrayRef input_size,
    bool channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode) {
  TORCH_CHECK(input_size.size() == 4, "roi_align_backward: input_size must be [N, C, H, W], got ", input_size);
  checks::check_scale(spatial_scale);
  Setup st;
  std::vector<at::Tensor> inputs;
  if (input.has_value() && input->defined()) {
    inputs.push_back(*input);
  }
  const std::vector<bool> flags = {channels_last};
  cpu::backward::allocate(st, grad, input_size, flags, 4, inputs);
  st.set.scales = {spatial_scale};
  st.set.select = MapSelect::kSingle;
  st.set.num_images = input_size[0];
  return run(st, grad, rois, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode, "roi_align_backward")[0];
}

std::vector<at::Tensor> roi_align_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::TensorList features,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode) {
  checks::check_scale(spatial_scale);
  Setup st;
  cpu::backward::allocate(st, grad, sizes, cpu::backward::flags_of(channels_last), 3, features);
  st.set.scales.assign(st.grads.size(), spatial_scale);
  st.set.select = MapSelect::kRagged;
  st.set.num_images = static_cast<int64_t>(st.grads.size());
  return run(st, grad, rois, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode, "roi_align_ragged_backward");
}

std::vector<at::Tensor> multiscale_roi_align_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::TensorList features,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    at::ArrayRef<double> spatial_scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode,
    int64_t canonical_scale,
    int64_t canonical_level) {
  TORCH_CHECK(
      spatial_scales.size() == channels_last.size(),
      "spatial_scales must give one scale per feature map: ",
      channels_last.size(),
      " maps, ",
      spatial_scales.size(),
      " scales");
  Setup st;
  cpu::backward::allocate(st, grad, sizes, cpu::backward::flags_of(channels_last), 4, features);
  for (size_t m = 1; m < st.grads.size(); ++m) {
    TORCH_CHECK(st.grads[m].size(0) == st.grads[0].size(0), "sizes: every level must have the batch size of the first");
  }
  st.set.scales = spatial_scales.vec();
  set_levels(st.set, spatial_scales, canonical_scale, canonical_level);
  st.set.select = st.grads.size() == 1 ? MapSelect::kSingle : MapSelect::kLevels;
  st.set.num_images = st.grads[0].size(0);
  return run(
      st, grad, rois, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode, "multiscale_roi_align_backward");
}

std::vector<at::Tensor> multiscale_roi_align_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::TensorList features,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    at::ArrayRef<double> spatial_scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    c10::string_view pool_mode,
    int64_t canonical_scale,
    int64_t canonical_level) {
  const int64_t levels = static_cast<int64_t>(spatial_scales.size());
  TORCH_CHECK(
      levels > 0 && !channels_last.empty() && static_cast<int64_t>(channels_last.size()) % levels == 0,
      "features must hold one map per level and image, level-major (L * N maps for the L = ",
      levels,
      " levels of spatial_scales), got ",
      channels_last.size(),
      " maps");
  Setup st;
  cpu::backward::allocate(st, grad, sizes, cpu::backward::flags_of(channels_last), 3, features);
  const int64_t images = static_cast<int64_t>(st.grads.size()) / levels;
  for (size_t i = 0; i < st.grads.size(); ++i) {
    st.set.scales.push_back(spatial_scales[static_cast<int64_t>(i) / images]);
  }
  set_levels(st.set, spatial_scales, canonical_scale, canonical_level);
  st.set.select = levels == 1 ? MapSelect::kRagged : MapSelect::kRaggedLevels;
  st.set.num_images = images;
  return run(
      st, grad, rois, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode,
      "multiscale_roi_align_ragged_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("roi_align_backward", &roi_align_backward_kernel);
  m.impl("roi_align_ragged_backward", &roi_align_ragged_backward_kernel);
  m.impl("multiscale_roi_align_backward", &multiscale_roi_align_backward_kernel);
  m.impl("multiscale_roi_align_ragged_backward", &multiscale_roi_align_ragged_backward_kernel);
}

}  // namespace roi_kernels
