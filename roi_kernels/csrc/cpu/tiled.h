// The CPU execution scheme shared by roi_align (all map-set variants) and roi_pool.
//
// Why: a box's bins read 4 scattered taps per sample. In NCHW each tap is a scalar load per
// channel (torchvision's CPU kernels: one thread, one channel at a time). Here the work is cut
// into tasks of (channel block of kBlock channels, feature map, image): a task first packs
// the window of the map that its boxes touch into a float tile laid out [y][x][kBlock], then
// every tap of every box becomes kBlock contiguous floats (one or two SIMD vectors). The map is
// read from memory about once per task, the tile stays in cache while the boxes run over it,
// and each box's per-sample geometry (computed once, before the tasks) is reused across all
// channel blocks. Tasks run in parallel with at::parallel_for.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace roi_kernels {
namespace cpu {

// Rows [y0, y1) and columns [x0, x1) of a map that a box reads. Empty when y1 <= y0.
struct Window {
  int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;
  bool empty() const {
    return y1 <= y0 || x1 <= x0;
  }
  void add(const Window& o) {
    if (o.empty()) {
      return;
    }
    if (empty()) {
      *this = o;
      return;
    }
    y0 = std::min(y0, o.y0);
    y1 = std::max(y1, o.y1);
    x0 = std::min(x0, o.x0);
    x1 = std::max(x1, o.x1);
  }
};

inline int64_t cells_of(const Window& w) {
  return w.empty() ? 0 : (w.y1 - w.y0) * (w.x1 - w.x0);
}

// Where a box reads from: which map, which image of it, and the window it touches.
struct BoxSource {
  int64_t map = -1;    // -1: the box reads nothing (its output is all zeros)
  int64_t image = 0;
  Window window;
};

// A packed tile: element (y, x, j) of the window is data[((y - win.y0) * width + (x - win.x0)) * B + j].
template <typename acc_t>
struct Tile {
  const acc_t* data;
  Window win;
  int64_t width;  // win.x1 - win.x0

  // Offset of cell (y, x) (map coordinates) in data.
  inline int64_t at(int64_t y, int64_t x, int64_t block) const {
    return ((y - win.y0) * width + (x - win.x0)) * block;
  }
};

#if defined(__AVX__)
// 8 channels x 8 pixels of an NCHW float map, transposed in registers: channel i's 8
// contiguous values at src + i * sC become float i of the 8 pixels' vectors at dst + x * B.
inline void transpose_8x8(const float* src, int64_t sC, float* dst, int64_t B) {
  const __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + sC);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * sC), r3 = _mm256_loadu_ps(src + 3 * sC);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * sC), r5 = _mm256_loadu_ps(src + 5 * sC);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * sC), r7 = _mm256_loadu_ps(src + 7 * sC);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + B, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * B, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * B, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * B, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * B, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * B, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * B, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#endif

