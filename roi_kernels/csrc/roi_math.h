// Per-sample math shared by every CPU and CUDA kernel of roi_kernels.
//
// Everything here is a C10_HOST_DEVICE inline function, so the CPU tests exercise the very
// arithmetic the GPU runs. Expressions follow torchvision's kernels term for term (same order
// of floating-point operations) because torchvision's results are the definition of the ops.
//
// Robustness rules that every function obeys:
//  * range checks are written as !(in range) so that NaN fails them;
//  * no float is cast to an integer before it is known to be finite and in range;
//  * offsets are int64_t.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace roi_kernels {
namespace math {

// Sample-grid sizes above this are clamped; only reachable with absurd boxes, whose
// samples then lie almost entirely off the map (and are skipped, see sample_range).
constexpr int64_t kMaxGrid = int64_t(1) << 30;
// Rounded box corners are clamped to +-kMaxCoord before the cast to an integer.
constexpr double kMaxCoord = 1099511627776.0;  // 2^40

template <typename T>
C10_HOST_DEVICE inline T min_of(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
C10_HOST_DEVICE inline T max_of(T a, T b) {
  return a < b ? b : a;
}

// ---------------------------------------------------------------------------------------
// Bilinear interpolation, separated by axis.
//
// torchvision's bilinear_interpolate is zero outside [-1, size] on either axis, otherwise
// clamps the coordinate at 0 and at size - 1 and weights the two neighbours. That rule is a
// product of one rule per axis, so a tap is computed per axis and the 2-D weights are the
// products w1 = hy * hx, w2 = hy * lx, w3 = ly * hx, w4 = ly * lx, exactly as torchvision.
// ---------------------------------------------------------------------------------------
template <typename T>
struct AxisTap {
  int64_t lo;  // first neighbour (row or column index)
  int64_t hi;  // second neighbour
  T h;         // weight of lo (1 - l)
  T l;         // weight of hi
};

// Returns false (and leaves tap untouched) when v is outside [-1, size], NaN, or size < 1.
template <typename T>
C10_HOST_DEVICE inline bool axis_tap(T v, int64_t size, AxisTap<T>& tap) {
  if (size < 1 || !(v >= T(-1.0) && v <= static_cast<T>(size))) {
    return false;
  }
  if (v <= 0) {
    v = 0;
  }
  int64_t lo = static_cast<int64_t>(v);
  int64_t hi;
  if (lo >= size - 1) {
    hi = lo = size - 1;
    v = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  const T l = v - static_cast<T>(lo);
  tap.lo = lo;
  tap.hi = hi;
  tap.h = T(1.) - l;
  tap.l = l;
  return true;
}

// Bilinear value of a [height, width] plane with element strides (row_stride, col_stride).
// Returns 0 outside the range, like torchvision.
template <typename T, typename In>
C10_HOST_DEVICE inline T bilinear(
    const In* plane,
    int64_t height,
    int64_t width,
    int64_t row_stride,
    int64_t col_stride,
    T y,
    T x) {
  AxisTap<T> ty, tx;
  if (!axis_tap(y, height, ty) || !axis_tap(x, width, tx)) {
    return T(0);
  }
  const T v1 = static_cast<T>(plane[ty.lo * row_stride + tx.lo * col_stride]);
  const T v2 = static_cast<T>(plane[ty.lo * row_stride + tx.hi * col_stride]);
  const T v3 = static_cast<T>(plane[ty.hi * row_stride + tx.lo * col_stride]);
  const T v4 = static_cast<T>(plane[ty.hi * row_stride + tx.hi * col_stride]);
  const T w1 = ty.h * tx.h, w2 = ty.h * tx.l, w3 = ty.l * tx.h, w4 = ty.l * tx.l;
  return w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4;
}

// ---------------------------------------------------------------------------------------
// roi_align bin geometry (also used by multi-scale and ragged roi_align, and ps_roi_align).
// ---------------------------------------------------------------------------------------

// Samples per bin along one axis: sampling_ratio if > 0, else ceil(extent / pooled)
// (adaptive). Non-positive or NaN extents give 0 samples (the bin then pools to 0).
template <typename T>
C10_HOST_DEVICE inline int64_t grid_size(int64_t sampling_ratio, T extent, int64_t pooled) {
  if (sampling_ratio > 0) {
    return sampling_ratio;
  }
  const T v = extent / static_cast<T>(pooled);
  if (!(v > T(0))) {
    return 0;
  }
  if (!(v < static_cast<T>(kMaxGrid))) {
    return kMaxGrid;
  }
  return static_cast<int64_t>(::ceil(v));
}

template <typename T>
struct AlignGeometry {
  T start_y, start_x;  // box origin on the feature map
  T bin_h, bin_w;      // bin size
  int64_t grid_h, grid_w;  // samples per bin along each axis
  T count;             // divisor for avg pooling: max(grid_h * grid_w, 1)
};

// roi_align box -> bin geometry. (x1, y1, x2, y2) are in image pixels.
template <typename T>
C10_HOST_DEVICE inline AlignGeometry<T> align_geometry(
    T x1,
    T y1,
    T x2,
    T y2,
    T spatial_scale,
    bool aligned,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  AlignGeometry<T> g;
  const T offset = aligned ? T(0.5) : T(0.0);
  g.start_x = x1 * spatial_scale - offset;
  g.start_y = y1 * spatial_scale - offset;
  const T end_x = x2 * spatial_scale - offset;
  const T end_y = y2 * spatial_scale - offset;
  T roi_w = end_x - g.start_x;
  T roi_h = end_y - g.start_y;
  if (!aligned) {
    // legacy behaviour: boxes at least 1x1 (NaN stays NaN)
    roi_w = roi_w < T(1.) ? T(1.) : roi_w;
    roi_h = roi_h < T(1.) ? T(1.) : roi_h;
  }
  g.bin_h = roi_h / static_cast<T>(pooled_height);
  g.bin_w = roi_w / static_cast<T>(pooled_width);
  g.grid_h = grid_size(sampling_ratio, roi_h, pooled_height);
  g.grid_w = grid_size(sampling_ratio, roi_w, pooled_width);
  const T n = static_cast<T>(g.grid_h) * static_cast<T>(g.grid_w);
  g.count = n < T(1) ? T(1) : n;
  return g;
}

// Coordinate of sample i (of g) in bin p, as torchvision computes it.
template <typename T>
C10_HOST_DEVICE inline T sample_coord(T start, T bin, int64_t p, int64_t i, int64_t g) {
  return start + static_cast<T>(p) * bin +
      static_cast<T>(static_cast<T>(i) + T(0.5)) * bin / static_cast<T>(g);
}

// The samples [lo, hi) of bin p that can lie inside [-1, size]; every sample outside this
// range is certainly off the map (and contributes 0). The range is widened by one sample on
// each side so that rounding never drops a sample that sample_coord would put on the map.
// This bounds the work for huge boxes by the map size instead of the box size.
template <typename T>
C10_HOST_DEVICE inline void sample_range(
    T start,
    T bin,
    int64_t p,
    int64_t g,
    int64_t size,
    int64_t& lo,
    int64_t& hi) {
  lo = 0;
  hi = 0;
  if (g <= 0) {
    return;
  }
  const double a = static_cast<double>(start) + static_cast<double>(p) * static_cast<double>(bin);
  const double d = static_cast<double>(bin) / static_cast<double>(g);
  if (!(a == a) || !(d == d)) {
    return;  // NaN box
  }
  if (d == 0.0) {
    if (a >= -1.0 && a <= static_cast<double>(size)) {
      hi = g;
    }
    return;
  }
  // sample i sits at a + (i + 0.5) d
  double i0 = (-1.0 - a) / d - 0.5;
  double i1 = (static_cast<double>(size) - a) / d - 0.5;
  if (d < 0.0) {
    const double t = i0;
    i0 = i1;
    i1 = t;
  }
  if (!(i1 >= -1.0) || !(i0 <= static_cast<double>(g))) {
    return;  // entirely before or after the map (or inf - inf)
  }
  const double f0 = ::floor(i0) - 1.0;
  const double f1 = ::ceil(i1) + 2.0;
  lo = f0 <= 0.0 ? 0 : static_cast<int64_t>(f0);
  hi = f1 >= static_cast<double>(g) ? g : static_cast<int64_t>(f1);
  if (hi < lo) {
    hi = lo;
  }
}

// ---------------------------------------------------------------------------------------
// FPN level assignment (torchvision LevelMapper), in the boxes' dtype like torchvision.
// Returns the index of the level in [0, num_levels), k_min being the level of map 0.
// NaN / inf boxes go to level 0 (their samples are all off the map anyway).
// ---------------------------------------------------------------------------------------
template <typename T>
C10_HOST_DEVICE inline int64_t fpn_level(
    T x1,
    T y1,
    T x2,
    T y2,
    int64_t canonical_scale,
    int64_t canonical_level,
    int64_t k_min,
    int64_t k_max) {
  const T area = (x2 - x1) * (y2 - y1);
  const T s = ::sqrt(area);
  T k = ::floor(
      static_cast<T>(canonical_level) + ::log2(s / static_cast<T>(canonical_scale)) +
      static_cast<T>(1e-6));
  if (!(k >= static_cast<T>(k_min))) {
    k = static_cast<T>(k_min);  // also NaN (negative areas) -> lowest level
  }
  if (k > static_cast<T>(k_max)) {
    k = static_cast<T>(k_max);
  }
  return static_cast<int64_t>(k) - k_min;
}

// ---------------------------------------------------------------------------------------
// roi_pool (Fast R-CNN) bin geometry, as torchvision's roi_pool kernel.
// ---------------------------------------------------------------------------------------

// round() half away from zero, clamped so that the integer cast is defined. NaN -> ok=false.
template <typename T>
C10_HOST_DEVICE inline int64_t round_coord(T v, bool& ok) {
  const T r = ::round(v);
  if (!(r == r)) {
    ok = false;
    return 0;
  }
  const T m = static_cast<T>(kMaxCoord);
  return static_cast<int64_t>(r < -m ? -m : (r > m ? m : r));
}

struct PoolBox {
  int64_t start_y, start_x;  // snapped box origin
  int64_t roi_h, roi_w;      // snapped size (>= 1)
  bool ok;                   // false for a box with a NaN coordinate (pools to 0)
};

// extra: 1 for roi_pool (inclusive end: xe - xs + 1), 0 for ps_roi_pool (xe - xs).
template <typename T>
C10_HOST_DEVICE inline PoolBox
pool_box(T x1, T y1, T x2, T y2, T spatial_scale, int64_t extra) {
  PoolBox b;
  b.ok = true;
  b.start_x = round_coord(x1 * spatial_scale, b.ok);
  b.start_y = round_coord(y1 * spatial_scale, b.ok);
  const int64_t end_x = round_coord(x2 * spatial_scale, b.ok);
  const int64_t end_y = round_coord(y2 * spatial_scale, b.ok);
  b.roi_w = max_of<int64_t>(end_x - b.start_x + extra, 1);
  b.roi_h = max_of<int64_t>(end_y - b.start_y + extra, 1);
  return b;
}

// Cells [start, end) of bin p along one axis, clipped to [0, limit].
// roi_pool clips to size; ps_roi_pool (torchvision) clips to size - 1.
template <typename T>
C10_HOST_DEVICE inline void pool_bin(
    int64_t box_start,
    int64_t box_extent,
    int64_t pooled,
    int64_t p,
    int64_t limit,
    int64_t& start,
    int64_t& end) {
  const T bin = static_cast<T>(box_extent) / static_cast<T>(pooled);
  const int64_t s = static_cast<int64_t>(::floor(static_cast<T>(p) * bin));
  const int64_t e = static_cast<int64_t>(::ceil(static_cast<T>(p + 1) * bin));
  start = min_of<int64_t>(max_of<int64_t>(s + box_start, 0), limit);
  end = min_of<int64_t>(max_of<int64_t>(e + box_start, 0), limit);
}

// ---------------------------------------------------------------------------------------
// Position-sensitive channel mapping (R-FCN).
// ---------------------------------------------------------------------------------------
C10_HOST_DEVICE inline int64_t ps_input_channel(
    int64_t c_out,
    int64_t ph,
    int64_t pw,
    int64_t pooled_height,
    int64_t pooled_width) {
  return (c_out * pooled_height + ph) * pooled_width + pw;
}

// ---------------------------------------------------------------------------------------
// roi_align_rotated (detectron2 ROIAlignRotated): box (cx, cy, w, h, angle in degrees).
// ---------------------------------------------------------------------------------------
template <typename T>
struct RotatedGeometry {
  T center_y, center_x;
  T start_y, start_x;  // -h/2, -w/2: the box's corner in its own frame
  T bin_h, bin_w;
  T cos_t, sin_t;
  int64_t grid_h, grid_w;
  T count;
};

template <typename T>
C10_HOST_DEVICE inline RotatedGeometry<T> rotated_geometry(
    T cx,
    T cy,
    T w,
    T h,
    T angle_deg,
    T spatial_scale,
    bool aligned,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  RotatedGeometry<T> g;
  const T offset = aligned ? T(0.5) : T(0.0);
  g.center_x = cx * spatial_scale - offset;
  g.center_y = cy * spatial_scale - offset;
  T roi_w = w * spatial_scale;
  T roi_h = h * spatial_scale;
  if (!aligned) {
    roi_w = roi_w < T(1.) ? T(1.) : roi_w;
    roi_h = roi_h < T(1.) ? T(1.) : roi_h;
  }
  const T theta = angle_deg * static_cast<T>(M_PI) / static_cast<T>(180.0);
  g.cos_t = ::cos(theta);
  g.sin_t = ::sin(theta);
  g.bin_h = roi_h / static_cast<T>(pooled_height);
  g.bin_w = roi_w / static_cast<T>(pooled_width);
  g.start_y = -roi_h / static_cast<T>(2.0);
  g.start_x = -roi_w / static_cast<T>(2.0);
  g.grid_h = grid_size(sampling_ratio, roi_h, pooled_height);
  g.grid_w = grid_size(sampling_ratio, roi_w, pooled_width);
  const T n = static_cast<T>(g.grid_h) * static_cast<T>(g.grid_w);
  g.count = n < T(1) ? T(1) : n;
  return g;
}

// Rotate a sample (yy, xx) of the box's own frame onto the map.
template <typename T>
C10_HOST_DEVICE inline void rotate_sample(
    const RotatedGeometry<T>& g,
    T yy,
    T xx,
    T& y,
    T& x) {
  x = yy * g.sin_t + xx * g.cos_t + g.center_x;
  y = yy * g.cos_t - xx * g.sin_t + g.center_y;
}

// ---------------------------------------------------------------------------------------
// Box validation shared by the kernels: a batch index that is not an integer in [0, n).
// ---------------------------------------------------------------------------------------
template <typename T>
C10_HOST_DEVICE inline bool batch_index(T v, int64_t n, int64_t& out) {
  if (!(v >= T(0) && v < static_cast<T>(n))) {
    return false;
  }
  out = static_cast<int64_t>(v);
  return true;
}

}  // namespace math
}  // namespace roi_kernels
