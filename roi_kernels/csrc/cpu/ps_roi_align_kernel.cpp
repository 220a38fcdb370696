// ps_roi_align (R-FCN) on the CPU, over one map or a ragged batch of per-image maps.
//
// Two paths. When there are enough samples for it (ps_roi_align_tiled), each (bin, image)
// task packs the C_out planes its bin reads into a [y][x][lanes] tile and runs the image's
// boxes over it, each tap a vector of channels. Otherwise (few boxes, or a map too large for
// a tile), the per-item path below.
//
// Per-item path: (bin, box) items run with at::parallel_for. A bin's samples are the same
// for every output channel (only the input channel changes), so an item computes its taps
// once, in chunks, and applies each chunk to all C_out channels; the per-box geometry is
// computed once, before the items. The items are ordered bin first: bin b of every box reads
// the same C_out planes (c * PH * PW + b), a few hundred KiB that stay in L2 (and its pages in
// the TLB) while a thread's boxes go by, where box-first order walks all C_out * PH * PW
// planes per box. The sum of every channel still runs over the samples in torchvision's order
// (rows, then columns), so results round as torchvision's do.
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
// over the channels, short enough to stay in L1 (a fixed sampling_ratio allows 2^20 per bin).
constexpr size_t kTapChunk = 512;

// Four channels at a time, each with its own sum: four independent chains of additions where
// one channel's chain waits on each add (every channel still adds its taps in order).
template <typename scalar_t, typename acc_t>
void apply_chunk(
    const std::vector<math::BilinearTaps<acc_t>>& taps,
    const scalar_t* first_plane,
    int64_t plane_step,
    int64_t channels,
    acc_t* sums) {
  int64_t c = 0;
  for (; c + 4 <= channels; c += 4) {
    const scalar_t* p0 = first_plane + c * plane_step;
    const scalar_t* p1 = p0 + plane_step;
    const scalar_t* p2 = p1 + plane_step;
    const scalar_t* p3 = p2 + plane_step;
    acc_t s0 = sums[c], s1 = sums[c + 1], s2 = sums[c + 2], s3 = sums[c + 3];
    for (const auto& t : taps) {
      s0 += math::apply_taps<acc_t>(p0, t);
      s1 += math::apply_taps<acc_t>(p1, t);
      s2 += math::apply_taps<acc_t>(p2, t);
      s3 += math::apply_taps<acc_t>(p3, t);
    }
    sums[c] = s0;
    sums[c + 1] = s1;
    sums[c + 2] = s2;
    sums[c + 3] = s3;
  }
  for (; c < channels; ++c) {
    const scalar_t* plane = first_plane + c * plane_step;
    acc_t s = sums[c];
    for (const auto& t : taps) {
      s += math::apply_taps<acc_t>(plane, t);
    }
    sums[c] = s;
  }
}

// Lanes of a packed tile: C_out rounded up, so that each tap is a whole number of vectors.
constexpr int64_t kLaneStep = 8;
// A tile holds one image's whole map for one bin's C_out channels; above this size (a very
// large map) the per-item path runs instead.
constexpr int64_t kMaxTileBytes = int64_t(8) << 20;

