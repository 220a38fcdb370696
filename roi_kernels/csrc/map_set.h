// Host-side argument handling shared by the CPU and CUDA entry points.
//
// roi_align, roi_align_ragged, multiscale_roi_align and multiscale_roi_align_ragged are one
// kernel over a "map set": a list of feature maps, each Tensor[N_m, C, H_m, W_m] with its
// spatial scale, and a rule that picks the map (and the image within it) for each box:
//   kSingle:   one map [N, C, H, W]; the box's image index picks the image.
//   kRagged:   map i is image i ([1, C, H_i, W_i]); the box's image index picks the map.
//   kLevels:   FPN levels [N, C, H_l, W_l]; math::fpn_level picks the map, the index the image.
//   kRaggedLevels: FPN levels given per image, level-major ([1, C, H_li, W_li] at l * N + i);
//              math::fpn_level picks the level, the index the image.
// The kernels apply the rule with math::select_map (roi_math.h).
//
// The one-map ops (roi_pool, ps_roi_align, ps_roi_pool, roi_align_rotated) take one map
// [N, C, H, W] or a ragged batch of per-image maps [C, H_i, W_i]: single_map and ragged_maps
// check and describe those (kSingle, kRagged); the ops check the rest themselves.
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
  int64_t k_min = 0, k_max = 0;  // FPN levels of the first and the last level (kLevels, kRaggedLevels)
  int64_t canonical_scale = 224, canonical_level = 4;
  at::Tensor rois;  // Tensor[K, 5], contiguous, accumulation dtype (the roi_align family)

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

// The maps of a single-map op: input Tensor[N, C, H, W].
inline MapSet single_map(const at::Tensor& input) {
  checks::check_map(input, 4, "input");
  MapSet s;
  s.maps = {input};
  s.select = MapSelect::kSingle;
  s.num_images = input.size(0);
  s.channels = input.size(1);
  return s;
}

// The maps of a ragged op: per-image Tensor[C, H_i, W_i] of one dtype, device and channel count
// (`name` as the Python API calls the list).
inline MapSet ragged_maps(at::TensorList features, const std::string& name = "input") {
  TORCH_CHECK(!features.empty(), name, " must hold at least one Tensor[C, H, W]");
  MapSet s;
  for (size_t i = 0; i < features.size(); ++i) {
    const std::string item = name + "[" + std::to_string(i) + "]";
    checks::check_map(features[i], 3, item);
    if (i > 0) {
      checks::check_same(features[i], features[0], item);
      TORCH_CHECK(
          features[i].size(0) == features[0].size(0),
          item,
          " must have the channels of ",
          name,
          "[0] (",
          features[0].size(0),
          "), got ",
          features[i].size(0));
    }
    s.maps.push_back(features[i].unsqueeze(0));
  }
  s.select = MapSelect::kRagged;
  s.num_images = static_cast<int64_t>(features.size());
  s.channels = features[0].size(0);
  return s;
}

inline MapSet map_set_single(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  MapSet s = single_map(input);
  check_common(rois, input, pooled_height, pooled_width, sampling_ratio);
  checks::check_scale(spatial_scale);
  s.scales = {spatial_scale};
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
  MapSet s = ragged_maps(features);
  check_common(rois, features[0], pooled_height, pooled_width, sampling_ratio);
  checks::check_scale(spatial_scale);
  s.scales.assign(s.maps.size(), spatial_scale);
  checks::check_batch_index(rois, s.num_images);
  s.rois = checks::rois_for_kernel(rois, features[0].scalar_type());
  return s;
}

// Checks the levels' scales and sets s's level range: k = -log2(scale) of the first and the
// last level, as torchvision infers them.
inline void set_levels(
    MapSet& s,
    at::ArrayRef<double> spatial_scales,
    int64_t canonical_scale,
    int64_t canonical_level) {
  TORCH_CHECK(canonical_scale > 0, "canonical_scale must be positive, got ", canonical_scale);
  for (size_t l = 0; l < spatial_scales.size(); ++l) {
    checks::check_scale(spatial_scales[l], ("spatial_scales[" + std::to_string(l) + "]").c_str());
  }
  s.k_min = static_cast<int64_t>(-std::log2(static_cast<float>(spatial_scales.front())));
  s.k_max = static_cast<int64_t>(-std::log2(static_cast<float>(spatial_scales.back())));
  TORCH_CHECK(
      s.k_max - s.k_min + 1 == static_cast<int64_t>(spatial_scales.size()),
      "spatial_scales must be consecutive powers of 1/2, finest first (levels ",
      s.k_min,
      "..",
      s.k_max,
      " for ",
      spatial_scales.size(),
      " maps)");
  s.canonical_scale = canonical_scale;
  s.canonical_level = canonical_level;
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
  MapSet s;
  for (size_t i = 0; i < features.size(); ++i) {
    const std::string name = "features[" + std::to_string(i) + "]";
    checks::check_map(features[i], 4, name);
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
  }
  s.scales = spatial_scales.vec();
  set_levels(s, spatial_scales, canonical_scale, canonical_level);
  check_common(rois, features[0], pooled_height, pooled_width, sampling_ratio);
  s.select = features.size() == 1 ? MapSelect::kSingle : MapSelect::kLevels;
  s.num_images = features[0].size(0);
  s.channels = features[0].size(1);
  checks::check_batch_index(rois, s.num_images);
  s.rois = checks::rois_for_kernel(rois, features[0].scalar_type());
  return s;
}

// FPN levels given per image: features[l * N + i] is image i's map of level l, Tensor[C, H, W]
// (images of a batch may differ in size), spatial_scales[l] the scale of level l, so that
// L = spatial_scales.size() and N = features.size() / L. A box pools exactly what
// map_set_levels would give it on the same images stacked per level.
inline MapSet map_set_levels_ragged(
    at::TensorList features,
    const at::Tensor& rois,
    at::ArrayRef<double> spatial_scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    int64_t canonical_scale,
    int64_t canonical_level) {
  TORCH_CHECK(!spatial_scales.empty(), "spatial_scales must give the scale of at least one level");
  const int64_t levels = static_cast<int64_t>(spatial_scales.size());
  TORCH_CHECK(
      !features.empty() && static_cast<int64_t>(features.size()) % levels == 0,
      "features must hold one Tensor[C, H, W] per level and image, level-major (L * N maps for the L = ",
      levels,
      " levels of spatial_scales), got ",
      features.size(),
      " maps");
  MapSet s = ragged_maps(features, "features");
  const int64_t images = s.num_images / levels;
  for (size_t i = 0; i < features.size(); ++i) {
    s.scales.push_back(spatial_scales[static_cast<int64_t>(i) / images]);
  }
  set_levels(s, spatial_scales, canonical_scale, canonical_level);
  check_common(rois, features[0], pooled_height, pooled_width, sampling_ratio);
  // One level has no level rule, as in map_set_levels (kSingle): every box pools on it.
  s.select = levels == 1 ? MapSelect::kRagged : MapSelect::kRaggedLevels;
  s.num_images = images;
  checks::check_batch_index(rois, s.num_images);
  s.rois = checks::rois_for_kernel(rois, features[0].scalar_type());
  return s;
}

}  // namespace roi_kernels