// Packs channels [c0, c0 + nc) of image `n` of `map`, restricted to `win`, into `dst` as
// [y][x][B] (channels nc..B-1 zero-filled). Handles any strides; fast paths for NCHW and NHWC.
template <typename scalar_t, typename acc_t, int B>
void pack_tile(const at::Tensor& map, int64_t n, int64_t c0, int64_t nc, const Window& win, acc_t* dst) {
  const scalar_t* base = map.const_data_ptr<scalar_t>();
  const int64_t sN = map.stride(0), sC = map.stride(1), sH = map.stride(2), sW = map.stride(3);
  const int64_t h = win.y1 - win.y0, w = win.x1 - win.x0;
  const scalar_t* src = base + n * sN + c0 * sC + win.y0 * sH + win.x0 * sW;
  if (nc < B) {
    std::fill(dst, dst + h * w * B, acc_t(0));
  }
  if (sC == 1) {  // channels_last: B channels of a pixel are contiguous
    for (int64_t y = 0; y < h; ++y) {
      for (int64_t x = 0; x < w; ++x) {
        const scalar_t* s = src + y * sH + x * sW;
        acc_t* d = dst + (y * w + x) * B;
        for (int64_t j = 0; j < nc; ++j) {
          d[j] = static_cast<acc_t>(s[j]);
        }
      }
    }
    return;
  }
  // NCHW (or any other strides): walk each channel's rows, which are contiguous when sW == 1.
  for (int64_t y = 0; y < h; ++y) {
    acc_t* drow = dst + y * w * B;
    int64_t j0 = 0;
#if defined(__AVX__)
    // float32 NCHW, the common case: 8 channels x 8 pixels per register transpose instead of
    // one scalar load and store per element (packing was half of fpn-mask's time).
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (sW == 1) {
        const int64_t w8 = w - w % 8;
        for (; j0 + 8 <= nc; j0 += 8) {
          const float* s = src + j0 * sC + y * sH;
          for (int64_t x = 0; x < w8; x += 8) {
            transpose_8x8(s + x, sC, drow + x * B + j0, B);
          }
          for (int64_t x = w8; x < w; ++x) {
            for (int64_t j = 0; j < 8; ++j) {
              drow[x * B + j0 + j] = s[j * sC + x];
            }
          }
        }
      }
    }
#endif
    for (int64_t j = j0; j < nc; ++j) {
      const scalar_t* s = src + j * sC + y * sH;
      for (int64_t x = 0; x < w; ++x) {
        drow[x * B + j] = static_cast<acc_t>(s[x * sW]);
      }
    }
  }
}

// Work (channels x (packed cells + each box's cells and bins)) below which run_tiled does not
// go parallel: about 50-100 us of computation.
constexpr int64_t kSerialWork = int64_t(1) << 19;

