// The CUDA roi_pool (cuda/roi_pool_kernel.cu, unchanged) compiled by the host compiler: its kernel
// runs through the CPU executor on CPU tensors, as roi_kernels_emulated::roi_pool.
#include "../cuda/roi_pool_kernel.cu"
