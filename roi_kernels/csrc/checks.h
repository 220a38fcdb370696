// Argument checks shared by the CPU and CUDA entry points. Every message names the argument
// as the Python API calls it, so that a user can tell what to fix.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace roi_kernels {
namespace checks {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation dtype: float32 for float16 / bfloat16 / float32, float64 for float64.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_output_size(int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(
      pooled_height > 0 && pooled_width > 0,
      "output_size must be positive, got (",
      pooled_height,
      ", ",
      pooled_width,
      ")");
}

inline void check_scale(double scale, const char* name = "spatial_scale") {
  TORCH_CHECK(
      std::isfinite(scale) && scale > 0, name, " must be a positive finite number, got ", scale);
}

inline void check_sampling_ratio(int64_t sampling_ratio) {
  // Adaptive sampling is spelled -1 (torchvision) or 0 (Detectron); both are "<= 0".
  TORCH_CHECK(
      sampling_ratio <= 1024,
      "sampling_ratio must be <= 1024 (or <= 0 for adaptive sampling), got ",
      sampling_ratio);
}

inline void check_map(const at::Tensor& t, int64_t dim, const std::string& name) {
  TORCH_CHECK(
      t.dim() == dim,
      name,
      " must be a ",
      dim,
      "-D tensor (",
      dim == 4 ? "Tensor[N, C, H, W]" : "Tensor[C, H, W]",
      "), got shape ",
      t.sizes());
  TORCH_CHECK(
      is_supported_dtype(t.scalar_type()),
      name,
      " must be float32, float16, bfloat16 or float64, got ",
      t.scalar_type());
}

// rois: Tensor[K, cols] on input's device, floating point.
inline void check_rois(
    const at::Tensor& rois,
    const at::Tensor& input,
    int64_t cols,
    const char* name = "boxes") {
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == cols,
      name,
      " must be Tensor[K, ",
      cols,
      "] (batch index first), got shape ",
      rois.sizes());
  TORCH_CHECK(
      is_supported_dtype(rois.scalar_type()),
      name,
      " must be a floating-point tensor, got ",
      rois.scalar_type());
  TORCH_CHECK(
      rois.device() == input.device(),
      name,
      " must be on the same device as input: ",
      rois.device(),
      " vs ",
      input.device());
}

inline void check_same(const at::Tensor& a, const at::Tensor& ref, const std::string& name) {
  TORCH_CHECK(
      a.scalar_type() == ref.scalar_type(),
      name,
      " must have the dtype of the first map (",
      ref.scalar_type(),
      "), got ",
      a.scalar_type());
  TORCH_CHECK(
      a.device() == ref.device(),
      name,
      " must be on the device of the first map (",
      ref.device(),
      "), got ",
      a.device());
}

// rois[:, 0] must lie in [0, n) (a non-integer index is truncated, as torchvision does).
// NaN fails the check. On CUDA this synchronises once.
inline void check_batch_index(const at::Tensor& rois, int64_t n, const char* name = "boxes") {
  if (rois.size(0) == 0) {
    return;
  }
  const at::Tensor idx = rois.select(1, 0);
  const bool ok = at::logical_and(idx >= 0, idx < static_cast<double>(n)).all().item<bool>();
  TORCH_CHECK(
      ok,
      name,
      "[:, 0] (the image index) must be in [0, ",
      n,
      "): the batch has ",
      n,
      " image(s)");
}

// The rois as a contiguous tensor of the accumulation dtype of `input_dtype`.
inline at::Tensor rois_for_kernel(const at::Tensor& rois, at::ScalarType input_dtype) {
  return rois.to(acc_dtype(input_dtype)).contiguous();
}

enum class PoolMode { kAvg, kMax };

inline PoolMode parse_pool_mode(c10::string_view mode) {
  if (mode == "avg") {
    return PoolMode::kAvg;
  }
  if (mode == "max") {
    return PoolMode::kMax;
  }
  TORCH_CHECK(false, "pool_mode must be \"avg\" or \"max\", got \"", std::string(mode), "\"");
}

}  // namespace checks
}  // namespace roi_kernels
