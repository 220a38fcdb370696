// Every schema of the roi_kernels library (schemas.h). Each backend registers its kernels in
// its own TORCH_LIBRARY_IMPL block at the bottom of its kernel file (cpu/*.cpp, cuda/*.cu).
#include <torch/library.h>

#include "cpu/output_cache.h"
#include "schemas.h"

TORCH_LIBRARY(roi_kernels, m) {
  ROI_KERNELS_DEFINE_SCHEMAS(m);
  // Not part of the ops' API (hence the underscore): the next CPU output of an op that the
  // calling thread allocates is `buffer`, when it has that output's dtype and element count
  // (cpu/output_cache.h). None clears it.
  m.def("_place_output(Tensor? buffer) -> ()", [](const std::optional<at::Tensor>& buffer) {
    TORCH_CHECK(
        !buffer || (buffer->device().is_cpu() && buffer->is_contiguous()),
        "_place_output: the buffer must be a contiguous CPU tensor");
    roi_kernels::cpu::OutputCache::place(buffer ? *buffer : at::Tensor());
  });
}
