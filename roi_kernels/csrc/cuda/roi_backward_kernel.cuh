// The backward kernels of every op on CUDA (roi_align avg / max, roi_pool, ps_roi_align,
// ps_roi_pool, roi_align_rotated; one map, ragged, FPN levels), in two variants:
//  * atomic (the default): one thread per output-gradient element (box, channel, bin), which
//    adds its share to each input element its bin read with atomicAdd, into an accumulation
//    buffer (float32 for float16 / bfloat16 / float32, float64 for float64). Fast; the order of
//    the adds, and so the last bits of the result, vary from run to run.
//  * deterministic (under torch.use_deterministic_algorithms(True)): the CPU kernels' ownership
//    partition (cpu/backward_common.h) with one thread per (plane, input channel): the thread
//    visits the plane's boxes in their order, then the bins, then the samples, and adds with
//    plain stores to the elements it alone owns. The same terms in the same order as the CPU
//    kernels: the result equals the CPU backward bit for bit.
// The per-bin arithmetic (which elements a bin read and with what weights, which sample or cell
// gave a maximum) is visit_bin below, over roi_math.h's functions: both variants and the CPU
// kernels compute the same terms.
//
// Compiled unchanged by nvcc (roi_backward.cu) and by the host compiler against the CPU executor
// (the cuda-emulated test build); see device.cuh.
#pragma once

#include <cstdint>

#include "../roi_math.h"
#include "device.cuh"

