// Every CUDA kernel of roi_kernels, run through the CPU executor under a sanitizer: the CPU
// stand-in for compute-sanitizer's memcheck (AddressSanitizer + UndefinedBehaviorSanitizer:
// an out-of-bounds read of a map, a box table, a map-descriptor table or a shared table; an
// integer overflow; a float cast to an out-of-range integer) and racecheck (ThreadSanitizer:
// shared memory read and written by two threads with no __syncthreads() between).
//
// Built and run by tests/test_sanitizers.py, with the kernel headers (cuda/*.cuh) exactly as
// nvcc compiles them. No ATen: every buffer is a heap allocation of exactly the bytes its
// tensor would span, so one element past the end is outside it. Small shapes (sanitizers make
// each access 2-20x slower), but every path of every kernel: NCHW, channels_last and strided
// maps; float, double and half; avg and max; aligned and not; adaptive, 1 and larger sampling
// ratios; ragged and FPN sets (stacked or per image) beyond the inline map table (the
// device-table path); ragged batches of the one-map kernels, inline and beyond; boxes that
// take the computed-taps path; NaN, infinite, inverted, out-of-map boxes and out-of-range image
// indices (the kernels' own guards); empty maps; grids capped so that the grid-stride loops
// wrap.
//
// Usage: sanitize_kernels [quick]   (quick: one dtype, for ThreadSanitizer's slower runs)
// Prints one line per case and "N cases" at the end; a sanitizer report fails the run.
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda/images.cuh"
#include "cuda/ps_roi_align_kernel.cuh"
#include "cuda/ps_roi_pool_kernel.cuh"
#include "cuda/roi_align_kernel.cuh"
#include "cuda/roi_align_rotated_kernel.cuh"
#include "cuda/roi_pool_kernel.cuh"

namespace rk = roi_kernels;
using rk::cuda::align::MapTable;

namespace {

std::mt19937_64 rng(12345);
int cases = 0;

double uniform(double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(rng);
}

// A heap buffer of exactly n elements.
template <typename T>
std::unique_ptr<T[]> buffer(int64_t n) {
  std::unique_ptr<T[]> p(new T[n > 0 ? n : 1]);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = static_cast<T>(uniform(-2.0, 2.0));
  }
  return p;
}

enum class Layout { kNchw, kChannelsLast, kStrided };

const char* name(Layout l) {
  return l == Layout::kNchw ? "nchw" : l == Layout::kChannelsLast ? "channels_last" : "strided";
}

// A map [n, c, h, w] in a layout: its strides and the number of elements it spans.
struct Map {
  int64_t n, c, h, w;
  int64_t sn, sc, sh, sw;
  int64_t span;
};

Map make_map(int64_t n, int64_t c, int64_t h, int64_t w, Layout l) {
  Map m{n, c, h, w, 0, 0, 0, 0, 0};
  if (l == Layout::kNchw) {
    m.sw = 1, m.sh = w, m.sc = h * w, m.sn = c * h * w;
  } else if (l == Layout::kChannelsLast) {
    m.sc = 1, m.sw = c, m.sh = w * c, m.sn = h * w * c;
  } else {  // every other column of a map twice as wide
    m.sw = 2, m.sh = 2 * w + 1, m.sc = h * (2 * w + 1), m.sn = c * h * (2 * w + 1);
  }
  m.span = (n == 0 || c == 0 || h == 0 || w == 0)
      ? 0
      : (n - 1) * m.sn + (c - 1) * m.sc + (h - 1) * m.sh + (w - 1) * m.sw + 1;
  return m;
}

rk::cuda::MapView view(const Map& m) {
  return rk::cuda::MapView{m.n, m.c, m.h, m.w, m.sn, m.sc, m.sh, m.sw};
}