// Runs `box_fn(k, tile, acc)` for every box k and every channel block, where acc is a
// [bins][B] accumulator the function fills, then writes acc into out[k, c0:c0+B, :, :].
//   maps:    4-D feature maps [N_m, C, H_m, W_m] (any strides), one dtype
//   sources: per box, its map, image and window (map == -1: output zeros)
//   out:     contiguous [K, C, bins] output of the maps' dtype
template <typename scalar_t, typename acc_t, int B, typename BoxFn>
void run_tiled(
    const std::vector<at::Tensor>& maps,
    const std::vector<BoxSource>& sources,
    int64_t channels,
    int64_t bins,
    at::Tensor& out,
    const BoxFn& box_fn) {
  const int64_t num_boxes = static_cast<int64_t>(sources.size());
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();

  // Group boxes by (map, image), keeping the boxes' order within a group.
  struct Group {
    int64_t map, image;
    std::vector<int64_t> boxes;
    Window window;
  };
  std::vector<Group> groups;
  {
    std::vector<std::vector<int64_t>> index(maps.size());  // (map, image) -> group or -1
    for (size_t m = 0; m < maps.size(); ++m) {
      index[m].assign(maps[m].size(0), -1);
    }
    for (int64_t k = 0; k < num_boxes; ++k) {
      const BoxSource& s = sources[k];
      if (s.map < 0) {
        std::fill(out_data + k * channels * bins, out_data + (k + 1) * channels * bins, scalar_t(0));
        continue;
      }
      int64_t& g = index[s.map][s.image];
      if (g < 0) {
        g = static_cast<int64_t>(groups.size());
        groups.push_back(Group{s.map, s.image, {}, Window{}});
      }
      groups[g].boxes.push_back(k);
      groups[g].window.add(s.window);
    }
  }
  if (groups.empty()) {
    return;
  }

  // Tasks: (channel block, group, chunk of the group's boxes). Channel blocks outermost so
  // that contiguous ranges of tasks (what each thread receives) mix all groups evenly. Large
  // groups are cut into chunks when there are too few tasks to keep every thread busy.
  const int64_t num_blocks = (channels + B - 1) / B;
  const int64_t threads = at::get_num_threads();
  struct Task {
    int64_t group, begin, end;
  };
  std::vector<Task> group_tasks;
  const int64_t base_tasks = num_blocks * static_cast<int64_t>(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    const int64_t nb = static_cast<int64_t>(groups[g].boxes.size());
    int64_t chunks = 1;
    if (base_tasks < 4 * threads) {
      chunks = std::min<int64_t>((4 * threads + base_tasks - 1) / base_tasks, std::max<int64_t>(nb / 8, 1));
    }
    for (int64_t c = 0; c < chunks; ++c) {
      group_tasks.push_back(Task{static_cast<int64_t>(g), nb * c / chunks, nb * (c + 1) / chunks});
    }
  }
  const int64_t tasks_per_block = static_cast<int64_t>(group_tasks.size());

  // Small batches run on the calling thread: waking the pool costs more than it saves, and
  // far more when the other cores are busy (a server's network threads), since the team
  // then waits for a thread the OS has not scheduled.
  int64_t cells = 0;
  for (const Group& group : groups) {
    const Window& w = group.window;
    cells += (w.y1 - w.y0) * (w.x1 - w.x0);
    for (int64_t k : group.boxes) {
      const Window& bw = sources[k].window;
      cells += bins + (bw.empty() ? 0 : (bw.y1 - bw.y0) * (bw.x1 - bw.x0));
    }
  }
  const int64_t num_tasks = num_blocks * tasks_per_block;
  const int64_t grain = cells * channels < kSerialWork ? num_tasks : 1;

  at::parallel_for(0, num_tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile_buf;
    std::vector<acc_t> acc(static_cast<size_t>(bins * B));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = t / tasks_per_block;
      const Task& task = group_tasks[t % tasks_per_block];
      const Group& group = groups[task.group];
      const int64_t c0 = block * B;
      const int64_t nc = std::min<int64_t>(B, channels - c0);

      Window win;
      int64_t box_cells = 0;
      for (int64_t i = task.begin; i < task.end; ++i) {
        const Window& bw = sources[group.boxes[i]].window;
        win.add(bw);
        box_cells += cells_of(bw);
      }
      // A sparse task (its boxes' windows cover fewer cells than their union: a few boxes
      // spread over a large map, as fpn-mask's 100 boxes on P2) packs each box's own window
      // just before the box runs, which packs less and keeps the tile in L2.
      const bool per_box = box_cells < cells_of(win);
      Tile<acc_t> tile{nullptr, win, win.x1 - win.x0};
      if (!per_box && !win.empty()) {
        tile_buf.resize(static_cast<size_t>(cells_of(win) * B));
        pack_tile<scalar_t, acc_t, B>(maps[group.map], group.image, c0, nc, win, tile_buf.data());
        tile.data = tile_buf.data();
      }
      for (int64_t i = task.begin; i < task.end; ++i) {
        const int64_t k = group.boxes[i];
        if (per_box) {
          const Window& bw = sources[k].window;
          tile = Tile<acc_t>{nullptr, bw, bw.x1 - bw.x0};
          if (!bw.empty()) {
            tile_buf.resize(static_cast<size_t>(cells_of(bw) * B));
            pack_tile<scalar_t, acc_t, B>(maps[group.map], group.image, c0, nc, bw, tile_buf.data());
            tile.data = tile_buf.data();
          }
        }
        box_fn(k, tile, acc.data());
        scalar_t* o = out_data + (k * channels + c0) * bins;
        for (int64_t j = 0; j < nc; ++j) {
          for (int64_t b = 0; b < bins; ++b) {
            o[j * bins + b] = static_cast<scalar_t>(acc[b * B + j]);
          }
        }
      }
    }
  });
}

// Calls fn(std::integral_constant<int, B>) with the channel block for this dtype and channel
// count. Wide blocks amortise each sample's scalar work (weights, offsets) over more SIMD lanes;
// narrow ones avoid padding few channels (a block is zero-padded past the last channel).
template <typename scalar_t, typename Fn>
void dispatch_block(int64_t channels, const Fn& fn) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    if (channels >= 32) {
      fn(std::integral_constant<int, 32>{});
    } else {
      fn(std::integral_constant<int, 8>{});
    }
  } else {
    if (channels >= 64) {
      fn(std::integral_constant<int, 64>{});
    } else {
      fn(std::integral_constant<int, 16>{});
    }
  }
}

}  // namespace cpu
}  // namespace roi_kernels
