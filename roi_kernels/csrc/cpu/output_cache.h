// Recycles the CPU memory of large outputs.
//
// Why: a fresh output of tens of MB is mapped page by page on first touch; for fpn-det
// (50 MB) the page faults alone cost about as much as the whole computation. A detector or
// the server calls the ops in a loop, freeing each output before the next call, so keeping a
// few freed buffers for reuse removes that cost in steady state. The cache holds at most
// ROI_KERNELS_OUTPUT_CACHE_MB megabytes (default 512; 0 turns it off); buffers smaller
// than 1 MB go to the ordinary allocator. Every element of an output is written by the
// kernels, so a reused buffer needs no clearing.
//
// It is also where a caller can hand the kernels the memory to write into: place(buffer)
// makes the next output this thread allocates `buffer` itself, when that output has exactly
// its dtype and element count (the server passes a client's shared memory region, so that
// the result is written there and never copied). A placement serves at most one output and
// is dropped when the next one does not match.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace roi_kernels {
namespace cpu {

class OutputCache {
 public:
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive exit
    return *cache;
  }

  // `buffer`: contiguous, on the CPU; undefined clears a placement.
  static void place(const at::Tensor& buffer) {
    placed() = buffer;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t s : sizes) {
      numel *= s;
    }
    if (placed().defined()) {
      at::Tensor buffer = std::move(placed());
      placed() = at::Tensor();
      if (buffer.numel() == numel && buffer.scalar_type() == options.dtype().toScalarType() &&
          buffer.is_contiguous() && buffer.device().is_cpu()) {
        return buffer.view(sizes);
      }
    }
    const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (capacity_ == 0 || bytes < kMinBytes || bytes > capacity_) {
      return at::empty(sizes, options);
    }
    void* ptr = take(bytes);
    if (ptr == nullptr) {
      ptr = at::getCPUAllocator()->raw_allocate(bytes);
    }
    return at::from_blob(
        ptr, sizes, [this, bytes](void* p) { give_back(p, bytes); }, options.device(at::kCPU));
  }

 private:
  static constexpr size_t kMinBytes = size_t(1) << 20;

  static at::Tensor& placed() {
    static thread_local at::Tensor buffer;
    return buffer;
  }

  OutputCache() {
    const char* env = std::getenv("ROI_KERNELS_OUTPUT_CACHE_MB");
    const long mb = env ? std::strtol(env, nullptr, 10) : 512;
    capacity_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) {
      return nullptr;
    }
    void* p = it->second;
    free_.erase(it);
    cached_ -= bytes;
    return p;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Make room by dropping the largest buffers first (the least likely to fit a request).
      while (cached_ + bytes > capacity_ && !free_.empty()) {
        auto last = std::prev(free_.end());
        at::getCPUAllocator()->raw_deallocate(last->second);
        cached_ -= last->first;
        free_.erase(last);
      }
      if (cached_ + bytes <= capacity_) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    at::getCPUAllocator()->raw_deallocate(p);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  size_t capacity_ = 0;
};

}  // namespace cpu
}  // namespace roi_kernels
