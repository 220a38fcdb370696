// A CPU executor for our CUDA kernels: the host compiler compiles the kernel headers
// (cuda/*.cuh) unchanged against this header, and a launch runs the kernel's grid on OS
// threads. Test-only: the "cuda-emulated" build (roi_kernels/_build.py, load_emulated) and the
// sanitizer programs (tests/emulated/) use it; the server never loads it.
//
// The model, and what it means for the kernels it runs:
//  * A launch runs grid.x * grid.y * grid.z blocks ONE AFTER ANOTHER, with block.x * block.y *
//    block.z OS threads, one per CUDA thread (std::thread, i.e. pthreads, so that
//    ThreadSanitizer and AddressSanitizer see every access and every synchronisation). The same
//    threads run every block of the launch; a block starts only when every thread has finished
//    the previous one.
//  * threadIdx, blockIdx, blockDim and gridDim are per-thread values, read-only as in CUDA.
//  * __shared__ variables are function-local statics: one instance per kernel instantiation,
//    shared by the threads of the running block (blocks do not overlap, and launches are
//    serialised by a process-wide lock, so no two blocks ever share them at once). Their
//    contents carry over from block to block, as nothing in CUDA promises either way; a kernel
//    must not read what its block has not written.
//  * __syncthreads() is a real barrier among the block's threads (C++20 atomics with futex
//    waits, whose ordering ThreadSanitizer models). A barrier that some threads of a block reach while
//    others leave the kernel, or wait at a different barrier count, is reported as an error
//    (on a GPU it is undefined behaviour: a hang or silently wrong data).
//  * atomicAdd / atomicMax / atomicMin / atomicExch / atomicCAS for int, unsigned int,
//    unsigned long long, float and double are sequentially consistent std::atomic_ref
//    operations.
//  * Not supported, and so not declared (a kernel that uses them fails to compile here instead
//    of running wrongly): dynamic shared memory (extern __shared__), warp intrinsics
//    (__shfl*_sync, __ballot_sync, __syncwarp, warpSize), cooperative groups, __ldg and the
//    other load/store intrinsics, device-side printf and malloc, the fast-math intrinsics
//    (__expf, __fdividef, ...), __syncthreads_count/_and/_or, clock(), streams and events.
//  * Everything else is ordinary C++ compiled by the host compiler: float arithmetic rounds as
//    the CPU's (the builds disable fused multiply-adds on both sides), and the math library is
//    the host's (see roi_math.h, section 0, for why the shared math calls it precision-explicitly).
#pragma once

#if defined(__CUDACC__)
#error "emulator/executor.h stands in for the CUDA runtime under the host compiler; nvcc must not include it"
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Keywords
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)
#define __grid_constant__
// __restrict__ is a host-compiler keyword already (g++ and clang).

// CUDA's fast-math intrinsics. glibc declares some of these names (__expf, __logf, ...) as its
// own internal functions, so a kernel calling them would compile here and silently run the C
// library's accurate function instead of the GPU's approximation: renamed, they fail to
// compile with a message that says why. (<cmath> is included above, so glibc's declarations
// are already made.)
#define __expf __expf_is_a_cuda_intrinsic_the_cpu_executor_does_not_support
#define __exp10f __exp10f_is_a_cuda_intrinsic_the_cpu_executor_does_not_support
#define __logf __logf_is_a_cuda_intrinsic_the_cpu_executor_does_not_support
#define __log2f __log2f_is_a_cuda_intrinsic_the_cpu_executor_does_not_support
#define __log10f __log10f_is_a_cuda_intrinsic_the_cpu_executor_does_not_support
#define __sinf __sinf_is_a_cuda_intrinsic_the_cpu_executor_does_not_support
#define __cosf __cosf_is_a_cuda_intrinsic_the_cpu_executor_does_not_support
#define __tanf __tanf_is_a_cuda_intrinsic_the_cpu_executor_does_not_support
#define __sincosf __sincosf_is_a_cuda_intrinsic_the_cpu_executor_does_not_support
#define __powf __powf_is_a_cuda_intrinsic_the_cpu_executor_does_not_support

