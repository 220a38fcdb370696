// Host-side argument handling shared by the CPU and CUDA roi_align entry points.
//
// roi_align, roi_align_ragged and multiscale_roi_align are one kernel over a "map set": a list
// of feature maps, each Tensor[N_m, C, H_m, W_m] with its spatial scale, and a rule that picks
// the map (and the image within it) for each box:
//   kSingle:   one map [N, C, H, W]; the box's image index picks the image.
//   kRagged:   map i is image i ([1, C, H_i, W_i]); the box's image index picks the map.
//   kLevels:   FPN levels [N, C, H_l, W_l]; math::fpn_level picks the map, the index the image.
// The kernels apply the rule with math::select_map (roi_math.h).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "roi_math.h"

namespace roi_kernels {

using math::MapSelect;

struct MapSet {
  std::vector<at::Tensor> maps;  // each 4-D [N_m, C, H_m, W_m], same dtype and device
  std::vector<double> scales;    // spatial scale of each map
  MapSelect select = MapSelect::kSingle;
  int64_t num_images = 0;  // valid range of rois[:, 0]
  int64_t channels = 0;
  int64_t k_min = 0, k_max = 0;  // FPN levels of maps.front() and maps.back() (kLevels)
  int64_t canonical_scale = 224, canonical_level = 4;
  at::Tensor rois;  // Tensor[K, 5], contiguous, accumulation dtype

  const at::Tensor& first() const {
    return maps.front();
  }

  // The selection rule as the kernels' math::select_map takes it.
  math::MapSelection selection() const {
    math::MapSelection sel;
    sel.select = select;
    sel.num_images = num_images;
    sel.num_maps = static_cast<int64_t>(maps.size());
    sel.k_min = k_min;
    sel.k_max = k_max;
    sel.canonical_scale = canonical_scale;
    sel.canonical_level = canonical_level;
    return sel;
  }
};

inline void check_common(
    const at::Tensor& rois_in,
    const at::Tensor& ref,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  checks::check_rois(rois_in, ref, 5);
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_sampling_ratio(sampling_ratio);
}

inline MapSet map_set_single(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  checks::check_map(input, 4, "input");
  check_common(rois, input, pooled_height, pooled_width, sampling_ratio);
  checks::check_scale(spatial_scale);
  MapSet s;
  s.maps = {input};
  s.scales = {spatial_scale};
  s.select = MapSelect::kSingle;
  s.num_images = input.size(0);
  s.channels = input.size(1);
  checks::check_batch_index(rois, s.num_images);
  s.rois = checks::rois_for_kernel(rois, input.scalar_type());
  return s;
}

inline MapSet map_set_ragged(
    at::TensorList features,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  TORCH_CHECK(!features.empty(), "input must hold at least one Tensor[C, H, W]");
  MapSet s;
  for (size_t i = 0; i < features.size(); ++i) {
    const std::string name = "input[" + std::to_string(i) + "]";
    checks::check_map(features[i], 3, name);
    if (i > 0) {
      checks::check_same(features[i], features[0], name);
      TORCH_CHECK(
          features[i].size(0) == features[0].size(0),
          name,
          " must have the channels of input[0] (",
          features[0].size(0),
          "), got ",
          features[i].size(0));
    }
    s.maps.push_back(features[i].unsqueeze(0));
    s.scales.push_back(spatial_scale);
  }
  check_common(rois, features[0], pooled_height, pooled_width, sampling_ratio);
  checks::check_scale(spatial_scale);
  s.select = MapSelect::kRagged;
  s.num_images = static_cast<int64_t>(features.size());
  s.channels = features[0].size(0);
  checks::check_batch_index(rois, s.num_images);
  s.rois = checks::rois_for_kernel(rois, features[0].scalar_type());
  return s;
}

inline MapSet map_set_levels(
    at::TensorList features,
    const at::Tensor& rois,
    at::ArrayRef<double> spatial_scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    int64_t canonical_scale,
    int64_t canonical_level) {
  TORCH_CHECK(!features.empty(), "features must hold at least one Tensor[N, C, H, W]");
  TORCH_CHECK(
      spatial_scales.size() == features.size(),
      "spatial_scales must give one scale per feature map: ",
      features.size(),
      " maps, ",
      spatial_scales.size(),
      " scales");
  TORCH_CHECK(canonical_scale > 0, "canonical_scale must be positive, got ", canonical_scale);
  MapSet s;
  for (size_t i = 0; i < features.size(); ++i) {
    const std::string name = "features[" + std::to_string(i) + "]";
    checks::check_map(features[i], 4, name);
    checks::check_scale(spatial_scales[i], ("spatial_scales[" + std::to_string(i) + "]").c_str());
    if (i > 0) {
      checks::check_same(features[i], features[0], name);
      TORCH_CHECK(
          features[i].size(0) == features[0].size(0) && features[i].size(1) == features[0].size(1),
          name,
          " must have the batch size and channels of features[0] ",
          features[0].sizes().slice(0, 2),
          ", got ",
          features[i].sizes().slice(0, 2));
    }
    s.maps.push_back(features[i]);
    s.scales.push_back(spatial_scales[i]);
  }
  check_common(rois, features[0], pooled_height, pooled_width, sampling_ratio);
  // Levels as torchvision infers them: k = -log2(scale) of the first and the last map.
  s.k_min = static_cast<int64_t>(-std::log2(static_cast<float>(spatial_scales.front())));
  s.k_max = static_cast<int64_t>(-std::log2(static_cast<float>(spatial_scales.back())));
  TORCH_CHECK(
      s.k_max - s.k_min + 1 == static_cast<int64_t>(features.size()),
      "spatial_scales must be consecutive powers of 1/2, finest first (levels ",
      s.k_min,
      "..",
      s.k_max,
      " for ",
      features.size(),
      " maps)");
  s.select = features.size() == 1 ? MapSelect::kSingle : MapSelect::kLevels;
  s.num_images = features[0].size(0);
  s.channels = features[0].size(1);
  s.canonical_scale = canonical_scale;
  s.canonical_level = canonical_level;
  checks::check_batch_index(rois, s.num_images);
  s.rois = checks::rois_for_kernel(rois, features[0].scalar_type());
  return s;
}

}  // namespace roi_kernels