// Boxes (image index, x1, y1, x2, y2) on an image of [h, w] / scale: random ones, and the
// ones that break kernels. Indices outside [0, images) are refused by the host before a launch;
// a few are kept here all the same, since the kernels guard against them too.
template <typename acc_t>
std::vector<acc_t> boxes5(int64_t k, double h, double w, int64_t images, bool bad_indices) {
  std::vector<acc_t> b;
  auto add = [&](double i, double x1, double y1, double x2, double y2) {
    for (double v : {i, x1, y1, x2, y2}) {
      b.push_back(static_cast<acc_t>(v));
    }
  };
  for (int64_t i = 0; i < k; ++i) {
    const double cx = uniform(0, w), cy = uniform(0, h), bw = uniform(1, w), bh = uniform(1, h);
    add(static_cast<double>(i % images), cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = INFINITY;
  add(0, -50, -40, -10, -5);
  add(0, w + 10, h + 10, w + 90, h + 70);
  add(0, 3, 4, 3, 4);
  add(0, 9, 8, 2, 1);
  add(0, -1e5, -1e5, 1e5, 1e5);
  add(0, 0, 0, w, h);
  add(0, nan, 1, 5, 6);
  add(0, 1, 2, inf, 7);
  add(0, -inf, -inf, inf, inf);
  add(0, 2e30, -2e30, 3e30, 3e30);
  if (bad_indices) {
    add(-1, 1, 1, 4, 4);
    add(static_cast<double>(images), 1, 1, 4, 4);
    add(nan, 1, 1, 4, 4);
    add(2.5e9, 1, 1, 4, 4);
  }
  return b;
}

template <typename acc_t>
std::vector<acc_t> boxes6(int64_t k, double h, double w, int64_t images) {
  std::vector<acc_t> b;
  auto add = [&](double i, double cx, double cy, double bw, double bh, double a) {
    for (double v : {i, cx, cy, bw, bh, a}) {
      b.push_back(static_cast<acc_t>(v));
    }
  };
  for (int64_t i = 0; i < k; ++i) {
    add(static_cast<double>(i % images), uniform(0, w), uniform(0, h), uniform(1, w), uniform(1, h), uniform(-360, 360));
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  add(0, -40, -30, 10, 8, 30);
  add(0, w / 2, h / 2, 1e5, 1e5, 45);
  add(0, 5, 5, 0, 0, 10);
  add(0, 5, 5, -4, 6, 0);
  add(0, 3, 4, 6, 6, nan);
  add(0, 3, 4, 6, 6, 1e9);
  add(-1, 3, 4, 6, 6, 0);
  add(static_cast<double>(images), 3, 4, 6, 6, 0);
  return b;
}

void cap(uint64_t blocks) {
  rk::emu::settings().max_blocks = blocks;
}

void report(const std::string& what) {
  ++cases;
  std::printf("ok %s\n", what.c_str());
  std::fflush(stdout);
}

// ---------------------------------------------------------------------------------------------
// roi_align: single map, ragged, FPN levels
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void roi_align_set(
    const std::string& what,
    const std::vector<Map>& maps,
    const std::vector<double>& scales,
    rk::math::MapSelect select,
    int64_t num_images,
    int64_t ph,
    int64_t pw,
    int64_t sr,
    bool aligned,
    bool is_max,
    double image_h,
    double image_w,
    int64_t k_min = 0,
    int64_t num_levels = 0) {  // kRaggedLevels: the levels of the level-major maps
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = maps[0].c;
  std::vector<std::unique_ptr<scalar_t[]>> data;
  std::vector<rk::cuda::align::MapDesc> descs;
  for (size_t i = 0; i < maps.size(); ++i) {
    const Map& m = maps[i];
    data.push_back(buffer<scalar_t>(m.span));
    descs.push_back({data.back().get(), m.h, m.w, m.sn, m.sc, m.sh, m.sw, scales[i]});
  }
  MapTable table;
  std::memset(&table, 0, sizeof(table));
  table.num = static_cast<int64_t>(maps.size());
  std::unique_ptr<rk::cuda::align::MapDesc[]> global;
  if (table.num <= rk::cuda::align::kInlineMaps) {
    std::copy(descs.begin(), descs.end(), table.inline_maps);
  } else {
    global.reset(new rk::cuda::align::MapDesc[table.num]);  // exactly num descriptors
    std::copy(descs.begin(), descs.end(), global.get());
    table.global = global.get();
  }
  const int64_t k_max = k_min + (num_levels > 0 ? num_levels : table.num) - 1;
  rk::math::MapSelection sel{select, num_images, table.num, k_min, k_max, 224, 4};
  const std::vector<acc_t> rois = boxes5<acc_t>(7, image_h, image_w, num_images, true);
  const int64_t k = static_cast<int64_t>(rois.size() / 5);
  auto rois_buf = std::make_unique<acc_t[]>(rois.size());
  std::copy(rois.begin(), rois.end(), rois_buf.get());
  auto out = std::make_unique<scalar_t[]>(k * channels * ph * pw);
  const bool cl = rk::cuda::channels_last_mapping(channels, maps[0].sc);
  rk::cuda::align::launch_roi_align<scalar_t>(
      table, sel, rois_buf.get(), k, channels, ph, pw, sr, aligned, is_max, cl, out.get());
  report(what);
}

template <typename scalar_t>
void roi_align_cases(const char* dtype) {
  for (Layout l : {Layout::kNchw, Layout::kChannelsLast, Layout::kStrided}) {
    for (int64_t sr : {0, 1, 5}) {
      for (bool is_max : {false, true}) {
        for (bool aligned : {false, true}) {
          const int64_t c = l == Layout::kChannelsLast ? 40 : 7;
          const std::string what = std::string("roi_align ") + dtype + " " + name(l) + " sr=" + std::to_string(sr) +
              (is_max ? " max" : " avg") + (aligned ? " aligned" : "");
          // 9x8 bins: two passes of the channels_last staging tile.
          roi_align_set<scalar_t>(what, {make_map(2, c, 9, 11, l)}, {0.5}, rk::math::MapSelect::kSingle, 2, 9, 8, sr,
                                  aligned, is_max, 18, 22);
        }
      }
    }
    // Huge boxes with adaptive sampling: the computed-taps path.
    roi_align_set<scalar_t>(std::string("roi_align computed taps ") + dtype + " " + name(l),
                            {make_map(1, l == Layout::kChannelsLast ? 33 : 3, 6, 7, l)}, {1.0},
                            rk::math::MapSelect::kSingle, 1, 7, 7, 0, false, false, 6, 7);
    // Ragged: 11 images, more than the inline table holds.
    std::vector<Map> ragged;
    for (int i = 0; i < 11; ++i) {
      ragged.push_back(make_map(1, l == Layout::kChannelsLast ? 35 : 4, 1 + i % 5, 2 + i % 4, l));
    }
    roi_align_set<scalar_t>(std::string("roi_align ragged x11 ") + dtype + " " + name(l), ragged,
                            std::vector<double>(11, 1.0), rk::math::MapSelect::kRagged, 11, 3, 2, -1, true, true, 5, 5);
    // FPN: 10 levels (2..11), device table; and 3 levels, inline.
    for (int levels : {3, 10}) {
      std::vector<Map> fpn;
      std::vector<double> scales;
      for (int k = 2; k < 2 + levels; ++k) {
        const int64_t side = std::max<int64_t>(1, 256 >> k);
        fpn.push_back(make_map(2, 3, side, side, l));
        scales.push_back(std::ldexp(1.0, -k));
      }
      roi_align_set<scalar_t>(std::string("multiscale_roi_align levels=") + std::to_string(levels) + " " + dtype + " " +
                                  name(l),
                              fpn, scales, rk::math::MapSelect::kLevels, 2, 4, 3, 2, false, false, 256, 256, 2);
    }
    // FPN levels per image: 3 levels of 3 images of different sizes, level-major (9 maps, the
    // device table).
    std::vector<Map> per_image;
    std::vector<double> per_image_scales;
    for (int k = 2; k < 5; ++k) {
      for (int i = 0; i < 3; ++i) {
        per_image.push_back(make_map(1, 3, std::max<int64_t>(1, (256 - 60 * i) >> k), std::max<int64_t>(1, (200 + 30 * i) >> k), l));
        per_image_scales.push_back(std::ldexp(1.0, -k));
      }
    }
    roi_align_set<scalar_t>(std::string("multiscale_roi_align_ragged levels=3 images=3 ") + dtype + " " + name(l),
                            per_image, per_image_scales, rk::math::MapSelect::kRaggedLevels, 3, 4, 3, 2, false, true, 256,
                            256, 2, 3);
  }
  // Empty maps, and a grid capped at 2 blocks.
  roi_align_set<scalar_t>(std::string("roi_align empty map ") + dtype, {make_map(1, 4, 0, 5, Layout::kNchw)}, {1.0},
                          rk::math::MapSelect::kSingle, 1, 2, 2, 0, false, false, 4, 4);
  cap(2);
  roi_align_set<scalar_t>(std::string("roi_align grid of 2 ") + dtype, {make_map(2, 70, 5, 6, Layout::kChannelsLast)},
                          {1.0}, rk::math::MapSelect::kSingle, 2, 3, 3, 2, false, true, 5, 6);
  cap(0);
}

// ---------------------------------------------------------------------------------------------
// roi_pool, ps_roi_align, ps_roi_pool, roi_align_rotated
// ---------------------------------------------------------------------------------------------

// A ragged batch of per-image maps [c, h_i, w_i] as the one-map kernels take it (images.cuh),
// each map in a heap buffer of exactly its span; beyond kInlineImages the descriptors are a
// heap buffer of exactly that many.
template <typename scalar_t>
struct RaggedImages {
  std::vector<std::unique_ptr<scalar_t[]>> data;
  std::unique_ptr<rk::cuda::ImageDesc[]> global;
  rk::cuda::ImageTable table;
  int64_t stride_c = 0;  // of image 0 (the layout decides the kernels' thread mapping)

  RaggedImages(int64_t num, int64_t c, Layout l) {
    std::memset(&table, 0, sizeof(table));
    std::vector<rk::cuda::ImageDesc> descs;
    for (int64_t i = 0; i < num; ++i) {
      // Sizes vary per image; image 1 is empty.
      const Map m = make_map(1, c, i == 1 ? 0 : 2 + i % 5, 3 + i % 4, l);
      data.push_back(buffer<scalar_t>(m.span));
      descs.push_back({data.back().get(), m.h, m.w, m.sc, m.sh, m.sw});
    }
    table.num_images = num;
    table.channels = c;
    stride_c = descs[0].stride_c;
    if (num <= rk::cuda::kInlineImages) {
      std::copy(descs.begin(), descs.end(), table.inline_images);
    } else {
      global.reset(new rk::cuda::ImageDesc[num]);
      std::copy(descs.begin(), descs.end(), global.get());
      table.global = global.get();
    }
  }
};

template <typename scalar_t>
void ragged_cases(const char* dtype) {
  using acc_t = at::opmath_type<scalar_t>;
  for (Layout l : {Layout::kNchw, Layout::kChannelsLast, Layout::kStrided}) {
    for (int64_t num : {3, 11}) {
      const std::string what = std::string(dtype) + " " + name(l) + " images=" + std::to_string(num);
      {
        const int64_t c = l == Layout::kChannelsLast ? 40 : 5;
        RaggedImages<scalar_t> images(num, c, l);
        const std::vector<acc_t> r = boxes5<acc_t>(2 * num, 12, 14, num, true);
        const int64_t k = static_cast<int64_t>(r.size() / 5);
        auto rois = std::make_unique<acc_t[]>(r.size());
        std::copy(r.begin(), r.end(), rois.get());
        auto out = std::make_unique<scalar_t[]>(k * c * 3 * 2);
        rk::cuda::pool::launch_roi_pool<scalar_t>(
            static_cast<const scalar_t*>(nullptr), images.table, rois.get(), k, c, 0.5, 3, 2,
            rk::cuda::channels_last_mapping(c, images.stride_c), out.get());
        report("roi_pool_ragged " + what);
      }
      {
        const int64_t ph = 3, pw = 2, cout = 2;
        RaggedImages<scalar_t> images(num, cout * ph * pw, l);
        const std::vector<acc_t> r = boxes5<acc_t>(2 * num, 12, 14, num, true);
        const int64_t k = static_cast<int64_t>(r.size() / 5);
        auto rois = std::make_unique<acc_t[]>(r.size());
        std::copy(r.begin(), r.end(), rois.get());
        const int64_t total = k * cout * ph * pw;
        auto out = std::make_unique<scalar_t[]>(total);
        rk::cuda::ps_align::launch_ps_roi_align<scalar_t>(
            total, static_cast<const scalar_t*>(nullptr), images.table, rois.get(), static_cast<acc_t>(0.5), ph, pw, 2,
            cout, out.get());
        rk::cuda::ps_pool::launch_ps_roi_pool<scalar_t>(
            total, static_cast<const scalar_t*>(nullptr), images.table, rois.get(), static_cast<acc_t>(0.5), ph, pw,
            cout, out.get());
        report("ps_roi_align_ragged, ps_roi_pool_ragged " + what);
      }
      {
        RaggedImages<scalar_t> images(num, 5, l);
        const std::vector<acc_t> r = boxes6<acc_t>(2 * num, 12, 14, num);
        const int64_t k = static_cast<int64_t>(r.size() / 6);
        auto rois = std::make_unique<acc_t[]>(r.size());
        std::copy(r.begin(), r.end(), rois.get());
        const int64_t total = k * 5 * 3 * 4;
        auto out = std::make_unique<scalar_t[]>(total);
        rk::cuda::rotated::launch_roi_align_rotated<scalar_t>(
            total, static_cast<const scalar_t*>(nullptr), images.table, rois.get(), static_cast<acc_t>(0.5), 3, 4, 0,
            true, out.get());
        report("roi_align_rotated_ragged " + what);
      }
    }
  }
}

template <typename scalar_t>
void pool_cases(const char* dtype) {
  using acc_t = at::opmath_type<scalar_t>;
  for (Layout l : {Layout::kNchw, Layout::kChannelsLast, Layout::kStrided}) {
    for (auto size : {std::pair<int64_t, int64_t>{7, 7}, {9, 8}, {300, 1}}) {
      for (uint64_t blocks : {uint64_t(0), uint64_t(2)}) {
        const Map m = make_map(2, l == Layout::kChannelsLast ? 40 : 5, 7, 9, l);
        auto in = buffer<scalar_t>(m.span);
        const std::vector<acc_t> r = boxes5<acc_t>(6, 14, 18, 2, true);
        const int64_t k = static_cast<int64_t>(r.size() / 5);
        auto rois = std::make_unique<acc_t[]>(r.size());
        std::copy(r.begin(), r.end(), rois.get());
        auto out = std::make_unique<scalar_t[]>(k * m.c * size.first * size.second);
        cap(blocks);
        rk::cuda::pool::launch_roi_pool<scalar_t>(
            in.get(), view(m), rois.get(), k, m.c, 0.5,
            size.first, size.second, rk::cuda::channels_last_mapping(m.c, m.sc), out.get());
        cap(0);
        report(std::string("roi_pool ") + dtype + " " + name(l) + " " + std::to_string(size.first) + "x" +
               std::to_string(size.second) + (blocks ? " grid of 2" : ""));
      }
    }
    for (int64_t sr : {0, 1, 4}) {
      const int64_t ph = 3, pw = 2, cout = 3;
      const Map m = make_map(2, cout * ph * pw, 6, 8, l);
      auto in = buffer<scalar_t>(m.span);
      const std::vector<acc_t> r = boxes5<acc_t>(6, 12, 16, 2, true);
      const int64_t k = static_cast<int64_t>(r.size() / 5);
      auto rois = std::make_unique<acc_t[]>(r.size());
      std::copy(r.begin(), r.end(), rois.get());
      const int64_t total = k * cout * ph * pw;
      auto out = std::make_unique<scalar_t[]>(total);
      cap(sr == 4 ? 1 : 0);
      rk::cuda::ps_align::launch_ps_roi_align<scalar_t>(
          total, in.get(), view(m), rois.get(),
          static_cast<acc_t>(0.5), ph, pw, sr, cout, out.get());
      rk::cuda::ps_pool::launch_ps_roi_pool<scalar_t>(
          total, in.get(), view(m), rois.get(),
          static_cast<acc_t>(0.5), ph, pw, cout, out.get());
      cap(0);
      report(std::string("ps_roi_align, ps_roi_pool ") + dtype + " " + name(l) + " sr=" + std::to_string(sr));
    }
    for (int64_t sr : {0, 1, 3}) {
      for (bool aligned : {false, true}) {
        const Map m = make_map(2, 5, 6, 7, l);
        auto in = buffer<scalar_t>(m.span);
        const std::vector<acc_t> r = boxes6<acc_t>(5, 12, 14, 2);
        const int64_t k = static_cast<int64_t>(r.size() / 6);
        auto rois = std::make_unique<acc_t[]>(r.size());
        std::copy(r.begin(), r.end(), rois.get());
        const int64_t total = k * m.c * 3 * 4;
        auto out = std::make_unique<scalar_t[]>(total);
        rk::cuda::rotated::launch_roi_align_rotated<scalar_t>(
            total, in.get(), view(m), rois.get(),
            static_cast<acc_t>(0.5), 3, 4, sr, aligned, out.get());
        report(std::string("roi_align_rotated ") + dtype + " " + name(l) + " sr=" + std::to_string(sr) +
               (aligned ? " aligned" : ""));
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  roi_align_cases<float>("float32");
  pool_cases<float>("float32");
  ragged_cases<float>("float32");
  if (!quick) {
    roi_align_cases<double>("float64");
    pool_cases<double>("float64");
    ragged_cases<double>("float64");
    roi_align_cases<c10::Half>("float16");
    pool_cases<c10::Half>("float16");
    ragged_cases<c10::Half>("float16");
  }
  std::printf("%d cases\n", cases);
  return 0;
}