// ---------------------------------------------------------------------------------------------
// Built-in types and variables
// ---------------------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace roi_kernels {
namespace emu {

// Per-thread built-ins, set by the executor before a thread runs a block.
struct ThreadState {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
  class Block* block = nullptr;  // the block this thread belongs to (null outside a launch)
  unsigned int linear = 0;       // the thread's index in its block
};

inline thread_local ThreadState tls;

inline const ThreadState& state() {
  return tls;
}

}  // namespace emu
}  // namespace roi_kernels

// Read-only, as in CUDA: `threadIdx.x = 0` does not compile.
#define threadIdx (::roi_kernels::emu::state().thread_idx)
#define blockIdx (::roi_kernels::emu::state().block_idx)
#define blockDim (::roi_kernels::emu::state().block_dim)
#define gridDim (::roi_kernels::emu::state().grid_dim)

namespace roi_kernels {
namespace emu {

// A kernel broke the execution model (a divergent barrier) or threw; the launch reports it.
class LaunchError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The threads of one block and their barrier.
//
// Each thread arrives at "phase points": a __syncthreads() (kind kSync, with its source line)
// or the end of the block (kBlockEnd); a thread whose kernel threw arrives with kAbort. A
// phase completes when every thread of the block has arrived. The last thread to arrive
// checks that all arrivals were at the same point; if not, some threads skipped a barrier
// that others wait at (undefined behaviour on a GPU), and the block fails: every thread is
// released and unwinds, and the launch throws.
//
// Built on C++20 atomics (fetch_add with acquire-release, and atomic wait/notify, i.e. futex
// wakes): ThreadSanitizer models them, so the barrier's ordering is what it sees, and a shared
// variable written before a __syncthreads() and read after it is no race, while one read
// without the barrier is.
class Block {
 public:
  enum Kind : unsigned int { kSync = 0, kBlockEnd = 1, kAbort = 2 };

  explicit Block(unsigned int threads) : threads_(threads), points_(threads) {}

  // Returns false when the block has failed (the caller unwinds).
  bool arrive(unsigned int thread, Kind kind, unsigned int line = 0) {
    points_[thread] = Point{kind, line};
    const uint64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == threads_) {
      check_points();  // every arrival's point happens-before this (the fetch_add chain)
      // The verdict of this phase: stable until every thread has read it, since the next
      // phase cannot complete before they all arrive again.
      phase_failed_.store(failed_.load(std::memory_order_acquire), std::memory_order_relaxed);
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      generation_.notify_all();
    } else {
      uint64_t now = generation_.load(std::memory_order_acquire);
      while (now == generation) {
        generation_.wait(now, std::memory_order_acquire);
        now = generation_.load(std::memory_order_acquire);
      }
    }
    return !phase_failed_.load(std::memory_order_relaxed);
  }

  // Records why the block fails (first reason wins); the phase in progress still completes.
  void fail(const std::string& why) {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (error_.empty()) {
      error_ = why;
    }
    failed_.store(true, std::memory_order_release);
  }

  bool failed() const {
    return failed_.load(std::memory_order_acquire);
  }

  std::string error() {
    std::lock_guard<std::mutex> lock(error_mutex_);
    return error_;
  }

  void set_block(uint3 b) {
    block_ = b;  // by thread 0 before it reaches the block's first phase point
  }

 private:
  struct Point {
    unsigned int kind;
    unsigned int line;
  };

  std::string where() const {
    std::ostringstream s;
    s << "(" << block_.x << ", " << block_.y << ", " << block_.z << ")";
    return s.str();
  }