namespace roi_kernels {
namespace cuda {
namespace backward {

enum class Op : int { kAlignAvg = 0, kAlignMax = 1, kPool = 2, kPsAlign = 3, kPsPool = 4, kRotated = 5 };

// One image of one map: its accumulation buffer (acc_t) and, for the max modes, its input
// (scalar_t), each with its own element strides.
struct PlaneDesc {
  void* grad;
  const void* input;
  int64_t height, width;
  int64_t grad_sc, grad_sh, grad_sw;
  int64_t in_sc, in_sh, in_sw;
  int64_t map;
};

struct MapDesc {
  double scale;
  int64_t plane_base;  // plane of the map's image 0
};

template <typename acc_t>
struct Args {
  const acc_t* rois;
  int64_t roi_cols;  // 5, or 6 for rotated boxes
  const void* grad;  // the output gradient [K, C_out, PH, PW], scalar_t, strides gs*
  int64_t gs0, gs1, gs2, gs3;
  int64_t num_boxes, channels, channels_out;
  int64_t pooled_height, pooled_width, sampling_ratio;
  bool aligned;
  math::MapSelection selection;
  const PlaneDesc* planes;
  const MapDesc* maps;
  int64_t num_planes;
  // deterministic variant: the boxes of plane p are order[plane_begin[p] .. plane_begin[p + 1])
  const int64_t* order;
  const int64_t* plane_begin;
};

// The input channel output channel c of bin (ph, pw) read.
template <Op op>
__device__ __forceinline__ int64_t input_channel(int64_t c, int64_t ph, int64_t pw, int64_t pooled_height, int64_t pooled_width) {
  if (op == Op::kPsAlign || op == Op::kPsPool) {
    return math::ps_input_channel(c, ph, pw, pooled_height, pooled_width);
  }
  return c;
}

// Calls sink(offset, v) for each input element (offset: y * grad_sh + x * grad_sw in the
// plane) that bin (ph, pw) of box r passes v of its output gradient go, on input channel ci,
// in the CPU kernels' order (samples rows then columns; a sample's taps w1, w2, w3, w4).
template <Op op, typename scalar_t, typename acc_t, typename Sink>
__device__ __forceinline__ void visit_bin(
    const Args<acc_t>& a,
    const acc_t* r,
    const PlaneDesc& p,
    acc_t scale,
    int64_t ci,
    int64_t ph,
    int64_t pw,
    acc_t go,
    Sink&& sink) {
  const int64_t H = p.height, W = p.width, sh = p.grad_sh, sw = p.grad_sw;
  if (op == Op::kAlignAvg || op == Op::kPsAlign) {
    const math::AlignGeometry<acc_t> g = op == Op::kAlignAvg
        ? math::align_geometry<acc_t>(r[1], r[2], r[3], r[4], scale, a.aligned, a.pooled_height, a.pooled_width, a.sampling_ratio)
        : math::ps_align_geometry<acc_t>(r[1], r[2], r[3], r[4], scale, a.pooled_height, a.pooled_width, a.sampling_ratio);
    const acc_t gd = go / g.count;
    math::for_each_bin_sample(g, ph, pw, H, W, [&](const math::AxisTap<acc_t>& ty, const math::AxisTap<acc_t>& tx) {
      const math::BilinearWeights<acc_t> w = math::bilinear_weights(ty, tx);
      sink(ty.lo * sh + tx.lo * sw, gd * w.w1);
      sink(ty.lo * sh + tx.hi * sw, gd * w.w2);
      sink(ty.hi * sh + tx.lo * sw, gd * w.w3);
      sink(ty.hi * sh + tx.hi * sw, gd * w.w4);
    });
  } else if (op == Op::kAlignMax) {
    const math::AlignGeometry<acc_t> g = math::align_geometry<acc_t>(
        r[1], r[2], r[3], r[4], scale, a.aligned, a.pooled_height, a.pooled_width, a.sampling_ratio);
    const int64_t on_map = math::axis_samples_on_map(g.start_y, g.bin_h, ph, g.grid_h, H) *
        math::axis_samples_on_map(g.start_x, g.bin_w, pw, g.grid_w, W);
    const scalar_t* in = static_cast<const scalar_t*>(p.input) + ci * p.in_sc;
    const int64_t ish = p.in_sh, isw = p.in_sw;
    acc_t best = math::align_max_init<acc_t>(g.samples, on_map);
    bool found = false;
    math::AxisTap<acc_t> by{}, bx{};
    math::for_each_bin_sample(g, ph, pw, H, W, [&](const math::AxisTap<acc_t>& ty, const math::AxisTap<acc_t>& tx) {
      const math::BilinearWeights<acc_t> w = math::bilinear_weights(ty, tx);
      const acc_t v = math::bilinear_combine(
          w, static_cast<acc_t>(in[ty.lo * ish + tx.lo * isw]), static_cast<acc_t>(in[ty.lo * ish + tx.hi * isw]),
          static_cast<acc_t>(in[ty.hi * ish + tx.lo * isw]), static_cast<acc_t>(in[ty.hi * ish + tx.hi * isw]));
      if (v > best) {
        best = v;
        by = ty;
        bx = tx;
        found = true;
      }
    });
    if (found) {
      const math::BilinearWeights<acc_t> w = math::bilinear_weights(by, bx);
      sink(by.lo * sh + bx.lo * sw, go * w.w1);
      sink(by.lo * sh + bx.hi * sw, go * w.w2);
      sink(by.hi * sh + bx.lo * sw, go * w.w3);
      sink(by.hi * sh + bx.hi * sw, go * w.w4);
    }
  } else if (op == Op::kPool || op == Op::kPsPool) {
    const math::PoolBox box = op == Op::kPool ? math::roi_pool_box<acc_t>(r[1], r[2], r[3], r[4], scale)
                                              : math::ps_roi_pool_box<acc_t>(r[1], r[2], r[3], r[4], scale);
    if (!box.ok) {
      return;
    }
    // roi_pool's bins, and torchvision's ps_roi_pool backward's, are clipped to [0, size].
    int64_t ys = 0, ye = 0, xs = 0, xe = 0;
    math::pool_bin<acc_t>(box.start_y, box.roi_h, a.pooled_height, ph, H, ys, ye);
    math::pool_bin<acc_t>(box.start_x, box.roi_w, a.pooled_width, pw, W, xs, xe);
    if (math::pool_bin_empty(ys, ye, xs, xe)) {
      return;
    }
    if (op == Op::kPsPool) {
      const acc_t gd = go / math::pool_bin_area<acc_t>(ys, ye, xs, xe);
      for (int64_t y = ys; y < ye; ++y) {
        for (int64_t x = xs; x < xe; ++x) {
          sink(y * sh + x * sw, gd);
        }
      }
      return;
    }
    const scalar_t* in = static_cast<const scalar_t*>(p.input) + ci * p.in_sc;
    acc_t best = math::pool_max_init<acc_t>();
    int64_t arg = -1;
    for (int64_t y = ys; y < ye; ++y) {
      for (int64_t x = xs; x < xe; ++x) {
        const acc_t v = static_cast<acc_t>(in[y * p.in_sh + x * p.in_sw]);
        if (v > best) {
          best = v;
          arg = y * sh + x * sw;
        }
      }
    }
    if (arg >= 0) {
      sink(arg, go);
    }
  } else {  // kRotated
    const math::RotatedGeometry<acc_t> g = math::rotated_geometry<acc_t>(
        r[1], r[2], r[3], r[4], r[5], scale, a.aligned, a.pooled_height, a.pooled_width, a.sampling_ratio);
    const acc_t gd = go / g.count;
    math::for_each_rotated_sample(g, ph, pw, H, W, sh, sw, [&](const math::BilinearTaps<acc_t>& t) {
      sink(t.o1, gd * t.w.w1);
      sink(t.o2, gd * t.w.w2);
      sink(t.o3, gd * t.w.w3);
      sink(t.o4, gd * t.w.w4);
    });
  }
}

// The plane box k reads, or -1.
template <typename acc_t>
__device__ __forceinline__ int64_t plane_of(const Args<acc_t>& a, const acc_t* r) {
  int64_t map = 0, image = 0;
  if (!math::select_map(a.selection, r, map, image)) {
    return -1;
  }
  return a.maps[map].plane_base + image;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t grad_at(const Args<acc_t>& a, int64_t k, int64_t c, int64_t ph, int64_t pw) {
  return static_cast<acc_t>(
      static_cast<const scalar_t*>(a.grad)[k * a.gs0 + c * a.gs1 + ph * a.gs2 + pw * a.gs3]);
}

// Atomic variant: one thread per output-gradient element.
template <Op op, typename scalar_t, typename acc_t>
__global__ void backward_atomic_kernel(const Args<acc_t> a) {
  const int64_t total = a.num_boxes * a.channels_out * a.pooled_height * a.pooled_width;
  ROI_CUDA_KERNEL_LOOP(index, total) {
    int64_t rest = 0, pw = 0, ph = 0, c = 0, k = 0;
    split(index, a.pooled_width, rest, pw);
    split(rest, a.pooled_height, rest, ph);
    split(rest, a.channels_out, k, c);
    const acc_t* r = a.rois + k * a.roi_cols;
    const int64_t plane = plane_of(a, r);
    if (plane < 0) {
      continue;
    }
    const PlaneDesc& p = a.planes[plane];
    const int64_t ci = input_channel<op>(c, ph, pw, a.pooled_height, a.pooled_width);
    acc_t* dst = static_cast<acc_t*>(p.grad) + ci * p.grad_sc;
    const acc_t go = grad_at<scalar_t>(a, k, c, ph, pw);
    const acc_t scale = static_cast<acc_t>(a.maps[p.map].scale);
    visit_bin<op, scalar_t>(a, r, p, scale, ci, ph, pw, go, [&](int64_t o, acc_t v) { atomicAdd(dst + o, v); });
  }
}

// Deterministic variant: one thread per (plane, input channel), owning that channel of the plane.
template <Op op, typename scalar_t, typename acc_t>
__global__ void backward_owned_kernel(const Args<acc_t> a) {
  const int64_t total = a.num_planes * a.channels;
  const int64_t bins = a.pooled_height * a.pooled_width;
  ROI_CUDA_KERNEL_LOOP(index, total) {
    int64_t plane = 0, ci = 0;
    split(index, a.channels, plane, ci);
    const PlaneDesc& p = a.planes[plane];
    acc_t* dst = static_cast<acc_t*>(p.grad) + ci * p.grad_sc;
    const acc_t scale = static_cast<acc_t>(a.maps[p.map].scale);
    const auto sink = [&](int64_t o, acc_t v) { dst[o] += v; };
    for (int64_t i = a.plane_begin[plane]; i < a.plane_begin[plane + 1]; ++i) {
      const int64_t k = a.order[i];
      const acc_t* r = a.rois + k * a.roi_cols;
      if (op == Op::kPsAlign || op == Op::kPsPool) {
        int64_t c_out = 0, bin = 0;
        split(ci, bins, c_out, bin);
        int64_t ph = 0, pw = 0;
        split(bin, a.pooled_width, ph, pw);
        visit_bin<op, scalar_t>(a, r, p, scale, ci, ph, pw, grad_at<scalar_t>(a, k, c_out, ph, pw), sink);
      } else {
        for (int64_t ph = 0; ph < a.pooled_height; ++ph) {
          for (int64_t pw = 0; pw < a.pooled_width; ++pw) {
            visit_bin<op, scalar_t>(a, r, p, scale, ci, ph, pw, grad_at<scalar_t>(a, k, ci, ph, pw), sink);
          }
        }
      }
    }
  }
}

template <Op op, typename scalar_t, typename acc_t>
void launch_backward(const Args<acc_t>& a, bool deterministic) {
  if (deterministic) {
    const int64_t total = a.num_planes * a.channels;
    if (total > 0) {
      cuda::launch(&backward_owned_kernel<op, scalar_t, acc_t>, dim3(blocks_for(total)), dim3(kThreads), a);
    }
    return;
  }
  const int64_t total = a.num_boxes * a.channels_out * a.pooled_height * a.pooled_width;
  if (total > 0) {
    cuda::launch(&backward_atomic_kernel<op, scalar_t, acc_t>, dim3(blocks_for(total)), dim3(kThreads), a);
  }
}

}  // namespace backward
}  // namespace cuda
}  // namespace roi_kernels