// The packed path: tasks of (bin, image). A task packs the C_out planes its bin reads
// (c * PH * PW + bin) of its image into a [y][x][lanes] tile, then runs every box of the image
// over it: each sample's 4 taps are `lanes` contiguous values instead of a scalar load from
// each of C_out planes. Each channel's sum still runs over the samples in order.
template <typename scalar_t, typename acc_t>
void ps_roi_align_tiled(
    const std::vector<cpu::Image<scalar_t>>& images,
    const std::vector<math::AlignGeometry<acc_t>>& geometry,
    const std::vector<int64_t>& image,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t channels_out,
    int64_t lanes,
    scalar_t* o) {
  const int64_t num_images = static_cast<int64_t>(images.size());
  const int64_t num_boxes = static_cast<int64_t>(image.size());
  const int64_t bins = pooled_height * pooled_width;
  std::vector<std::vector<int64_t>> boxes_of(num_images);
  for (int64_t k = 0; k < num_boxes; ++k) {
    if (image[k] >= 0) {
      boxes_of[image[k]].push_back(k);
    } else {
      std::fill(o + k * channels_out * bins, o + (k + 1) * channels_out * bins, scalar_t(0));
    }
  }
  at::parallel_for(0, bins * num_images, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile;
    std::vector<acc_t> v(lanes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bin = task / num_images, n = task % num_images;
      if (boxes_of[n].empty()) {
        continue;
      }
      const cpu::Image<scalar_t>& img = images[n];
      const int64_t ph = bin / pooled_width, pw = bin % pooled_width;
      const int64_t height = img.height, width = img.width;
      const scalar_t* first_plane =
          img.data + math::ps_input_channel(0, ph, pw, pooled_height, pooled_width) * img.stride_c;
      const int64_t plane_step = (math::ps_input_channel(1, ph, pw, pooled_height, pooled_width) -
                                  math::ps_input_channel(0, ph, pw, pooled_height, pooled_width)) *
          img.stride_c;
      tile.assign(static_cast<size_t>(height * width * lanes), acc_t(0));
      for (int64_t c = 0; c < channels_out; ++c) {
        const scalar_t* plane = first_plane + c * plane_step;
        for (int64_t y = 0; y < height; ++y) {
          acc_t* row = tile.data() + y * width * lanes + c;
          const scalar_t* src = plane + y * img.stride_h;
          for (int64_t x = 0; x < width; ++x) {
            row[x * lanes] = static_cast<acc_t>(src[x * img.stride_w]);
          }
        }
      }
      const acc_t* t = tile.data();
      for (int64_t k : boxes_of[n]) {
        const math::AlignGeometry<acc_t>& g = geometry[k];
        std::fill(v.begin(), v.end(), acc_t(0));
        const auto sample = [&](const math::AxisTap<acc_t>& ty, const math::AxisTap<acc_t>& tx) {
          const math::BilinearTaps<acc_t> tp = math::bilinear_taps(ty, tx, width * lanes, lanes);
          const acc_t* p1 = t + tp.o1;
          const acc_t* p2 = t + tp.o2;
          const acc_t* p3 = t + tp.o3;
          const acc_t* p4 = t + tp.o4;
          for (int64_t j = 0; j < lanes; ++j) {
            v[j] += math::bilinear_combine(tp.w, p1[j], p2[j], p3[j], p4[j]);
          }
        };
        math::for_each_bin_sample(g, ph, pw, height, width, sample);
        scalar_t* dst = o + k * channels_out * bins + bin;
        for (int64_t c = 0; c < channels_out; ++c) {
          dst[c * bins] = static_cast<scalar_t>(math::average(v[c], g.count));
        }
      }
    }
  });
}