  void check_points() {
    const Point first = points_[0];
    for (unsigned int t = 0; t < threads_; ++t) {
      const Point p = points_[t];
      if (p.kind == kAbort) {
        return;  // fail() has recorded the reason
      }
    }
    for (unsigned int t = 1; t < threads_; ++t) {
      const Point p = points_[t];
      if (p.kind == first.kind && p.line == first.line) {
        continue;
      }
      std::ostringstream s;
      if (p.kind != first.kind) {
        const unsigned int line = p.kind == kSync ? p.line : first.line;
        const unsigned int waiting = p.kind == kSync ? t : 0;
        s << "__syncthreads() at line " << line << " was reached by thread " << waiting << " of block " << where()
          << " while thread " << (waiting == 0 ? t : 0)
          << " finished the block: a barrier in divergent code (undefined behaviour on a GPU)";
      } else {
        s << "threads 0 and " << t << " of block " << where() << " wait at different __syncthreads() calls (lines "
          << first.line << " and " << p.line << "): a barrier in divergent code (undefined behaviour on a GPU)";
      }
      fail(s.str());
      return;
    }
  }

  const unsigned int threads_;
  std::vector<Point> points_;  // each thread's slot, written before it arrives
  std::atomic<unsigned int> arrived_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> failed_{false};
  std::atomic<bool> phase_failed_{false};
  std::mutex error_mutex_;
  std::string error_;
  uint3 block_{0, 0, 0};
};

// Thrown through a kernel's frames to unwind a thread of a failed block.
struct Unwind {};

inline void syncthreads(unsigned int line) {
  Block* b = tls.block;
  if (b == nullptr) {
    throw LaunchError("__syncthreads() called outside a kernel launch");
  }
  if (!b->arrive(tls.linear, Block::kSync, line)) {
    throw Unwind{};
  }
}

// Launch settings for tests: a cap on the grid (so that grid-stride loops take several
// rounds) and what the last launch ran. Guarded by launch_mutex().
struct Settings {
  uint64_t max_blocks = 0;  // 0: the grid as launched
  dim3 last_grid{0, 0, 0};
  dim3 last_block{0, 0, 0};
  dim3 last_requested_grid{0, 0, 0};
  uint64_t launches = 0;
};

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline Settings& settings() {
  static Settings s;
  return s;
}

// Grid dimensions after the test cap: x first, then y, then z are reduced. Only kernels whose
// loops stride by gridDim (all of ours) may be capped; the cap is a test setting.
inline dim3 capped_grid(dim3 grid, uint64_t max_blocks) {
  if (max_blocks == 0) {
    return grid;
  }
  dim3 g = grid;
  auto total = [&] { return uint64_t(g.x) * g.y * g.z; };
  while (total() > max_blocks && g.x > 1) {
    g.x = static_cast<unsigned int>(std::max<uint64_t>(1, max_blocks / (uint64_t(g.y) * g.z)));
    if (uint64_t(g.x) * g.y * g.z > max_blocks) {
      g.x = 1;
    }
  }
  while (total() > max_blocks && g.y > 1) {
    g.y = static_cast<unsigned int>(std::max<uint64_t>(1, max_blocks / g.z));
  }
  while (total() > max_blocks && g.z > 1) {
    g.z = static_cast<unsigned int>(max_blocks);
  }
  return g;
}

// Runs body() as the kernel of a <<<grid, block>>> launch. Returns when every block is done;
// throws LaunchError if the kernel broke the model or threw.
template <typename Body>
void launch(dim3 grid, dim3 block, Body&& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    std::ostringstream s;
    s << "invalid block (" << block.x << ", " << block.y << ", " << block.z << "): CUDA allows 1..1024 threads";
    throw LaunchError(s.str());
  }
  if (uint64_t(grid.x) * grid.y * grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    std::ostringstream s;
    s << "invalid grid (" << grid.x << ", " << grid.y << ", " << grid.z << ")";
    throw LaunchError(s.str());
  }
  std::lock_guard<std::mutex> serial(launch_mutex());
  Settings& cfg = settings();
  const dim3 g = capped_grid(grid, cfg.max_blocks);
  cfg.last_requested_grid = grid;
  cfg.last_grid = g;
  cfg.last_block = block;
  ++cfg.launches;

