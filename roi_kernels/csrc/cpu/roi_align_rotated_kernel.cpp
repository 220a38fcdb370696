// roi_align_rotated on the CPU, over one map or a ragged batch of per-image maps.
//
// Work is cut into (box, bin) items run with at::parallel_for. Every channel samples a bin at
// the same points, so an item computes the bin's taps once, in chunks, and applies each chunk
// to all channels; the per-box geometry (centre, rotation, grid) is computed once, before the
// items. Only the samples that math::rotated_scan says can land on the map are visited, which
// bounds the work of huge boxes (see roi_math.h). Each channel's sum runs over the
// samples in row-then-column order, the order of the CUDA kernel and of detectron2.
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

// Taps are applied to the channels in chunks this long: long enough to amortise the pass
// over the channels, short enough to stay in L1 (a bin can have 2^20 samples).
constexpr size_t kTapChunk = 512;

template <typename scalar_t, typename acc_t>
void apply_chunk(
    const std::vector<math::BilinearTaps<acc_t>>& taps,
    const scalar_t* first_plane,
    int64_t plane_step,
    int64_t channels,
    acc_t* sums) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* plane = first_plane + c * plane_step;
    acc_t s = sums[c];
    for (const auto& t : taps) {
      s += math::apply_taps<acc_t>(plane, t);
    }
    sums[c] = s;
  }
}

template <typename scalar_t>
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
  const std::vector<cpu::Image<scalar_t>> images = cpu::images_of<scalar_t>(s);
  const int64_t num_images = s.num_images;
  const int64_t channels = s.channels;
  const int64_t num_boxes = rois.size(0);
  const int64_t bins = pooled_height * pooled_width;
  const acc_t* r = rois.const_data_ptr<acc_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();

  std::vector<math::RotatedGeometry<acc_t>> geometry(num_boxes);
  std::vector<int64_t> image(num_boxes, -1);
  at::parallel_for(0, num_boxes, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* b = r + k * 6;
      int64_t n = 0;
      if (!math::batch_index(b[0], num_images, n)) {
        continue;  // checked before the kernel; guarded here all the same
      }
      image[k] = n;
      geometry[k] = math::rotated_geometry<acc_t>(
          b[1], b[2], b[3], b[4], b[5], static_cast<acc_t>(spatial_scale), aligned, pooled_height, pooled_width,
          sampling_ratio);
    }
  });

  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(channels, 1));
  at::parallel_for(0, num_boxes * bins, grain, [&](int64_t begin, int64_t end) {
    std::vector<math::BilinearTaps<acc_t>> taps;
    std::vector<acc_t> sums(channels);
    taps.reserve(kTapChunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / bins, bin = item % bins;
      const int64_t ph = bin / pooled_width, pw = bin % pooled_width;
      scalar_t* dst = o + k * channels * bins + bin;
      if (image[k] < 0) {
        for (int64_t c = 0; c < channels; ++c) {
          dst[c * bins] = scalar_t(0);
        }
        continue;
      }
      const math::RotatedGeometry<acc_t>& g = geometry[k];
      const cpu::Image<scalar_t>& img = images[image[k]];
      std::fill(sums.begin(), sums.end(), acc_t(0));
      taps.clear();
      math::for_each_rotated_sample(
          g, ph, pw, img.height, img.width, img.stride_h, img.stride_w, [&](const math::BilinearTaps<acc_t>& t) {
            taps.push_back(t);
            if (taps.size() == kTapChunk) {
              apply_chunk(taps, img.data, img.stride_c, channels, sums.data());
              taps.clear();
            }
          });
      apply_chunk(taps, img.data, img.stride_c, channels, sums.data());
      for (int64_t c = 0; c < channels; ++c) {
        dst[c * bins] = static_cast<scalar_t>(math::average(sums[c], g.count));
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
    roi_align_rotated_cpu<scalar_t>(s, r, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, out);
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
