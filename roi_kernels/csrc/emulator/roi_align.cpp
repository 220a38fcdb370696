// The CUDA roi_align (cuda/roi_align_kernel.cu, unchanged) compiled by the host compiler: its kernel
// runs through the CPU executor on CPU tensors, as roi_kernels_emulated::roi_align.
#include "../cuda/roi_align_kernel.cu"
