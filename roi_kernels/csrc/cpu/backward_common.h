// What the CPU backward kernels share (cpu/*_backward.cpp): how the gradient of the input maps
// is cut into tasks, each task's accumulation tile, and the write-out into the result.
//
// Why this scheme: the backward of a RoI op scatters each output gradient into the 4 taps of
// each of its samples, and boxes overlap, so two boxes can add into the same input element.
// torchvision's CPU backward does this on one thread. Here the gradient of every input map is
// cut into "planes" (one image of one map) and each plane into blocks of B channels; a task
// owns one (plane, channel block) outright and visits, in the order the boxes were given, every
// box that reads its plane. No two tasks write the same element (no atomics, no locks), and each
// element's sum runs over the same terms in the same order whatever the number of threads: the
// result is deterministic, bit for bit, and the same on 1 or 16 threads.
//
// A task accumulates into a tile of the window of its plane that its boxes touch, laid out
// [y][x][B] in the accumulation type (float32 for float16 / bfloat16 / float32, float64 for
// float64), so that each tap of a sample updates B contiguous channels (a SIMD vector or a few).
// The task then writes its channels of the whole plane once: the tile inside the window, zeros
// outside, converted to the input's dtype and stored with the result's own strides (NCHW or
// channels_last). Tasks are started largest first (an estimate of their work), each thread
// taking the next one from a shared counter, so unequal planes (FPN levels) still balance.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <cstdint>
#include <numeric>
#include <vector>

#include "../map_set.h"
#include "../roi_math.h"

namespace roi_kernels {
namespace cpu {
namespace backward {

// Rows [y0, y1) and columns [x0, x1) of a plane. Empty when y1 <= y0 or x1 <= x0.
struct Window {
  int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;
  bool empty() const {
    return y1 <= y0 || x1 <= x0;
  }
  void add_cell_range(int64_t ylo, int64_t yhi, int64_t xlo, int64_t xhi) {
    // cells [ylo, yhi) x [xlo, xhi)
    if (yhi <= ylo || xhi <= xlo) {
      return;
    }
    if (empty()) {
      *this = Window{ylo, yhi, xlo, xhi};
      return;
    }
    y0 = std::min(y0, ylo);
    y1 = std::max(y1, yhi);
    x0 = std::min(x0, xlo);
    x1 = std::max(x1, xhi);
  }
  void add(const Window& o) {
    add_cell_range(o.y0, o.y1, o.x0, o.x1);
  }
};

// The valid taps of every bin along one axis: taps[begin[p] .. begin[p + 1]) belong to bin p
// (as the forward's plan in roi_align_kernel.cpp), on_map[p] of them.
template <typename acc_t>
struct AxisPlan {
  std::vector<math::AxisTap<acc_t>> taps;
  std::vector<int64_t> begin;
  std::vector<int64_t> on_map;

