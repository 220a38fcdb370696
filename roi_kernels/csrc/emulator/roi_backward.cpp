// The CUDA backward kernels (cuda/roi_backward.cu, unchanged) compiled by the host compiler:
// they run through the CPU executor on CPU tensors, as roi_kernels_emulated::<op>_backward.
#include "../cuda/roi_backward.cu"
