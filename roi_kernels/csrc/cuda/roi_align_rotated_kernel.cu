// roi_align_rotated on CUDA: one thread per output element in a 64-bit grid-stride loop.
//
// Each thread visits only the samples of its bin that math::rotated_scan says can land on the
// map (the bound on the work of huge boxes, see roi_math.h), in row-then-column order, with
// math::for_each_rotated_sample, the loop the CPU kernel runs; the build disables fused multiply-adds,
// so the GPU rounds as the CPU does. The input is read in place with its own strides.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../roi_math.h"
#include "cuda_common.cuh"

namespace roi_kernels {
namespace {

struct MapDesc {
  int64_t num_images, channels, height, width;
  int64_t sN, sC, sH, sW;
};

template <typename scalar_t, typename acc_t>
__global__ void roi_align_rotated_kernel(
    int64_t total,
    const scalar_t* __restrict__ input,
    MapDesc map,
    const acc_t* __restrict__ rois,
    acc_t spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    scalar_t* __restrict__ out) {
  ROI_CUDA_KERNEL_LOOP(index, total) {
    const int64_t pw = index % pooled_width;
    const int64_t ph = (index / pooled_width) % pooled_height;
    const int64_t c = (index / (pooled_width * pooled_height)) % map.channels;
    const int64_t k = index / (pooled_width * pooled_height * map.channels);
    const acc_t* b = rois + k * 6;
    int64_t n = 0;
    if (!math::batch_index(b[0], map.num_images, n)) {
      out[index] = scalar_t(0);  // checked on the host; guarded here all the same
      continue;
    }
    const math::RotatedGeometry<acc_t> g = math::rotated_geometry<acc_t>(
        b[1], b[2], b[3], b[4], b[5], spatial_scale, aligned, pooled_height, pooled_width, sampling_ratio);
    const scalar_t* plane = input + n * map.sN + c * map.sC;
    acc_t sum = 0;
    math::for_each_rotated_sample(
        g, ph, pw, map.height, map.width, map.sH, map.sW, [&](const math::BilinearTaps<acc_t>& t) {
          sum += math::apply_taps<acc_t>(plane, t);
        });
    out[index] = static_cast<scalar_t>(math::average(sum, g.count));
  }
}

at::Tensor roi_align_rotated_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  checks::check_map(input, 4, "input");
  checks::check_rois(rois, input, 6, "rois");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_scale(spatial_scale);
  checks::check_sampling_ratio(sampling_ratio);
  TORCH_CHECK(input.is_cuda(), "the CUDA roi_align_rotated got input on ", input.device());
  c10::cuda::CUDAGuard guard(input.device());
  checks::check_batch_index(rois, input.size(0), "rois");
  const at::Tensor r = checks::rois_for_kernel(rois, input.scalar_type());
  at::Tensor out = at::empty({r.size(0), input.size(1), pooled_height, pooled_width}, input.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const MapDesc map{input.size(0), input.size(1), input.size(2), input.size(3),
                    input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_rotated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    roi_align_rotated_kernel<scalar_t, acc_t>
        <<<cuda::blocks_for(total), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            total,
            input.const_data_ptr<scalar_t>(),
            map,
            r.const_data_ptr<acc_t>(),
            static_cast<acc_t>(spatial_scale),
            pooled_height,
            pooled_width,
            sampling_ratio,
            aligned,
            out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_kernels, CUDA, m) {
  m.impl("roi_align_rotated", &roi_align_rotated_forward_kernel);
}

}  // namespace roi_kernels
