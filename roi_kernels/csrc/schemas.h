// The schemas of the roi_kernels ops, as one list for the two libraries that declare them:
// roi_kernels (register.cpp: the real ops) and roi_kernels_emulated (emulator/register.cpp:
// the CUDA kernels run on CPU tensors through the CPU executor, for tests).
#pragma once

#define ROI_KERNELS_DEFINE_SCHEMAS(m) \
  m.def( \
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, " \
      "SymInt pooled_width, int sampling_ratio, bool aligned, str pool_mode) -> Tensor"); \
  /* features: a list of per-image maps Tensor[C, H_i, W_i]; rois[:, 0] picks the map. */ \
  m.def( \
      "roi_align_ragged(Tensor[] features, Tensor rois, float spatial_scale, " \
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned, " \
      "str pool_mode) -> Tensor"); \
  /* features: FPN levels Tensor[N, C, H_l, W_l], finest first, spatial_scales[l] = 2^-k_l. */ \
  m.def( \
      "multiscale_roi_align(Tensor[] features, Tensor rois, float[] spatial_scales, " \
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned, " \
      "str pool_mode, int canonical_scale, int canonical_level) -> Tensor"); \
  /* features: FPN levels per image, level-major: features[l * N + i] is Tensor[C, H_li, W_li], */ \
  /* image i of level l; L = len(spatial_scales), spatial_scales[l] = 2^-k_l. */ \
  m.def( \
      "multiscale_roi_align_ragged(Tensor[] features, Tensor rois, float[] spatial_scales, " \
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned, " \
      "str pool_mode, int canonical_scale, int canonical_level) -> Tensor"); \
  /* Each one-map op has a ragged form: features, per-image Tensor[C, H_i, W_i]; rois[:, 0] */ \
  /* picks the map. */ \
  m.def( \
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, " \
      "SymInt pooled_width) -> Tensor"); \
  m.def( \
      "roi_pool_ragged(Tensor[] features, Tensor rois, float spatial_scale, SymInt pooled_height, " \
      "SymInt pooled_width) -> Tensor"); \
  m.def( \
      "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, " \
      "SymInt pooled_width, int sampling_ratio) -> Tensor"); \
  m.def( \
      "ps_roi_align_ragged(Tensor[] features, Tensor rois, float spatial_scale, " \
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio) -> Tensor"); \
  m.def( \
      "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, " \
      "SymInt pooled_width) -> Tensor"); \
  m.def( \
      "ps_roi_pool_ragged(Tensor[] features, Tensor rois, float spatial_scale, " \
      "SymInt pooled_height, SymInt pooled_width) -> Tensor"); \
  /* rois: Tensor[K, 6] (batch index, cx, cy, w, h, angle in degrees counter-clockwise). */ \
  m.def( \
      "roi_align_rotated(Tensor input, Tensor rois, float spatial_scale, " \
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"); \
  m.def( \
      "roi_align_rotated_ragged(Tensor[] features, Tensor rois, float spatial_scale, " \
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"); \
  static_assert(true, "")
