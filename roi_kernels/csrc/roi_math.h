// The per-sample math of every roi_kernels op, shared by the CPU and the CUDA kernels.
//
// Why one header: torchvision keeps two copies of its bilinear math (CPU and CUDA) that can
// drift apart. Here every piece of arithmetic that decides a result (which image and level a
// box reads, where its bins and samples lie, the bilinear taps and weights, how a bin pools)
// is a C10_HOST_DEVICE inline function below, and the kernels only loop over bins, samples
// and channels and call these functions. The CPU tests therefore exercise the very arithmetic
// the GPU runs; both builds disable fused multiply-adds so that it rounds alike on both.
//
// Expressions follow torchvision's kernels term for term (same operations in the same order)
// because torchvision's results are the definition of the ops (docs/SEMANTICS.md);
// roi_align_rotated follows detectron2's.
//
// Rules every function obeys (no input of any kind may read or write out of bounds):
//  * range checks are written as !(in range) so that NaN fails them;
//  * no float is cast to an integer before it is known to be finite and in range;
//  * offsets are int64_t.
//
// Contents:
//   0. The math library, precision-explicit
//   1. Limits and small helpers
//   2. Which image and which map a box reads (batch index, FPN level, map selection)
//   3. Bilinear interpolation (per-axis taps, weights, their application)
//   4. Pooling a bin (average, max)
//   5. roi_align geometry (bins, samples, the samples that can land on the map)
//   6. roi_pool and ps_roi_pool geometry (snapped boxes, bin cells)
//   7. Position-sensitive channel mapping (R-FCN)
//   8. roi_align_rotated geometry (rotation, the samples that can land on the map)
#pragma once

