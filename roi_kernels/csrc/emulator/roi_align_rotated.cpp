// The CUDA roi_align_rotated (cuda/roi_align_rotated_kernel.cu, unchanged) compiled by the host compiler: its kernel
// runs through the CPU executor on CPU tensors, as roi_kernels_emulated::roi_align_rotated.
#include "../cuda/roi_align_rotated_kernel.cu"
