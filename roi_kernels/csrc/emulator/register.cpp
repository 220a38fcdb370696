// The test-only library roi_kernels_emulated: the schemas of roi_kernels, whose CPU kernels are
// the CUDA kernels run through the CPU executor (emulator/*.cpp include cuda/*.cu), and the
// executor's test settings. Built by roi_kernels._build.load_emulated; never by the server.
#include <torch/library.h>

#include <vector>

#include "../schemas.h"
#include "executor.h"

namespace {

// Caps the grid of later launches at n blocks (0: no cap), so that grid-stride loops take
// several rounds; returns the previous cap.
int64_t set_max_blocks(int64_t n) {
  TORCH_CHECK(n >= 0, "max_blocks must be >= 0, got ", n);
  std::lock_guard<std::mutex> lock(roi_kernels::emu::launch_mutex());
  auto& s = roi_kernels::emu::settings();
  const int64_t previous = static_cast<int64_t>(s.max_blocks);
  s.max_blocks = static_cast<uint64_t>(n);
  return previous;
}

// What the last launch ran: [launches so far, requested grid x, y, z, executed grid x, y, z,
// block x, y, z].
std::vector<int64_t> last_launch() {
  std::lock_guard<std::mutex> lock(roi_kernels::emu::launch_mutex());
  const auto& s = roi_kernels::emu::settings();
  return {static_cast<int64_t>(s.launches),
          s.last_requested_grid.x, s.last_requested_grid.y, s.last_requested_grid.z,
          s.last_grid.x, s.last_grid.y, s.last_grid.z,
          s.last_block.x, s.last_block.y, s.last_block.z};
}

}  // namespace

TORCH_LIBRARY(roi_kernels_emulated, m) {
  ROI_KERNELS_DEFINE_SCHEMAS(m);
  m.def("set_max_blocks(int n) -> int", &set_max_blocks);
  m.def("last_launch() -> int[]", &last_launch);
}
