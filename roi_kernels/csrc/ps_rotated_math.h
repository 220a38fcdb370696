// Per-sample helpers of ps_roi_align and roi_align_rotated that roi_math.h does not have,
// shared by their CPU and CUDA kernels. Same rules as roi_math.h: C10_HOST_DEVICE inline,
// range checks that NaN fails, no float-to-integer cast before the value is known in range.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "roi_math.h"

namespace roi_kernels {
namespace math {

// ---------------------------------------------------------------------------------------
// math::bilinear split in two: the four element offsets and weights of a sample, then their
// application to a plane. The CPU kernels compute a sample's taps once and apply them to
// every channel; the CUDA kernels call the same two functions, so both round alike. The
// weights and the sum are bilinear's, term for term.
// ---------------------------------------------------------------------------------------
template <typename T>
struct BilinearTaps {
  int64_t o1, o2, o3, o4;  // element offsets into the plane
  T w1, w2, w3, w4;
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
  t.w1 = ty.h * tx.h;
  t.w2 = ty.h * tx.l;
  t.w3 = ty.l * tx.h;
  t.w4 = ty.l * tx.l;
  return t;
}

template <typename T, typename In>
C10_HOST_DEVICE inline T apply_taps(const In* plane, const BilinearTaps<T>& t) {
  const T v1 = static_cast<T>(plane[t.o1]);
  const T v2 = static_cast<T>(plane[t.o2]);
  const T v3 = static_cast<T>(plane[t.o3]);
  const T v4 = static_cast<T>(plane[t.o4]);
  return t.w1 * v1 + t.w2 * v2 + t.w3 * v3 + t.w4 * v4;
}

// ---------------------------------------------------------------------------------------
// roi_align_rotated: which samples of a bin can land on the map.
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

template <typename T>
C10_HOST_DEVICE inline double machine_epsilon() {
  return sizeof(T) <= sizeof(float) ? 1.1920928955078125e-07 : 2.220446049250313e-16;
}

C10_HOST_DEVICE inline bool finite_all(double a, double b, double c, double d) {
  // NaN and +-inf make the sum non-finite; a finite sum of finite values can overflow, which
  // only errs towards "not finite" (the caller then skips the box).
  const double s = ::fabs(a) + ::fabs(b) + ::fabs(c) + ::fabs(d);
  return s - s == 0.0;
}

// Samples i in [0, g) whose exact coordinate a + (i + 0.5) d lies in [v0, v1], widened by
// one sample below and two above (like sample_range) so that rounding here drops none.
C10_HOST_DEVICE inline void index_range(
    double v0,
    double v1,
    double a,
    double d,
    int64_t g,
    int64_t& lo,
    int64_t& hi) {
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
  const double f0 = ::floor(i0) - 1.0;
  const double f1 = ::ceil(i1) + 2.0;
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
  double ay, dy;          // row iy of the bin lies at yy = ay + (iy + 0.5) dy in the box frame
  double ax, dx;          // column ix at xx = ax + (ix + 0.5) dx
  double cx, cy, c, s;    // the geometry's centre and rotation, as the kernels hold them
  double x0, x1, y0, y1;  // the map widened by E
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
  const double m = ::fabs(r.cx) + ::fabs(r.cy) + 2.0 * (::fabs(start_y) + ::fabs(start_x)) + h + w + 1.0;
  double e = 32.0 * machine_epsilon<T>() * m;
  double spacing = ::fabs(r.dy);
  if (spacing == 0.0 || (::fabs(r.dx) > 0.0 && ::fabs(r.dx) < spacing)) {
    spacing = ::fabs(r.dx);
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

}  // namespace math
}  // namespace roi_kernels
