// ps_roi_pool (R-FCN) on the CPU, over one map or a ragged batch of per-image maps.
//
// Work is cut into (bin, box) items run with at::parallel_for: a bin's cells are the same for
// every output channel, so an item computes them once and averages them in each of the C_out
// input channels that the bin reads. The snapped box is computed once per box, before the
// items. Items go bin first, so that a thread reads the same C_out planes (c * PH * PW + b)
// for all its boxes, which stay in L2, instead of every plane of the map per box (as
// ps_roi_align_kernel.cpp). Cells are summed in torchvision's order (rows, then columns).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../map_set.h"
#include "../roi_math.h"
#include "images.h"
#include "output_cache.h"

namespace roi_kernels {
namespace {

template <typename scalar_t>
void ps_roi_pool_cpu(
    const MapSet& s,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<cpu::Image<scalar_t>> images = cpu::images_of<scalar_t>(s);
  const int64_t num_images = s.num_images;
  const int64_t num_boxes = rois.size(0);
  const int64_t channels_out = out.size(1);
  const int64_t bins = pooled_height * pooled_width;
  const acc_t* r = rois.const_data_ptr<acc_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();

  std::vector<math::PoolBox> boxes(num_boxes);
  std::vector<int64_t> image(num_boxes, -1);
  at::parallel_for(0, num_boxes, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* b = r + k * 5;
      int64_t n = 0;
      if (!math::batch_index(b[0], num_images, n)) {
        continue;  // checked before the kernel; guarded here all the same
      }
      boxes[k] = math::ps_roi_pool_box<acc_t>(b[1], b[2], b[3], b[4], static_cast<acc_t>(spatial_scale));
      // A NaN coordinate leaves nothing to pool: the box's bins are 0.
      image[k] = boxes[k].ok ? n : -1;
    }
  });

  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(channels_out, 1));
  at::parallel_for(0, num_boxes * bins, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bin = item / num_boxes, k = item % num_boxes;
      const int64_t ph = bin / pooled_width, pw = bin % pooled_width;
      scalar_t* dst = o + k * channels_out * bins + bin;
      int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;
      if (image[k] >= 0) {
        const math::PoolBox& b = boxes[k];
        const cpu::Image<scalar_t>& img = images[image[k]];
        math::ps_roi_pool_bin<acc_t>(b.start_y, b.roi_h, pooled_height, ph, img.height, y0, y1);
        math::ps_roi_pool_bin<acc_t>(b.start_x, b.roi_w, pooled_width, pw, img.width, x0, x1);
      }
      if (math::pool_bin_empty(y0, y1, x0, x1)) {
        for (int64_t c = 0; c < channels_out; ++c) {
          dst[c * bins] = scalar_t(0);
        }
        continue;
      }
      const acc_t area = math::pool_bin_area<acc_t>(y0, y1, x0, x1);
      const cpu::Image<scalar_t>& img = images[image[k]];
      // Four channels at a time (four independent chains of additions, each channel's cells
      // still summed in order); the channels' planes are plane_step apart.
      const scalar_t* first_plane =
          img.data + math::ps_input_channel(0, ph, pw, pooled_height, pooled_width) * img.stride_c;
      const int64_t plane_step = (math::ps_input_channel(1, ph, pw, pooled_height, pooled_width) -
                                  math::ps_input_channel(0, ph, pw, pooled_height, pooled_width)) *
          img.stride_c;
      int64_t c = 0;
      for (; c + 4 <= channels_out; c += 4) {
        const scalar_t* p0 = first_plane + c * plane_step;
        acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int64_t y = y0; y < y1; ++y) {
          for (int64_t x = x0; x < x1; ++x) {
            const scalar_t* q = p0 + y * img.stride_h + x * img.stride_w;
            s0 += static_cast<acc_t>(q[0]);
            s1 += static_cast<acc_t>(q[plane_step]);
            s2 += static_cast<acc_t>(q[2 * plane_step]);
            s3 += static_cast<acc_t>(q[3 * plane_step]);
          }
        }
        dst[c * bins] = static_cast<scalar_t>(math::average(s0, area));
        dst[(c + 1) * bins] = static_cast<scalar_t>(math::average(s1, area));
        dst[(c + 2) * bins] = static_cast<scalar_t>(math::average(s2, area));
        dst[(c + 3) * bins] = static_cast<scalar_t>(math::average(s3, area));
      }
      for (; c < channels_out; ++c) {
        const scalar_t* plane =
            img.data + math::ps_input_channel(c, ph, pw, pooled_height, pooled_width) * img.stride_c;
        acc_t sum = 0;
        for (int64_t y = y0; y < y1; ++y) {
          for (int64_t x = x0; x < x1; ++x) {
            sum += static_cast<acc_t>(plane[y * img.stride_h + x * img.stride_w]);
          }
        }
        dst[c * bins] = static_cast<scalar_t>(math::average(sum, area));
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
  checks::check_rois(rois, first, 5, "boxes");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  for (const at::Tensor& m : s.maps) {
    TORCH_CHECK(m.device().is_cpu(), "the CPU ps_roi_pool got input on ", m.device());
  }
  const int64_t bins = pooled_height * pooled_width;
  TORCH_CHECK(
      s.channels % bins == 0,
      "input has ",
      s.channels,
      " channels, which is not a multiple of output_size[0] * output_size[1] = ",
      pooled_height,
      " * ",
      pooled_width,
      " (ps_roi_pool reads C_out * PH * PW channels)");
  checks::check_batch_index(rois, s.num_images, "boxes");
  const at::Tensor r = checks::rois_for_kernel(rois, first.scalar_type());
  const int64_t channels_out = s.channels / bins;
  at::Tensor out = cpu::OutputCache::get().empty({r.size(0), channels_out, pooled_height, pooled_width}, first.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "ps_roi_pool", [&] {
    ps_roi_pool_cpu<scalar_t>(s, r, spatial_scale, pooled_height, pooled_width, out);
  });
  return out;
}

at::Tensor ps_roi_pool_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return run(single_map(input), rois, spatial_scale, pooled_height, pooled_width);
}

at::Tensor ps_roi_pool_ragged_forward_kernel(
    at::TensorList features,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return run(ragged_maps(features), rois, spatial_scale, pooled_height, pooled_width);
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("ps_roi_pool", &ps_roi_pool_forward_kernel);
  m.impl("ps_roi_pool_ragged", &ps_roi_pool_ragged_forward_kernel);
}

}  // namespace roi_kernels