  Block blk(static_cast<unsigned int>(threads));
  auto worker = [&](unsigned int linear) {
    ThreadState& st = tls;
    st.thread_idx = uint3{linear % block.x, (linear / block.x) % block.y, linear / (block.x * block.y)};
    st.block_dim = block;
    st.grid_dim = g;
    st.block = &blk;
    st.linear = linear;
    for (unsigned int bz = 0; bz < g.z; ++bz) {
      for (unsigned int by = 0; by < g.y; ++by) {
        for (unsigned int bx = 0; bx < g.x; ++bx) {
          st.block_idx = uint3{bx, by, bz};
          if (linear == 0) {
            blk.set_block(st.block_idx);
          }
          Block::Kind end = Block::kBlockEnd;
          try {
            body();
          } catch (const Unwind&) {
            st.block = nullptr;
            return;  // the block failed at a phase point every thread has passed
          } catch (const std::exception& e) {
            blk.fail(std::string("a kernel thread threw: ") + e.what());
            end = Block::kAbort;
          } catch (...) {
            blk.fail("a kernel thread threw a non-standard exception");
            end = Block::kAbort;
          }
          if (!blk.arrive(linear, end)) {
            st.block = nullptr;
            return;
          }
        }
      }
    }
    st.block = nullptr;
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned int t = 0; t < threads; ++t) {
    pool.emplace_back(worker, t);
  }
  for (std::thread& t : pool) {
    t.join();
  }
  if (blk.failed()) {
    throw LaunchError(blk.error());
  }
}

// Atomics: sequentially consistent read-modify-writes on the object in place.
template <typename T>
inline T atomic_add(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
inline T atomic_update(T* address, T value, bool want_max) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while ((want_max ? old < value : value < old) && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

}  // namespace emu
}  // namespace roi_kernels

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  ::roi_kernels::emu::syncthreads(where.line());
}

// The atomic types CUDA has for each function (float atomicMax/Min do not exist in CUDA).
inline int atomicAdd(int* a, int v) { return ::roi_kernels::emu::atomic_add(a, v); }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return ::roi_kernels::emu::atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return ::roi_kernels::emu::atomic_add(a, v);
}
inline float atomicAdd(float* a, float v) { return ::roi_kernels::emu::atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return ::roi_kernels::emu::atomic_add(a, v); }
inline int atomicMax(int* a, int v) { return ::roi_kernels::emu::atomic_update(a, v, true); }
inline unsigned int atomicMax(unsigned int* a, unsigned int v) { return ::roi_kernels::emu::atomic_update(a, v, true); }
inline int atomicMin(int* a, int v) { return ::roi_kernels::emu::atomic_update(a, v, false); }
inline unsigned int atomicMin(unsigned int* a, unsigned int v) { return ::roi_kernels::emu::atomic_update(a, v, false); }
inline int atomicExch(int* a, int v) { return std::atomic_ref<int>(*a).exchange(v); }
inline unsigned int atomicExch(unsigned int* a, unsigned int v) { return std::atomic_ref<unsigned int>(*a).exchange(v); }
inline float atomicExch(float* a, float v) { return std::atomic_ref<float>(*a).exchange(v); }
inline int atomicCAS(int* a, int compare, int v) {
  std::atomic_ref<int>(*a).compare_exchange_strong(compare, v);
  return compare;
}
inline unsigned int atomicCAS(unsigned int* a, unsigned int compare, unsigned int v) {
  std::atomic_ref<unsigned int>(*a).compare_exchange_strong(compare, v);
  return compare;
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long compare, unsigned long long v) {
  std::atomic_ref<unsigned long long>(*a).compare_exchange_strong(compare, v);
  return compare;
}