#include <c10/macros/Macros.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace roi_kernels {
namespace math {

// =======================================================================================
// 0. The math library, precision-explicit
//
// Why: `::cos(x)` for a float x means two different functions under the two compilers of
// this header. g++ (the CPU kernels, and nvcc's host pass) finds only the C library's
// `double cos(double)` in the global namespace, so it computes in double and the caller
// rounds; nvcc's device pass finds CUDA's `float cos(float)` overload, i.e. cosf, with its
// own error bound (2 ulp for cosf / sinf, 1 ulp for log2f). Worse, the double result then
// promotes the rest of the expression to double on the host only. So the shared math calls
// the math library only through the functions below: each takes and returns double and
// calls the double function of both libraries (static_asserts check the overload chosen,
// in every compile of this header: the CPU build, nvcc's host and device passes, and the
// CUDA executor's build); callers convert explicitly, `static_cast<T>(fn::cos(double(x)))`.
// tests/test_kernel_sources.py checks that nothing here or in the CUDA kernels calls the
// math library any other way.
//
// What remains different, and only a GPU can show: the device's double cos, sin and log2
// have error bounds of 2, 2 and 1 ulp in double (glibc's are below 1 ulp), so their results
// may differ from the CPU's in the last bit of a double; rounded to float (every float and
// half op) they agree except where the double result lies within a few double ulps of a
// float rounding boundary (about one argument in 2^28). floor, ceil, round, fabs and sqrt are
// exact or correctly rounded on both, in either precision.
// =======================================================================================
namespace fn {

#define ROI_MATH_DOUBLE_FN(name)                                                          \
  C10_HOST_DEVICE inline double name(double x) {                                          \
    static_assert(                                                                        \
        std::is_same<decltype(::name(x)), double>::value,                                 \
        "::" #name "(double) must resolve to the double function under every compiler"); \
    return ::name(x);                                                                     \
  }

ROI_MATH_DOUBLE_FN(cos)
ROI_MATH_DOUBLE_FN(sin)
ROI_MATH_DOUBLE_FN(log2)
ROI_MATH_DOUBLE_FN(sqrt)
ROI_MATH_DOUBLE_FN(floor)
ROI_MATH_DOUBLE_FN(ceil)
ROI_MATH_DOUBLE_FN(round)
ROI_MATH_DOUBLE_FN(fabs)
#undef ROI_MATH_DOUBLE_FN

// A call with any other argument type (a float, an integer) does not compile: it would
// otherwise convert silently, and the point is that every call says its precision.
template <typename T>
double cos(T) = delete;
template <typename T>
double sin(T) = delete;
template <typename T>
double log2(T) = delete;
template <typename T>
double sqrt(T) = delete;
template <typename T>
double floor(T) = delete;
template <typename T>
double ceil(T) = delete;
template <typename T>
double round(T) = delete;
template <typename T>
double fabs(T) = delete;

}  // namespace fn

// =======================================================================================
// 1. Limits and small helpers
// =======================================================================================

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

// The spacing of T's values at 1 (2 u, u being the unit roundoff).
template <typename T>
C10_HOST_DEVICE inline double machine_epsilon() {
  return sizeof(T) <= sizeof(float) ? 1.1920928955078125e-07 : 2.220446049250313e-16;
}

// Whether all four are finite. NaN and +-inf make the sum non-finite; a finite sum of finite
// values can overflow, which only errs towards "not finite" (callers then skip the box).
C10_HOST_DEVICE inline bool finite_all(double a, double b, double c, double d) {
  const double s = fn::fabs(a) + fn::fabs(b) + fn::fabs(c) + fn::fabs(d);
  return s - s == 0.0;
}

// =======================================================================================
// 2. Which image and which map a box reads
// =======================================================================================

// A box's image index: false unless v is in [0, n) (NaN fails); a fractional index is
// truncated, as torchvision does. The host checks the indices before a launch; kernels call
// this all the same, so that bad input can never read out of bounds.
template <typename T>
C10_HOST_DEVICE inline bool batch_index(T v, int64_t n, int64_t& out) {
  if (!(v >= T(0) && v < static_cast<T>(n))) {
    return false;
  }
  out = static_cast<int64_t>(v);
  return true;
}

// FPN level assignment (torchvision's LevelMapper), in the boxes' dtype like torchvision:
// k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6) clamped to
// [k_min, k_max]. Returns the index of the level in [0, k_max - k_min], k_min being the
// level of map 0, or -1 (no level: the box pools to zeros) for a negative or NaN area, as in
// torchvision's MultiScaleRoIAlign, whose NaN level matches no map. A zero area goes to the
// first level, an infinite one to the last (its samples are off the map).
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
  if (!(area >= T(0))) {
    return -1;  // a box inverted along one axis, or NaN
  }
  // In T throughout, as torchvision's LevelMapper (float tensors for float boxes); sqrt and
  // log2 are computed in double and rounded to T, i.e. correctly rounded in T (but for the
  // rare arguments discussed in section 0), which is what torch's float log2 gives.
  const T s = static_cast<T>(fn::sqrt(static_cast<double>(area)));
  const T l = static_cast<T>(fn::log2(static_cast<double>(s / static_cast<T>(canonical_scale))));
  T k = static_cast<T>(fn::floor(static_cast<double>(static_cast<T>(canonical_level) + l + static_cast<T>(1e-6))));
  if (!(k >= static_cast<T>(k_min))) {
    k = static_cast<T>(k_min);
  }
  if (k > static_cast<T>(k_max)) {
    k = static_cast<T>(k_max);
  }
  return static_cast<int64_t>(k) - k_min;
}

// How a box picks its feature map (see map_set.h):
//   kSingle: one map [N, C, H, W]; the box's image index picks the image.
//   kRagged: map i is image i ([1, C, H_i, W_i]); the box's image index picks the map.
//   kLevels: FPN levels [N, C, H_l, W_l]; fpn_level picks the map, the index the image.
//   kRaggedLevels: FPN levels of per-image maps, level-major: map l * num_images + i is image
//                  i of level l ([1, C, H_li, W_li]); fpn_level picks l, the index picks i.
enum class MapSelect : int { kSingle = 0, kRagged = 1, kLevels = 2, kRaggedLevels = 3 };

struct MapSelection {
  MapSelect select;
  int64_t num_images;  // valid range of a box's image index
  int64_t num_maps;
  int64_t k_min, k_max;  // FPN levels of the first and the last level (kLevels, kRaggedLevels)
  int64_t canonical_scale, canonical_level;
};

// The map and the image within it that box r = (index, x1, y1, x2, y2) reads. False when the
// box has no valid image or no level (it then pools to zeros).
template <typename T>
C10_HOST_DEVICE inline bool select_map(const MapSelection& s, const T* r, int64_t& map, int64_t& image) {
  int64_t idx = 0;
  if (!batch_index(r[0], s.num_images, idx)) {
    return false;
  }
  switch (s.select) {
    case MapSelect::kRagged:
      map = idx;
      image = 0;
      break;
    case MapSelect::kLevels:
      map = fpn_level(r[1], r[2], r[3], r[4], s.canonical_scale, s.canonical_level, s.k_min, s.k_max);
      image = idx;
      break;
    case MapSelect::kRaggedLevels: {
      const int64_t level =
          fpn_level(r[1], r[2], r[3], r[4], s.canonical_scale, s.canonical_level, s.k_min, s.k_max);
      if (level < 0) {
        return false;  // no level
      }
      map = level * s.num_images + idx;
      image = 0;
      break;
    }
    default:
      map = 0;
      image = idx;
      break;
  }
  return map >= 0 && map < s.num_maps;
}

// =======================================================================================
// 3. Bilinear interpolation
//
// torchvision's bilinear_interpolate is zero outside [-1, size] on either axis, otherwise
// clamps the coordinate at 0 and at size - 1 and weights the two neighbours. That rule is a
// product of one rule per axis, so a tap is computed per axis (AxisTap) and the 2-D weights
// are the products w1 = hy * hx, w2 = hy * lx, w3 = ly * hx, w4 = ly * lx, applied as
// w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4, exactly as torchvision. Kernels that reuse a tap
// across samples (the separable roi_align plans) keep AxisTaps; the others keep BilinearTaps
// (offsets and weights of one sample).
// =======================================================================================
template <typename T>
struct AxisTap {
  int64_t lo;  // first neighbour (row or column index)
  int64_t hi;  // second neighbour
  T h;         // weight of lo (1 - l)
  T l;         // weight of hi
};

// The tap of coordinate v on an axis of `size` cells. Returns false (and leaves tap
// untouched) when v is outside [-1, size], NaN, or size < 1: the sample contributes 0.
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

template <typename T>
struct BilinearWeights {
  T w1, w2, w3, w4;  // of (y lo, x lo), (y lo, x hi), (y hi, x lo), (y hi, x hi)
};

// The 2-D weights from the per-axis weights (h: of the lower neighbour, l: of the upper).
template <typename T>
C10_HOST_DEVICE inline BilinearWeights<T> bilinear_weights(T yh, T yl, T xh, T xl) {
  BilinearWeights<T> w;
  w.w1 = yh * xh;
  w.w2 = yh * xl;
  w.w3 = yl * xh;
  w.w4 = yl * xl;
  return w;
}

template <typename T>
C10_HOST_DEVICE inline BilinearWeights<T> bilinear_weights(const AxisTap<T>& ty, const AxisTap<T>& tx) {
  return bilinear_weights(ty.h, ty.l, tx.h, tx.l);
}

// The sample's value from its four neighbours' values, in torchvision's order.
template <typename T>
C10_HOST_DEVICE inline T bilinear_combine(const BilinearWeights<T>& w, T v1, T v2, T v3, T v4) {
  return w.w1 * v1 + w.w2 * v2 + w.w3 * v3 + w.w4 * v4;
}

// One sample's four element offsets into a plane and their weights.
template <typename T>
struct BilinearTaps {
  int64_t o1, o2, o3, o4;  // (y lo, x lo), (y lo, x hi), (y hi, x lo), (y hi, x hi)
  BilinearWeights<T> w;
};

template <typename T>
C10_HOST_DEVICE inline BilinearTaps<T> bilinear_taps(
    const AxisTap<T>& ty,
    const AxisTap<T>& tx,
    int64_t row_stride,
    int64_t col_stride) {
  BilinearTaps<T> t;
  t.o1 = ty.lo * row_stride + tx.lo * col_stride;
  t.o2 = ty.lo * row_stride + tx.hi * col_stride;
  t.o3 = ty.hi * row_stride + tx.lo * col_stride;
  t.o4 = ty.hi * row_stride + tx.hi * col_stride;
  t.w = bilinear_weights(ty, tx);
  return t;
}

// The sample's value in a plane (element type In, accumulated in T).
template <typename T, typename In>
C10_HOST_DEVICE inline T apply_taps(const In* plane, const BilinearTaps<T>& t) {
  return bilinear_combine(
      t.w,
      static_cast<T>(plane[t.o1]),
      static_cast<T>(plane[t.o2]),
      static_cast<T>(plane[t.o3]),
      static_cast<T>(plane[t.o4]));
}

// Bilinear value at (y, x) of a [height, width] plane with element strides (row_stride,
// col_stride); 0 off the map, like torchvision.
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
  return apply_taps<T>(plane, bilinear_taps(ty, tx, row_stride, col_stride));
}

