// roi_align_rotated on the CPU.
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
#include "../roi_math.h"

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
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_images = input.size(0);
  const int64_t channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t sN = input.stride(0), sC = input.stride(1), sH = input.stride(2), sW = input.stride(3);
  const int64_t num_boxes = rois.size(0);
  const int64_t bins = pooled_height * pooled_width;
  const scalar_t* in = input.const_data_ptr<scalar_t>();
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
      const scalar_t* first_plane = in + image[k] * sN;
      std::fill(sums.begin(), sums.end(), acc_t(0));
      taps.clear();
      math::for_each_rotated_sample(g, ph, pw, height, width, sH, sW, [&](const math::BilinearTaps<acc_t>& t) {
        taps.push_back(t);
        if (taps.size() == kTapChunk) {
          apply_chunk(taps, first_plane, sC, channels, sums.data());
          taps.clear();
        }
      });
      apply_chunk(taps, first_plane, sC, channels, sums.data());
      for (int64_t c = 0; c < channels; ++c) {
        dst[c * bins] = static_cast<scalar_t>(math::average(sums[c], g.count));
      }
    }
  });
}

at::Tensor roi_align_rotated_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  checks::check_map(input, 4, "input");
  checks::check_rois(rois, input, 6, "rois");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  checks::check_sampling_ratio(sampling_ratio);
  TORCH_CHECK(input.device().is_cpu(), "the CPU roi_align_rotated got input on ", input.device());
  checks::check_batch_index(rois, input.size(0), "rois");
  const at::Tensor r = checks::rois_for_kernel(rois, input.scalar_type());
  at::Tensor out = at::empty({r.size(0), input.size(1), pooled_height, pooled_width}, input.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_rotated", [&] {
    roi_align_rotated_cpu<scalar_t>(
        input, r, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("roi_align_rotated", &roi_align_rotated_forward_kernel);
}

}  // namespace roi_kernels