  // Fills the plan; returns the cells [lo, hi) the taps touch.
  void build(acc_t start, acc_t bin, int64_t pooled, int64_t grid, int64_t size, int64_t& lo, int64_t& hi) {
    taps.clear();
    begin.assign(pooled + 1, 0);
    on_map.assign(pooled, 0);
    lo = std::numeric_limits<int64_t>::max();
    hi = std::numeric_limits<int64_t>::min();
    for (int64_t p = 0; p < pooled; ++p) {
      math::for_each_axis_tap(start, bin, p, grid, size, [&](int64_t, const math::AxisTap<acc_t>& tap) {
        taps.push_back(tap);
        lo = std::min(lo, tap.lo);
        hi = std::max(hi, tap.hi + 1);
      });
      begin[p + 1] = static_cast<int64_t>(taps.size());
      on_map[p] = begin[p + 1] - begin[p];
    }
  }
};

// One image of one map: where its gradient goes (and, for ops that recompute the forward's
// choice of maximum, where its input values are).
template <typename scalar_t>
struct Plane {
  scalar_t* grad;
  const scalar_t* input;  // null when the op does not read the input
  int64_t height, width;
  int64_t grad_sc, grad_sh, grad_sw;
  int64_t in_sc, in_sh, in_sw;
};

// The planes of a list of 4-D maps [N_m, C, H_m, W_m]: plane base[m] + n is image n of map m.
template <typename scalar_t>
std::vector<Plane<scalar_t>> planes_of(
    const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& inputs,
    std::vector<int64_t>& base) {
  std::vector<Plane<scalar_t>> planes;
  base.assign(grads.size(), 0);
  for (size_t m = 0; m < grads.size(); ++m) {
    base[m] = static_cast<int64_t>(planes.size());
    const at::Tensor& g = grads[m];
    const bool with_input = !inputs.empty();
    for (int64_t n = 0; n < g.size(0); ++n) {
      Plane<scalar_t> p{};
      p.grad = g.mutable_data_ptr<scalar_t>() + n * g.stride(0);
      p.height = g.size(2);
      p.width = g.size(3);
      p.grad_sc = g.stride(1);
      p.grad_sh = g.stride(2);
      p.grad_sw = g.stride(3);
      if (with_input) {
        const at::Tensor& in = inputs[m];
        p.input = in.const_data_ptr<scalar_t>() + n * in.stride(0);
        p.in_sc = in.stride(1);
        p.in_sh = in.stride(2);
        p.in_sw = in.stride(3);
      } else {
        p.input = nullptr;
      }
      planes.push_back(p);
    }
  }
  return planes;
}

// A task's accumulation tile: element (y, x, j) of the window (plane coordinates) is
// data[((y - win.y0) * (win.x1 - win.x0) + (x - win.x0)) * B + j].
template <typename acc_t, int B>
struct Tile {
  acc_t* data;
  Window win;
  int64_t width;