// =======================================================================================
// 4. Pooling a bin
// =======================================================================================

// Average pooling: the sum of the bin's samples (off-map samples are 0) over its count.
template <typename T>
C10_HOST_DEVICE inline T average(T sum, T count) {
  return sum / count;
}

// Max pooling (roi_align's max mode, roi_pool): keep v only if it is greater, so that NaN
// never wins, as torchvision's roi_pool and mmcv's max roi_align do.
template <typename T>
C10_HOST_DEVICE inline T max_update(T acc, T v) {
  return v > acc ? v : acc;
}

// The start of roi_align's max over a bin of `samples` samples of which `on_map` land on the
// map: off-map samples are worth 0 and take part in the max; a bin without samples is 0.
template <typename T>
C10_HOST_DEVICE inline T align_max_init(int64_t samples, int64_t on_map) {
  return (samples == 0 || on_map < samples) ? T(0) : static_cast<T>(-INFINITY);
}

// The start of roi_pool's max over a non-empty bin: -FLT_MAX as torchvision (so a bin of
// NaN cells gives -FLT_MAX, not NaN). An empty bin is 0 (pool_bin_empty).
template <typename T>
C10_HOST_DEVICE inline T pool_max_init() {
  return static_cast<T>(-FLT_MAX);
}

// =======================================================================================
// 5. roi_align geometry (also multi-scale and ragged roi_align, and ps_roi_align)
// =======================================================================================

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
  return static_cast<int64_t>(fn::ceil(static_cast<double>(v)));
}

