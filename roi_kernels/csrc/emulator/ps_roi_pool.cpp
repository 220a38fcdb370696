// The CUDA ps_roi_pool (cuda/ps_roi_pool_kernel.cu, unchanged) compiled by the host compiler: its kernel
// runs through the CPU executor on CPU tensors, as roi_kernels_emulated::ps_roi_pool.
#include "../cuda/ps_roi_pool_kernel.cu"
