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
  ROI_KERNELS_DEFINE_BACKWARD_SCHEMAS(m)

// The gradients of the forward ops with respect to their input maps (the boxes get none, as in
// torchvision), registered as their autograd formulas by roi_kernels/_autograd.py. grad is the
// forward's output gradient Tensor[K, C, PH, PW]; the other arguments are the forward's, but
// that the maps come as their sizes (input_size [N, C, H, W]; sizes: the maps' sizes one after
// the other, 3 per per-image map [C, H, W], 4 per FPN level [N, C, H, W]) and layouts
// (channels_last: each result is channels_last, else contiguous), and as tensors only where the
// gradient reads them: max pooling (roi_align, multiscale: an empty list for avg) and roi_pool,
// which recompute the forward's choice of maximum. Each returns the gradient of every map.
#define ROI_KERNELS_DEFINE_BACKWARD_SCHEMAS(m) \
  m.def( \
      "roi_align_backward(Tensor grad, Tensor rois, Tensor? input, SymInt[] input_size, " \
      "bool channels_last, float spatial_scale, SymInt pooled_height, SymInt pooled_width, " \
      "int sampling_ratio, bool aligned, str pool_mode) -> Tensor"); \
  m.def( \
      "roi_align_ragged_backward(Tensor grad, Tensor rois, Tensor[] features, SymInt[] sizes, " \
      "bool[] channels_last, float spatial_scale, SymInt pooled_height, SymInt pooled_width, " \
      "int sampling_ratio, bool aligned, str pool_mode) -> Tensor[]"); \
  m.def( \
      "multiscale_roi_align_backward(Tensor grad, Tensor rois, Tensor[] features, SymInt[] sizes, " \
      "bool[] channels_last, float[] spatial_scales, SymInt pooled_height, SymInt pooled_width, " \
      "int sampling_ratio, bool aligned, str pool_mode, int canonical_scale, int canonical_level) " \
      "-> Tensor[]"); \
  m.def( \
      "multiscale_roi_align_ragged_backward(Tensor grad, Tensor rois, Tensor[] features, " \
      "SymInt[] sizes, bool[] channels_last, float[] spatial_scales, SymInt pooled_height, " \
      "SymInt pooled_width, int sampling_ratio, bool aligned, str pool_mode, int canonical_scale, " \
      "int canonical_level) -> Tensor[]"); \
  m.def( \
      "roi_pool_backward(Tensor grad, Tensor rois, Tensor input, float spatial_scale, " \
      "SymInt pooled_height, SymInt pooled_width) -> Tensor"); \
  m.def( \
      "roi_pool_ragged_backward(Tensor grad, Tensor rois, Tensor[] features, float spatial_scale, " \
      "SymInt pooled_height, SymInt pooled_width) -> Tensor[]"); \
  m.def( \
      "ps_roi_align_backward(Tensor grad, Tensor rois, SymInt[] input_size, bool channels_last, " \
      "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio) -> Tensor"); \
  m.def( \
      "ps_roi_align_ragged_backward(Tensor grad, Tensor rois, SymInt[] sizes, bool[] channels_last, " \
      "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio) -> Tensor[]"); \
  m.def( \
      "ps_roi_pool_backward(Tensor grad, Tensor rois, SymInt[] input_size, bool channels_last, " \
      "float spatial_scale, SymInt pooled_height, SymInt pooled_width) -> Tensor"); \
  m.def( \
      "ps_roi_pool_ragged_backward(Tensor grad, Tensor rois, SymInt[] sizes, bool[] channels_last, " \
      "float spatial_scale, SymInt pooled_height, SymInt pooled_width) -> Tensor[]"); \
  m.def( \
      "roi_align_rotated_backward(Tensor grad, Tensor rois, SymInt[] input_size, bool channels_last, " \
      "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, " \
      "bool aligned) -> Tensor"); \
  m.def( \
      "roi_align_rotated_ragged_backward(Tensor grad, Tensor rois, SymInt[] sizes, " \
      "bool[] channels_last, float spatial_scale, SymInt pooled_height, SymInt pooled_width, " \
      "int sampling_ratio, bool aligned) -> Tensor[]"); \
  static_assert(true, "")