template <typename T>
struct AlignGeometry {
  T start_y, start_x;      // box origin on the feature map
  T bin_h, bin_w;          // bin size
  int64_t grid_h, grid_w;  // samples per bin along each axis
  int64_t samples;         // samples per bin: grid_h * grid_w (at most 2^60)
  T count;                 // divisor for avg pooling: max(grid_h * grid_w, 1)
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
  g.samples = g.grid_h * g.grid_w;
  const T n = static_cast<T>(g.grid_h) * static_cast<T>(g.grid_w);
  g.count = n < T(1) ? T(1) : n;
  return g;
}

// ps_roi_align's geometry: torchvision's ps_roi_align always shifts by half a pixel and has
// no minimum box size (roi_align's aligned=True).
template <typename T>
C10_HOST_DEVICE inline AlignGeometry<T> ps_align_geometry(
    T x1,
    T y1,
    T x2,
    T y2,
    T spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio) {
  return align_geometry(x1, y1, x2, y2, spatial_scale, /*aligned=*/true, pooled_height, pooled_width, sampling_ratio);
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
  const double f0 = fn::floor(i0) - 1.0;
  const double f1 = fn::ceil(i1) + 2.0;
  lo = f0 <= 0.0 ? 0 : static_cast<int64_t>(f0);
  hi = f1 >= static_cast<double>(g) ? g : static_cast<int64_t>(f1);
  if (hi < lo) {
    hi = lo;
  }
}