  int64_t at(int64_t y, int64_t x) const {
    return ((y - win.y0) * width + (x - win.x0)) * B;
  }
};

// Packs channels [c0, c0 + cn) of the plane's input window into a tile (channels beyond cn: 0).
template <int B, typename scalar_t, typename acc_t>
void pack_input(const Plane<scalar_t>& p, const Window& win, int64_t c0, int64_t cn, acc_t* dst) {
  const int64_t w = win.x1 - win.x0;
  for (int64_t y = win.y0; y < win.y1; ++y) {
    for (int64_t x = win.x0; x < win.x1; ++x) {
      acc_t* d = dst + ((y - win.y0) * w + (x - win.x0)) * B;
      const scalar_t* s = p.input + y * p.in_sh + x * p.in_sw + c0 * p.in_sc;
      int64_t j = 0;
      for (; j < cn; ++j) {
        d[j] = static_cast<acc_t>(s[j * p.in_sc]);
      }
      for (; j < B; ++j) {
        d[j] = acc_t(0);
      }
    }
  }
}

// Writes channels [c0, c0 + cn) of a plane's gradient: the tile inside its window, 0 outside.
template <int B, typename scalar_t, typename acc_t>
void write_plane(const Plane<scalar_t>& p, const Window& win, const acc_t* tile, int64_t c0, int64_t cn) {
  const int64_t w = win.x1 - win.x0;
  const auto value = [&](int64_t y, int64_t x, int64_t j) -> scalar_t {
    if (y < win.y0 || y >= win.y1 || x < win.x0 || x >= win.x1) {
      return scalar_t(0);
    }
    return static_cast<scalar_t>(tile[((y - win.y0) * w + (x - win.x0)) * B + j]);
  };
  if (p.grad_sc == 1 && cn > 1) {
    // channels_last: channels innermost on both sides
    for (int64_t y = 0; y < p.height; ++y) {
      for (int64_t x = 0; x < p.width; ++x) {
        scalar_t* d = p.grad + y * p.grad_sh + x * p.grad_sw + c0;
        for (int64_t j = 0; j < cn; ++j) {
          d[j] = value(y, x, j);
        }
      }
    }
    return;
  }
  // NCHW: row by row, so that a tile row ([x][B], tens of KB) stays in cache while each of its
  // channels is written out (channel by channel over the whole tile would stream it B times).
  for (int64_t y = 0; y < p.height; ++y) {
    const bool in_rows = y >= win.y0 && y < win.y1;
    for (int64_t j = 0; j < cn; ++j) {
      scalar_t* row = p.grad + (c0 + j) * p.grad_sc + y * p.grad_sh;
      for (int64_t x = 0; x < p.width; ++x) {
        row[x * p.grad_sw] = in_rows ? value(y, x, j) : scalar_t(0);
      }
    }
  }
}

// The boxes of each plane, in the order they were given: boxes[begin[p] .. begin[p + 1]).
struct Buckets {
  std::vector<int64_t> begin;
  std::vector<int64_t> boxes;
};

// plane_of[k]: the plane box k reads, or -1 (it reads nothing and gets no gradient).
inline Buckets bucket_boxes(const std::vector<int64_t>& plane_of, int64_t num_planes) {
  Buckets b;
  b.begin.assign(num_planes + 1, 0);
  for (int64_t p : plane_of) {
    if (p >= 0) {
      ++b.begin[p + 1];
    }
  }
  std::partial_sum(b.begin.begin(), b.begin.end(), b.begin.begin());
  b.boxes.resize(b.begin[num_planes]);
  std::vector<int64_t> next(b.begin.begin(), b.begin.end() - 1);
  for (int64_t k = 0; k < static_cast<int64_t>(plane_of.size()); ++k) {
    if (plane_of[k] >= 0) {
      b.boxes[next[plane_of[k]]++] = k;
    }
  }
  return b;
}

// The channel block of a kernel: B channels per task (a tile row of B accumulators).
template <typename Fn>
void dispatch_block(int64_t channels, Fn&& fn) {
  if (channels <= 8) {
    fn(std::integral_constant<int, 8>{});
  } else if (channels <= 16) {
    fn(std::integral_constant<int, 16>{});
  } else if (channels <= 32) {
    fn(std::integral_constant<int, 32>{});
  } else {
    fn(std::integral_constant<int, 64>{});
  }
}

// Runs every (plane, channel block) task. For each task: the window of its plane that its boxes
// touch (windows[p]) is zeroed in a tile; when with_input, the plane's input over the window is
// packed into a second tile; accumulate(k, c0, cn, grad_tile, input_tile) adds box k's gradient
// for each box of the plane in order; write_plane stores the plane. cost[k] estimates box k's
// work (for the order in which tasks start).
template <int B, typename scalar_t, typename acc_t, typename Accumulate>
void run_tasks(
    const std::vector<Plane<scalar_t>>& planes,
    const Buckets& buckets,
    const std::vector<Window>& windows,
    const std::vector<double>& cost,
    int64_t channels,
    bool with_input,
    Accumulate&& accumulate) {
  const int64_t num_planes = static_cast<int64_t>(planes.size());
  const int64_t blocks = (channels + B - 1) / B;
  const int64_t num_tasks = num_planes * blocks;
  if (num_tasks == 0) {
    return;
  }
  std::vector<double> plane_cost(num_planes, 0.0);
  for (int64_t p = 0; p < num_planes; ++p) {
    double c = static_cast<double>(planes[p].height) * static_cast<double>(planes[p].width);
    for (int64_t i = buckets.begin[p]; i < buckets.begin[p + 1]; ++i) {
      c += cost[buckets.boxes[i]];
    }
    plane_cost[p] = c;
  }
  std::vector<int64_t> order(num_tasks);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return plane_cost[a / blocks] > plane_cost[b / blocks];
  });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<acc_t> grad_tile, input_tile;
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) {
      const int64_t task = order[t];
      const int64_t p = task / blocks;
      const int64_t c0 = (task % blocks) * B;
      const int64_t cn = std::min<int64_t>(B, channels - c0);
      const Plane<scalar_t>& plane = planes[p];
      const Window& win = windows[p];
      Tile<acc_t, B> tile{nullptr, win, win.x1 - win.x0};
      Tile<acc_t, B> in_tile{nullptr, win, win.x1 - win.x0};
      if (!win.empty() && buckets.begin[p] < buckets.begin[p + 1]) {
        const size_t n = static_cast<size_t>((win.y1 - win.y0) * (win.x1 - win.x0) * B);
        grad_tile.assign(n, acc_t(0));
        tile.data = grad_tile.data();
        if (with_input) {
          input_tile.resize(n);
          pack_input<B>(plane, win, c0, cn, input_tile.data());
          in_tile.data = input_tile.data();
        }
        for (int64_t i = buckets.begin[p]; i < buckets.begin[p + 1]; ++i) {
          accumulate(buckets.boxes[i], c0, cn, tile, static_cast<const Tile<acc_t, B>&>(in_tile));
        }
        write_plane<B>(plane, win, tile.data, c0, cn);
      } else {
        write_plane<B>(plane, Window{}, static_cast<const acc_t*>(nullptr), c0, cn);
      }
    }
  });
}

