// The CUDA ps_roi_align (cuda/ps_roi_align_kernel.cu, unchanged) compiled by the host compiler: its kernel
// runs through the CPU executor on CPU tensors, as roi_kernels_emulated::ps_roi_align.
#include "../cuda/ps_roi_align_kernel.cu"
