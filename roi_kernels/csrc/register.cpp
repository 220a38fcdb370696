// Every schema of the roi_kernels library (schemas.h). Each backend registers its kernels in
// its own TORCH_LIBRARY_IMPL block at the bottom of its kernel file (cpu/*.cpp, cuda/*.cu).
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(roi_kernels, m) {
  ROI_KERNELS_DEFINE_SCHEMAS(m);
}