// The output gradient of box k over channels [c0, c0 + cn), gathered as [bin][B] in acc_t
// (channels beyond cn: 0), from a grad_output of any strides.
template <int B, typename scalar_t, typename acc_t>
void gather_grad(
    const scalar_t* grad,
    const int64_t* strides,  // of grad_output [K, C, PH, PW]
    int64_t k,
    int64_t c0,
    int64_t cn,
    int64_t pooled_height,
    int64_t pooled_width,
    acc_t* dst) {
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      acc_t* d = dst + (ph * pooled_width + pw) * B;
      const scalar_t* s = grad + k * strides[0] + c0 * strides[1] + ph * strides[2] + pw * strides[3];
      int64_t j = 0;
      for (; j < cn; ++j) {
        d[j] = static_cast<acc_t>(s[j * strides[1]]);
      }
      for (; j < B; ++j) {
        d[j] = acc_t(0);
      }
    }
  }
}

// Adds g * w to the four taps of a sample, in torchvision's order (w1, w2, w3, w4): where taps
// coincide (the last row or column of a map) the adds to that element keep that order.
template <int B, typename acc_t>
inline void scatter_sample(acc_t* tile, int64_t o1, int64_t o2, int64_t o3, int64_t o4, const math::BilinearWeights<acc_t>& w, const acc_t* g) {
  acc_t* t1 = tile + o1;
  for (int j = 0; j < B; ++j) {
    t1[j] += g[j] * w.w1;
  }
  acc_t* t2 = tile + o2;
  for (int j = 0; j < B; ++j) {
    t2[j] += g[j] * w.w2;
  }
  acc_t* t3 = tile + o3;
  for (int j = 0; j < B; ++j) {
    t3[j] += g[j] * w.w3;
  }
  acc_t* t4 = tile + o4;
  for (int j = 0; j < B; ++j) {
    t4[j] += g[j] * w.w4;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: the results' allocation from the sizes the backward ops receive.
// ---------------------------------------------------------------------------------------------

// The gradient of a map of sizes `sizes` (3-D [C, H, W] or 4-D [N, C, H, W]), in the layout of
// the forward's input: channels_last (for 3-D: [H, W, C] in memory) or contiguous.
inline at::Tensor empty_grad(at::IntArrayRef sizes, bool channels_last, const at::TensorOptions& options) {
  if (sizes.size() == 4) {
    return at::empty(sizes, options.memory_format(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  }
  TORCH_CHECK(sizes.size() == 3, "a map's sizes must have 3 or 4 entries, got ", sizes.size());
  if (channels_last) {
    return at::empty({sizes[1], sizes[2], sizes[0]}, options).permute({2, 0, 1});
  }
  return at::empty(sizes, options);
}

// A schema's bool[] as the kernels take it.
inline std::vector<bool> flags_of(const c10::List<bool>& list) {
  std::vector<bool> out;
  for (size_t i = 0; i < list.size(); ++i) {
    out.push_back(list.get(i));
  }
  return out;
}

// Whether the gradient of a forward input is laid out channels_last (roi_kernels/_autograd.py
// makes the same choice for the sizes-only ops): an input that is channels_last and not also
// contiguous (4-D), or whose channels are innermost (3-D [C, H, W] stored as [H, W, C]).
inline bool prefers_channels_last(const at::Tensor& t) {
  if (t.is_contiguous()) {
    return false;
  }
  if (t.dim() == 4) {
    return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  }
  return t.dim() == 3 && t.size(0) > 1 && t.stride(0) == 1;
}

// Splits a flat list of sizes into `dims`-long entries, one per map.
inline std::vector<std::vector<int64_t>> split_sizes(at::IntArrayRef flat, int64_t dims, size_t maps, const char* name) {
  TORCH_CHECK(
      static_cast<int64_t>(flat.size()) == dims * static_cast<int64_t>(maps),
      name,
      " must hold ",
      dims,
      " sizes per map (",
      maps,
      " maps), got ",
      flat.size());
  std::vector<std::vector<int64_t>> out;
  for (size_t m = 0; m < maps; ++m) {
    out.emplace_back(flat.begin() + m * dims, flat.begin() + (m + 1) * dims);
    for (int64_t v : out.back()) {
      TORCH_CHECK(v >= 0, name, " must not be negative, got ", flat);
    }
  }
  return out;
}

// grad_output must be Tensor[K, C, PH, PW] of the input's dtype.
inline void check_grad(const at::Tensor& grad, int64_t boxes, int64_t channels, int64_t ph, int64_t pw, const char* op) {
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == boxes && grad.size(1) == channels && grad.size(2) == ph && grad.size(3) == pw,
      op,
      ": grad must be Tensor[",
      boxes,
      ", ",
      channels,
      ", ",
      ph,
      ", ",
      pw,
      "] (the forward's output), got shape ",
      grad.sizes());
  TORCH_CHECK(
      grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble || grad.scalar_type() == at::kHalf ||
          grad.scalar_type() == at::kBFloat16,
      op,
      ": grad must be float32, float16, bfloat16 or float64, got ",
      grad.scalar_type());
}

// Everything the backward needs besides the output gradient.
struct Setup {
  std::vector<at::Tensor> results;  // what the op returns (3-D for per-image maps)
  std::vector<at::Tensor> grads;    // the results as 4-D [N_m, C, H_m, W_m]
  std::vector<at::Tensor> inputs;   // 4-D views of the forward's inputs (max mode), else empty
  MapSet set;                       // selection rule and scales (set.maps: the 4-D gradients)
};

// Allocates the results from the maps' sizes (dims: 3 or 4 per map) and layouts.
inline void allocate(
    Setup& st,
    const at::Tensor& grad,
    at::IntArrayRef sizes,
    const std::vector<bool>& channels_last,
    int64_t dims,
    at::TensorList inputs) {
  const size_t maps = channels_last.size();
  TORCH_CHECK(maps > 0, "the backward needs at least one map");
  const auto per_map = split_sizes(sizes, dims, maps, "sizes");
  for (size_t m = 0; m < maps; ++m) {
    TORCH_CHECK(per_map[m][dims - 3] == per_map[0][dims - 3], "sizes: every map must have the channels of the first");
    at::Tensor r = empty_grad(per_map[m], channels_last[m], grad.options());
    st.results.push_back(r);
    st.grads.push_back(dims == 3 ? r.unsqueeze(0) : r);
    st.set.maps.push_back(st.grads.back());
  }
  for (const at::Tensor& in : inputs) {
    st.inputs.push_back(dims == 3 ? in.unsqueeze(0) : in);
  }
  st.set.channels = per_map[0][dims - 3];
}

}  // namespace backward
}  // namespace cpu
}  // namespace roi_kernels