// The tap of sample i of bin p along one axis; false when the sample is off the map.
template <typename T>
C10_HOST_DEVICE inline bool sample_tap(T start, T bin, int64_t p, int64_t i, int64_t g, int64_t size, AxisTap<T>& tap) {
  return axis_tap(sample_coord(start, bin, p, i, g), size, tap);
}

// Calls fn(i, tap) for every sample i of bin p along one axis that lands on the map, in
// increasing i (the order of torchvision's loops).
template <typename T, typename Fn>
C10_HOST_DEVICE inline void for_each_axis_tap(T start, T bin, int64_t p, int64_t g, int64_t size, Fn&& fn) {
  int64_t lo = 0, hi = 0;
  sample_range(start, bin, p, g, size, lo, hi);
  for (int64_t i = lo; i < hi; ++i) {
    AxisTap<T> tap;
    if (sample_tap(start, bin, p, i, g, size, tap)) {
      fn(i, tap);
    }
  }
}

// Samples of bin p along one axis that land on the map.
template <typename T>
C10_HOST_DEVICE inline int64_t axis_samples_on_map(T start, T bin, int64_t p, int64_t g, int64_t size) {
  int64_t n = 0;
  for_each_axis_tap(start, bin, p, g, size, [&](int64_t, const AxisTap<T>&) { ++n; });
  return n;
}

// Calls fn(ty, tx) for every sample of bin (ph, pw) that lands on a [height, width] map,
// rows then columns (torchvision's order of summation).
template <typename T, typename Fn>
C10_HOST_DEVICE inline void for_each_bin_sample(
    const AlignGeometry<T>& g,
    int64_t ph,
    int64_t pw,
    int64_t height,
    int64_t width,
    Fn&& fn) {
  for_each_axis_tap(g.start_y, g.bin_h, ph, g.grid_h, height, [&](int64_t, const AxisTap<T>& ty) {
    for_each_axis_tap(g.start_x, g.bin_w, pw, g.grid_w, width, [&](int64_t, const AxisTap<T>& tx) { fn(ty, tx); });
  });
}

// =======================================================================================
// 6. roi_pool (Fast R-CNN) and ps_roi_pool geometry, as torchvision's kernels
// =======================================================================================