template <typename scalar_t>
void ps_roi_align_cpu(
    const MapSet& s,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<cpu::Image<scalar_t>> images = cpu::images_of<scalar_t>(s);
  const int64_t num_images = s.num_images;
  const int64_t num_boxes = rois.size(0);
  const int64_t channels_out = out.size(1);
  const int64_t bins = pooled_height * pooled_width;
  const acc_t* r = rois.const_data_ptr<acc_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();

  std::vector<math::AlignGeometry<acc_t>> geometry(num_boxes);
  std::vector<int64_t> image(num_boxes, -1);
  at::parallel_for(0, num_boxes, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* b = r + k * 5;
      int64_t n = 0;
      if (!math::batch_index(b[0], num_images, n)) {
        continue;  // checked before the kernel; guarded here all the same
      }
      image[k] = n;
      geometry[k] = math::ps_align_geometry<acc_t>(
          b[1], b[2], b[3], b[4], static_cast<acc_t>(spatial_scale), pooled_height, pooled_width, sampling_ratio);
    }
  });

  // The packed path when packing pays: its cost is a pass over each image's map per bin, the
  // per-item path's a scattered load per tap and channel (samples x 4 x C_out per bin).
  const int64_t lanes = (channels_out + kLaneStep - 1) / kLaneStep * kLaneStep;
  int64_t cells = 0, samples = 0;
  bool fits = true;
  for (const cpu::Image<scalar_t>& img : images) {
    cells += img.height * img.width;
    fits = fits && img.height * img.width * lanes * static_cast<int64_t>(sizeof(acc_t)) <= kMaxTileBytes;
  }
  for (int64_t k = 0; k < num_boxes; ++k) {
    if (image[k] >= 0) {
      // (saturated: an adaptive grid can hold up to 2^60 samples per bin)
      samples = std::min<int64_t>(samples + std::min<int64_t>(geometry[k].samples, int64_t(1) << 40), int64_t(1) << 50);
    }
  }
  if (fits && samples * 16 >= cells) {
    ps_roi_align_tiled<scalar_t, acc_t>(images, geometry, image, pooled_height, pooled_width, channels_out, lanes, o);
    return;
  }

  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(channels_out, 1));
  at::parallel_for(0, num_boxes * bins, grain, [&](int64_t begin, int64_t end) {
    std::vector<math::BilinearTaps<acc_t>> taps;
    std::vector<acc_t> sums(channels_out);
    taps.reserve(kTapChunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bin = item / num_boxes, k = item % num_boxes;
      const int64_t ph = bin / pooled_width, pw = bin % pooled_width;
      scalar_t* dst = o + k * channels_out * bins + bin;
      if (image[k] < 0) {
        for (int64_t c = 0; c < channels_out; ++c) {
          dst[c * bins] = scalar_t(0);
        }
        continue;
      }
      const math::AlignGeometry<acc_t>& g = geometry[k];
      const cpu::Image<scalar_t>& img = images[image[k]];
      // Input channel of output channel c is ps_input_channel(c, ph, pw) = c * bins + bin.
      const scalar_t* first_plane =
          img.data + math::ps_input_channel(0, ph, pw, pooled_height, pooled_width) * img.stride_c;
      const int64_t plane_step = (math::ps_input_channel(1, ph, pw, pooled_height, pooled_width) -
                                  math::ps_input_channel(0, ph, pw, pooled_height, pooled_width)) *
          img.stride_c;
      std::fill(sums.begin(), sums.end(), acc_t(0));
      taps.clear();
      // Off-map samples contribute 0 to torchvision's sum; only the others are visited.
      math::for_each_bin_sample(g, ph, pw, img.height, img.width, [&](const math::AxisTap<acc_t>& ty, const math::AxisTap<acc_t>& tx) {
        taps.push_back(math::bilinear_taps(ty, tx, img.stride_h, img.stride_w));
        if (taps.size() == kTapChunk) {
          apply_chunk(taps, first_plane, plane_step, channels_out, sums.data());
          taps.clear();
        }
      });
      apply_chunk(taps, first_plane, plane_step, channels_out, sums.data());
      for (int64_t c = 0; c < channels_out; ++c) {
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
    int64_t sampling_ratio) {
  const at::Tensor& first = s.first();
  checks::check_rois(rois, first, 5, "boxes");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  checks::check_sampling_ratio(sampling_ratio);
  for (const at::Tensor& m : s.maps) {
    TORCH_CHECK(m.device().is_cpu(), "the CPU ps_roi_align got input on ", m.device());
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
      " (ps_roi_align reads C_out * PH * PW channels)");
  checks::check_batch_index(rois, s.num_images, "boxes");
  const at::Tensor r = checks::rois_for_kernel(rois, first.scalar_type());
  const int64_t channels_out = s.channels / bins;
  at::Tensor out = cpu::OutputCache::get().empty({r.size(0), channels_out, pooled_height, pooled_width}, first.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "ps_roi_align", [&] {
    ps_roi_align_cpu<scalar_t>(s, r, spatial_scale, pooled_height, pooled_width, sampling_ratio, out);
  });
  return out;
}

at::Tensor ps_roi_align_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  return run(single_map(input), rois, spatial_scale, pooled_height, pooled_width, sampling_ratio);
}

at::Tensor ps_roi_align_ragged_forward_kernel(
    at::TensorList features,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  return run(ragged_maps(features), rois, spatial_scale, pooled_height, pooled_width, sampling_ratio);
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CPU, m) {
  m.impl("ps_roi_align", &ps_roi_align_forward_kernel);
  m.impl("ps_roi_align_ragged", &ps_roi_align_ragged_forward_kernel);
}

}  // namespace roi_kernels