// round() half away from zero, clamped so that the integer cast is defined. NaN -> ok=false.
template <typename T>
C10_HOST_DEVICE inline int64_t round_coord(T v, bool& ok) {
  const T r = static_cast<T>(fn::round(static_cast<double>(v)));
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
C10_HOST_DEVICE inline PoolBox pool_box(T x1, T y1, T x2, T y2, T spatial_scale, int64_t extra) {
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
  const int64_t s = static_cast<int64_t>(fn::floor(static_cast<double>(static_cast<T>(p) * bin)));
  const int64_t e = static_cast<int64_t>(fn::ceil(static_cast<double>(static_cast<T>(p + 1) * bin)));
  start = min_of<int64_t>(max_of<int64_t>(s + box_start, 0), limit);
  end = min_of<int64_t>(max_of<int64_t>(e + box_start, 0), limit);
}

// roi_pool: the box's end is inclusive, bins are clipped to the map [0, size].
template <typename T>
C10_HOST_DEVICE inline PoolBox roi_pool_box(T x1, T y1, T x2, T y2, T spatial_scale) {
  return pool_box(x1, y1, x2, y2, spatial_scale, /*extra=*/1);
}

template <typename T>
C10_HOST_DEVICE inline void roi_pool_bin(
    int64_t box_start,
    int64_t box_extent,
    int64_t pooled,
    int64_t p,
    int64_t size,
    int64_t& start,
    int64_t& end) {
  pool_bin<T>(box_start, box_extent, pooled, p, size, start, end);
}

// ps_roi_pool (torchvision): the box's end is exclusive and bins are clipped to size - 1, so
// the last row and column of the map are never read.
template <typename T>
C10_HOST_DEVICE inline PoolBox ps_roi_pool_box(T x1, T y1, T x2, T y2, T spatial_scale) {
  return pool_box(x1, y1, x2, y2, spatial_scale, /*extra=*/0);
}

template <typename T>
C10_HOST_DEVICE inline void ps_roi_pool_bin(
    int64_t box_start,
    int64_t box_extent,
    int64_t pooled,
    int64_t p,
    int64_t size,
    int64_t& start,
    int64_t& end) {
  pool_bin<T>(box_start, box_extent, pooled, p, size - 1, start, end);
}

// Whether bin rows [ys, ye) x columns [xs, xe) hold no cell (the bin then pools to 0).
C10_HOST_DEVICE inline bool pool_bin_empty(int64_t ys, int64_t ye, int64_t xs, int64_t xe) {
  return ye <= ys || xe <= xs;
}

// The number of cells of a non-empty bin, the divisor of ps_roi_pool's average.
template <typename T>
C10_HOST_DEVICE inline T pool_bin_area(int64_t ys, int64_t ye, int64_t xs, int64_t xe) {
  return static_cast<T>((ye - ys) * (xe - xs));
}

// =======================================================================================
// 7. Position-sensitive channel mapping (R-FCN)
// =======================================================================================

// Output channel c_out of bin (ph, pw) reads this input channel.
C10_HOST_DEVICE inline int64_t ps_input_channel(
    int64_t c_out,
    int64_t ph,
    int64_t pw,
    int64_t pooled_height,
    int64_t pooled_width) {
  return (c_out * pooled_height + ph) * pooled_width + pw;
}

// =======================================================================================
// 8. roi_align_rotated (detectron2's ROIAlignRotated): box (cx, cy, w, h, angle in degrees,
//    counter-clockwise on screen)
// =======================================================================================
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
  // In double, rounded to T: what the CPU build has always computed (see section 0).
  g.cos_t = static_cast<T>(fn::cos(static_cast<double>(theta)));
  g.sin_t = static_cast<T>(fn::sin(static_cast<double>(theta)));
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
C10_HOST_DEVICE inline void rotate_sample(const RotatedGeometry<T>& g, T yy, T xx, T& y, T& x) {
  x = yy * g.sin_t + xx * g.cos_t + g.center_x;
  y = yy * g.cos_t - xx * g.sin_t + g.center_y;
}

// ---------------------------------------------------------------------------------------
// Which samples of a rotated bin can land on the map.
//
// Why: sample_range does not apply to a rotated bin (its samples form a rotated lattice),
// and an adaptive grid of a huge box has up to kMaxGrid^2 samples per bin, nearly all off
// the map. So the kernels visit, in the usual order (rows iy, then columns ix), only the
// samples whose exact position lies in the map [-1, W] x [-1, H] widened by a bound E on the
// rounding error of the computed position: first the rows whose line crosses the widened
// map, then, per row, the columns inside it. A sample outside that set has a computed
// position off the map and contributes 0, so skipping it changes no result.
//
// Work bound: an adaptive grid of more than one sample has a sample spacing of at least
// 0.5 pixel (bin / ceil(bin)), or at least 1 pixel once kMaxGrid caps it, so a bin visits
// O((H + W + E / spacing)^2) samples whatever the size of the box; a fixed sampling_ratio is
// at most 1024 per axis (checks::check_sampling_ratio).
//
// The bound E: every intermediate of sample_coord and rotate_sample is at most
// M = |cx| + |cy| + |h| + |w| + H + W + 1 in magnitude and a position goes through about ten
// roundings, so a computed position is within ~10 u M of the exact one (u: the unit roundoff
// of T); E = 32 eps M (eps = 2u) also covers the double-precision rounding of the ranges here.
//
// The cap (the definition for absurd boxes): E is clamped to 64 sample spacings. Only boxes
// with M above 2^24 sample spacings in float32 (2^53 in float64), i.e. coordinates of millions
// of map pixels, have a larger bound; for them a sample whose rounded position lands on the
// map although its exact position lies more than 64 spacings off the map is skipped (such a
// position is rounding noise, not geometry).
// ---------------------------------------------------------------------------------------
constexpr double kRotatedMarginSamples = 64.0;

// Samples i in [0, g) whose exact coordinate a + (i + 0.5) d lies in [v0, v1], widened by
// one sample below and two above (like sample_range) so that rounding here drops none.
C10_HOST_DEVICE inline void index_range(double v0, double v1, double a, double d, int64_t g, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = 0;
  if (g <= 0 || !(v0 <= v1)) {
    return;  // empty or NaN
  }
  if (d == 0.0) {
    if (a >= v0 && a <= v1) {
      hi = g;
    }
    return;
  }
  double i0 = (v0 - a) / d - 0.5;
  double i1 = (v1 - a) / d - 0.5;
  if (d < 0.0) {
    const double t = i0;
    i0 = i1;
    i1 = t;
  }
  if (!(i1 >= -1.0) || !(i0 <= static_cast<double>(g))) {
    return;
  }
  const double f0 = fn::floor(i0) - 1.0;
  const double f1 = fn::ceil(i1) + 2.0;
  lo = f0 <= 0.0 ? 0 : static_cast<int64_t>(f0);
  hi = f1 >= static_cast<double>(g) ? g : static_cast<int64_t>(f1);
  if (hi < lo) {
    hi = lo;
  }
}

// Intersects [lo, hi] with the xx for which a * xx lies in [p0, p1].
C10_HOST_DEVICE inline void clip_linear(double a, double p0, double p1, double& lo, double& hi) {
  if (a > 0.0) {
    lo = max_of(lo, p0 / a);
    hi = min_of(hi, p1 / a);
  } else if (a < 0.0) {
    lo = max_of(lo, p1 / a);
    hi = min_of(hi, p0 / a);
  } else if (!(p0 <= 0.0 && p1 >= 0.0)) {
    lo = 1.0;
    hi = -1.0;
  }
}

struct RotatedScan {
  double ay, dy;           // row iy of the bin lies at yy = ay + (iy + 0.5) dy in the box frame
  double ax, dx;           // column ix at xx = ax + (ix + 0.5) dx
  double cx, cy, c, s;     // the geometry's centre and rotation, as the kernels hold them
  double x0, x1, y0, y1;   // the map widened by E
  int64_t grid_w;
  int64_t row_lo, row_hi;  // rows [row_lo, row_hi) may hold samples on the map
};

template <typename T>
C10_HOST_DEVICE inline RotatedScan rotated_scan(
    const RotatedGeometry<T>& g,
    int64_t ph,
    int64_t pw,
    int64_t height,
    int64_t width) {
  RotatedScan r;
  r.row_lo = r.row_hi = 0;
  r.grid_w = g.grid_w;
  r.ay = r.dy = r.ax = r.dx = r.cx = r.cy = r.c = r.s = 0.0;
  r.x0 = r.x1 = r.y0 = r.y1 = 0.0;
  if (g.grid_h <= 0 || g.grid_w <= 0 || height < 1 || width < 1) {
    return r;
  }
  const double start_y = static_cast<double>(g.start_y);
  const double start_x = static_cast<double>(g.start_x);
  const double bin_h = static_cast<double>(g.bin_h);
  const double bin_w = static_cast<double>(g.bin_w);
  r.cx = static_cast<double>(g.center_x);
  r.cy = static_cast<double>(g.center_y);
  r.c = static_cast<double>(g.cos_t);
  r.s = static_cast<double>(g.sin_t);
  if (!finite_all(start_y, start_x, bin_h, bin_w) || !finite_all(r.cx, r.cy, r.c, r.s)) {
    return r;  // every computed position is NaN or infinite: off the map
  }
  r.ay = start_y + static_cast<double>(ph) * bin_h;
  r.dy = bin_h / static_cast<double>(g.grid_h);
  r.ax = start_x + static_cast<double>(pw) * bin_w;
  r.dx = bin_w / static_cast<double>(g.grid_w);
  const double h = static_cast<double>(height);
  const double w = static_cast<double>(width);
  const double m = fn::fabs(r.cx) + fn::fabs(r.cy) + 2.0 * (fn::fabs(start_y) + fn::fabs(start_x)) + h + w + 1.0;
  double e = 32.0 * machine_epsilon<T>() * m;
  double spacing = fn::fabs(r.dy);
  if (spacing == 0.0 || (fn::fabs(r.dx) > 0.0 && fn::fabs(r.dx) < spacing)) {
    spacing = fn::fabs(r.dx);
  }
  if (spacing > 0.0 && e > kRotatedMarginSamples * spacing) {
    e = kRotatedMarginSamples * spacing;
  }
  if (!(e - e == 0.0)) {
    return r;
  }
  r.x0 = -1.0 - e;
  r.x1 = w + e;
  r.y0 = -1.0 - e;
  r.y1 = h + e;
  // The box-frame yy of the widened map's corners: rotate_sample inverted (for the cos and
  // sin as held, whose squares need not sum to exactly 1).
  const double n = r.c * r.c + r.s * r.s;
  if (!(n > 0.0)) {
    return r;
  }
  double yy_lo = 0.0, yy_hi = 0.0;
  for (int corner = 0; corner < 4; ++corner) {
    const double X = (corner & 1) ? r.x1 : r.x0;
    const double Y = (corner & 2) ? r.y1 : r.y0;
    const double yy = ((Y - r.cy) * r.c + (X - r.cx) * r.s) / n;
    if (corner == 0) {
      yy_lo = yy_hi = yy;
    } else {
      yy_lo = min_of(yy_lo, yy);
      yy_hi = max_of(yy_hi, yy);
    }
  }
  index_range(yy_lo, yy_hi, r.ay, r.dy, g.grid_h, r.row_lo, r.row_hi);
  return r;
}

// The columns [lo, hi) of row iy that may hold samples on the map.
C10_HOST_DEVICE inline void rotated_scan_cols(const RotatedScan& r, int64_t iy, int64_t& lo, int64_t& hi) {
  const double yy = r.ay + (static_cast<double>(iy) + 0.5) * r.dy;
  // x = yy s + xx c + cx in [x0, x1] and y = yy c - xx s + cy in [y0, y1], solved for xx.
  double xx_lo = -INFINITY, xx_hi = INFINITY;
  clip_linear(r.c, r.x0 - r.cx - yy * r.s, r.x1 - r.cx - yy * r.s, xx_lo, xx_hi);
  clip_linear(-r.s, r.y0 - r.cy - yy * r.c, r.y1 - r.cy - yy * r.c, xx_lo, xx_hi);
  index_range(xx_lo, xx_hi, r.ax, r.dx, r.grid_w, lo, hi);
}

// Calls fn(taps) for every sample of rotated bin (ph, pw) that lands on a [height, width]
// plane with element strides (row_stride, col_stride), rows then columns (detectron2's order
// of summation), visiting only the samples rotated_scan allows.
template <typename T, typename Fn>
C10_HOST_DEVICE inline void for_each_rotated_sample(
    const RotatedGeometry<T>& g,
    int64_t ph,
    int64_t pw,
    int64_t height,
    int64_t width,
    int64_t row_stride,
    int64_t col_stride,
    Fn&& fn) {
  const RotatedScan scan = rotated_scan(g, ph, pw, height, width);
  for (int64_t iy = scan.row_lo; iy < scan.row_hi; ++iy) {
    int64_t lo = 0, hi = 0;
    rotated_scan_cols(scan, iy, lo, hi);
    if (lo >= hi) {
      continue;
    }
    const T yy = sample_coord(g.start_y, g.bin_h, ph, iy, g.grid_h);
    for (int64_t ix = lo; ix < hi; ++ix) {
      const T xx = sample_coord(g.start_x, g.bin_w, pw, ix, g.grid_w);
      T y, x;
      rotate_sample(g, yy, xx, y, x);
      AxisTap<T> ty, tx;
      if (axis_tap(y, height, ty) && axis_tap(x, width, tx)) {
        fn(bilinear_taps(ty, tx, row_stride, col_stride));
      }
    }
  }
}

}  // namespace math
}  // namespace roi_kernels
