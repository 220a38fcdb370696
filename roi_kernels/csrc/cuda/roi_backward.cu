// The backward ops on CUDA, the host side: argument checks (as on the CPU), the results and
// accumulation buffers, the plane and map tables, and the launch of the atomic or (under
// torch.use_deterministic_algorithms(True)) the deterministic kernel of roi_backward_kernel.cuh.
// Compiled by nvcc for the GPU and by the host compiler into the cuda-emulated test build
// (host.h, device.cuh).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../checks.h"
#include "../cpu/backward_common.h"
#include "../map_set.h"
#include "host.h"
#include "roi_backward_kernel.cuh"

namespace roi_kernels {
namespace {

using cpu::backward::Setup;
using cuda::backward::Op;

// The deterministic kernel's box lists: the boxes of each plane in their order. Computed on the
// host from the boxes (one copy to the host: the deterministic variant trades that sync for its
// exact order).
void bucket_on_host(
    const MapSet& s,
    const at::Tensor& rois_acc,
    const std::vector<cuda::backward::MapDesc>& maps,
    int64_t num_planes,
    std::vector<int64_t>& order,
    std::vector<int64_t>& begin) {
  const at::Tensor r = rois_acc.to(at::kDouble).cpu().contiguous();
  const int64_t cols = r.size(1);
  const double* d = r.const_data_ptr<double>();
  const math::MapSelection sel = s.selection();
  std::vector<int64_t> plane_of(r.size(0), -1);
  for (int64_t k = 0; k < r.size(0); ++k) {
    // The selection in the boxes' accumulation dtype, as the kernels make it.
    int64_t map = 0, image = 0;
    bool ok = false;
    if (rois_acc.scalar_type() == at::kFloat) {
      float f[6];
      for (int64_t j = 0; j < cols; ++j) {
        f[j] = static_cast<float>(d[k * cols + j]);
      }
      ok = math::select_map(sel, f, map, image);
    } else {
      ok = math::select_map(sel, d + k * cols, map, image);
    }
    if (ok) {
      plane_of[k] = maps[map].plane_base + image;
    }
  }
  const cpu::backward::Buckets b = cpu::backward::bucket_boxes(plane_of, num_planes);
  order = b.boxes;
  begin = b.begin;
}

template <Op op>
std::vector<at::Tensor> run(
    Setup& st,
    const at::Tensor& grad,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    int64_t channels_out,
    const char* name) {
  TORCH_CHECK(cuda::on_device(grad), "the ", cuda::kDeviceName, " ", name, " got grad on ", grad.device());
  const int64_t cols = op == Op::kRotated ? 6 : 5;
  checks::check_rois(rois, grad, cols, op == Op::kRotated ? "rois" : "boxes");
  checks::check_output_size(pooled_height, pooled_width);
  checks::check_sampling_ratio(sampling_ratio);
  for (double scale : st.set.scales) {
    checks::check_scale(scale);
  }
  cpu::backward::check_grad(grad, rois.size(0), channels_out, pooled_height, pooled_width, name);
  for (const at::Tensor& in : st.inputs) {
    TORCH_CHECK(
        cuda::on_device(in) && in.scalar_type() == grad.scalar_type(),
        name,
        ": the input maps must be on grad's device, of its dtype");
  }
  cuda::DeviceGuard guard(grad.device());
  checks::check_batch_index(rois, st.set.num_images, op == Op::kRotated ? "rois" : "boxes");
  st.set.rois = checks::rois_for_kernel(rois, grad.scalar_type());
  const at::ScalarType acc = checks::acc_dtype(grad.scalar_type());
  // Accumulation buffers in the results' layouts: the results themselves where the dtype is
  // the accumulation dtype, else float32 buffers converted at the end.
  std::vector<at::Tensor> buffers;
  for (at::Tensor& g : st.grads) {
    buffers.push_back(g.scalar_type() == acc ? g.zero_() : at::zeros_like(g, g.options().dtype(acc)));
  }
  std::vector<cuda::backward::PlaneDesc> planes;
  std::vector<cuda::backward::MapDesc> maps;
  for (size_t m = 0; m < buffers.size(); ++m) {
    const at::Tensor& b = buffers[m];
    maps.push_back(cuda::backward::MapDesc{st.set.scales[m], static_cast<int64_t>(planes.size())});
    for (int64_t n = 0; n < b.size(0); ++n) {
      cuda::backward::PlaneDesc p{};
      p.grad = static_cast<char*>(b.data_ptr()) + n * b.stride(0) * b.element_size();
      p.height = b.size(2);
      p.width = b.size(3);
      p.grad_sc = b.stride(1);
      p.grad_sh = b.stride(2);
      p.grad_sw = b.stride(3);
      p.map = static_cast<int64_t>(m);
      if (!st.inputs.empty()) {
        const at::Tensor& in = st.inputs[m];
        p.input = static_cast<const char*>(in.const_data_ptr()) + n * in.stride(0) * in.element_size();
        p.in_sc = in.stride(1);
        p.in_sh = in.stride(2);
        p.in_sw = in.stride(3);
      }
      planes.push_back(p);
    }
  }
  const int64_t num_planes = static_cast<int64_t>(planes.size());
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  if (rois.size(0) > 0 && num_planes > 0 && st.set.channels > 0) {
    const c10::Device device = grad.device();
    const at::Tensor plane_table =
        cuda::device_copy(planes.data(), num_planes * static_cast<int64_t>(sizeof(planes[0])), device);
    const at::Tensor map_table =
        cuda::device_copy(maps.data(), static_cast<int64_t>(maps.size() * sizeof(maps[0])), device);
    at::Tensor order_table, begin_table;
    std::vector<int64_t> order, begin;
    if (deterministic) {
      bucket_on_host(st.set, st.set.rois, maps, num_planes, order, begin);
      order.push_back(0);  // never empty
      order_table = cuda::device_copy(order.data(), static_cast<int64_t>(order.size() * sizeof(int64_t)), device);
      begin_table = cuda::device_copy(begin.data(), static_cast<int64_t>(begin.size() * sizeof(int64_t)), device);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_kernels_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      cuda::backward::Args<acc_t> a{};
      a.rois = st.set.rois.const_data_ptr<acc_t>();
      a.roi_cols = cols;
      a.grad = grad.const_data_ptr<scalar_t>();
      a.gs0 = grad.stride(0);
      a.gs1 = grad.stride(1);
      a.gs2 = grad.stride(2);
      a.gs3 = grad.stride(3);
      a.num_boxes = rois.size(0);
      a.channels = st.set.channels;
      a.channels_out = channels_out;
      a.pooled_height = pooled_height;
      a.pooled_width = pooled_width;
      a.sampling_ratio = sampling_ratio;
      a.aligned = aligned;
      a.selection = st.set.selection();
      a.planes = static_cast<const cuda::backward::PlaneDesc*>(plane_table.const_data_ptr());
      a.maps = static_cast<const cuda::backward::MapDesc*>(map_table.const_data_ptr());
      a.num_planes = num_planes;
      a.order = deterministic ? static_cast<const int64_t*>(order_table.const_data_ptr()) : nullptr;
      a.plane_begin = deterministic ? static_cast<const int64_t*>(begin_table.const_data_ptr()) : nullptr;
      cuda::backward::launch_backward<op, scalar_t, acc_t>(a, deterministic);
    });
  }
  for (size_t m = 0; m < buffers.size(); ++m) {
    if (buffers[m].scalar_type() != st.grads[m].scalar_type()) {
      st.grads[m].copy_(buffers[m]);
    }
  }
  return st.results;
}

// The sizes of one map or of a list of per-image maps, as the sizes-only ops take them.
void setup_single(Setup& st, const at::Tensor& grad, at::IntArrayRef input_size, bool channels_last, double scale) {
  TORCH_CHECK(input_size.size() == 4, "input_size must be [N, C, H, W], got ", input_size);
  cpu::backward::allocate(st, grad, input_size, {channels_last}, 4, {});
  st.set.scales = {scale};
  st.set.select = MapSelect::kSingle;
  st.set.num_images = input_size[0];
}

void setup_ragged(Setup& st, const at::Tensor& grad, at::IntArrayRef sizes, const c10::List<bool>& layouts, double scale) {
  cpu::backward::allocate(st, grad, sizes, cpu::backward::flags_of(layouts), 3, {});
  st.set.scales.assign(st.grads.size(), scale);
  st.set.select = MapSelect::kRagged;
  st.set.num_images = static_cast<int64_t>(st.grads.size());
}

Op align_op(c10::string_view pool_mode) {
  return checks::parse_pool_mode(pool_mode) == checks::PoolMode::kMax ? Op::kAlignMax : Op::kAlignAvg;
}

std::vector<at::Tensor> run_align(
    Setup& st,
    const at::Tensor& grad,
    const at::Tensor& rois,
    int64_t ph,
    int64_t pw,
    int64_t sr,
    bool aligned,
    c10::string_view pool_mode,
    const char* name) {
  if (align_op(pool_mode) == Op::kAlignMax) {
    TORCH_CHECK(
        st.inputs.size() == st.grads.size(),
        name,
        ": max pooling needs the forward's input maps (",
        st.grads.size(),
        "), got ",
        st.inputs.size());
    return run<Op::kAlignMax>(st, grad, rois, ph, pw, sr, aligned, st.set.channels, name);
  }
  st.inputs.clear();
  return run<Op::kAlignAvg>(st, grad, rois, ph, pw, sr, aligned, st.set.channels, name);
}

at::Tensor roi_align_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const std::optional<at::Tensor>& input,
    at::IntArrayRef input_size,
    bool channels_last,
    double spatial_scale,
    int64_t ph,
    int64_t pw,
    int64_t sr,
    bool aligned,
    c10::string_view pool_mode) {
  Setup st;
  setup_single(st, grad, input_size, channels_last, spatial_scale);
  if (input.has_value() && input->defined()) {
    st.inputs.push_back(*input);
  }
  return run_align(st, grad, rois, ph, pw, sr, aligned, pool_mode, "roi_align_backward")[0];
}

std::vector<at::Tensor> roi_align_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::TensorList features,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    double spatial_scale,
    int64_t ph,
    int64_t pw,
    int64_t sr,
    bool aligned,
    c10::string_view pool_mode) {
  Setup st;
  setup_ragged(st, grad, sizes, channels_last, spatial_scale);
  for (const at::Tensor& f : features) {
    st.inputs.push_back(f.unsqueeze(0));
  }
  return run_align(st, grad, rois, ph, pw, sr, aligned, pool_mode, "roi_align_ragged_backward");
}

std::vector<at::Tensor> multiscale_backward(
    bool ragged,
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::TensorList features,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    at::ArrayRef<double> spatial_scales,
    int64_t ph,
    int64_t pw,
    int64_t sr,
    bool aligned,
    c10::string_view pool_mode,
    int64_t canonical_scale,
    int64_t canonical_level,
    const char* name) {
  const int64_t levels = static_cast<int64_t>(spatial_scales.size());
  const int64_t maps = static_cast<int64_t>(channels_last.size());
  TORCH_CHECK(
      levels > 0 && maps > 0 && (ragged ? maps % levels == 0 : maps == levels),
      name,
      ": spatial_scales must give one scale per level (",
      levels,
      ") for ",
      maps,
      " maps");
  Setup st;
  cpu::backward::allocate(st, grad, sizes, cpu::backward::flags_of(channels_last), ragged ? 3 : 4, features);
  set_levels(st.set, spatial_scales, canonical_scale, canonical_level);
  if (ragged) {
    const int64_t images = maps / levels;
    for (int64_t i = 0; i < maps; ++i) {
      st.set.scales.push_back(spatial_scales[i / images]);
    }
    st.set.select = levels == 1 ? MapSelect::kRagged : MapSelect::kRaggedLevels;
    st.set.num_images = images;
  } else {
    for (const at::Tensor& g : st.grads) {
      TORCH_CHECK(g.size(0) == st.grads[0].size(0), name, ": every level must have the batch size of the first");
    }
    st.set.scales = spatial_scales.vec();
    st.set.select = levels == 1 ? MapSelect::kSingle : MapSelect::kLevels;
    st.set.num_images = st.grads[0].size(0);
  }
  return run_align(st, grad, rois, ph, pw, sr, aligned, pool_mode, name);
}

std::vector<at::Tensor> multiscale_roi_align_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::TensorList features,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    at::ArrayRef<double> spatial_scales,
    int64_t ph,
    int64_t pw,
    int64_t sr,
    bool aligned,
    c10::string_view pool_mode,
    int64_t canonical_scale,
    int64_t canonical_level) {
  return multiscale_backward(
      false, grad, rois, features, sizes, channels_last, spatial_scales, ph, pw, sr, aligned, pool_mode,
      canonical_scale, canonical_level, "multiscale_roi_align_backward");
}

std::vector<at::Tensor> multiscale_roi_align_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::TensorList features,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    at::ArrayRef<double> spatial_scales,
    int64_t ph,
    int64_t pw,
    int64_t sr,
    bool aligned,
    c10::string_view pool_mode,
    int64_t canonical_scale,
    int64_t canonical_level) {
  return multiscale_backward(
      true, grad, rois, features, sizes, channels_last, spatial_scales, ph, pw, sr, aligned, pool_mode,
      canonical_scale, canonical_level, "multiscale_roi_align_ragged_backward");
}

at::Tensor roi_pool_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& input,
    double spatial_scale,
    int64_t ph,
    int64_t pw) {
  checks::check_map(input, 4, "input");
  Setup st;
  setup_single(st, grad, input.sizes(), cpu::backward::prefers_channels_last(input), spatial_scale);
  st.inputs.push_back(input);
  return run<Op::kPool>(st, grad, rois, ph, pw, 1, false, st.set.channels, "roi_pool_backward")[0];
}

std::vector<at::Tensor> roi_pool_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::TensorList features,
    double spatial_scale,
    int64_t ph,
    int64_t pw) {
  ragged_maps(features);  // checks the list
  std::vector<int64_t> sizes;
  c10::List<bool> layouts;
  for (const at::Tensor& f : features) {
    sizes.insert(sizes.end(), f.sizes().begin(), f.sizes().end());
    layouts.push_back(cpu::backward::prefers_channels_last(f));
  }
  Setup st;
  setup_ragged(st, grad, sizes, layouts, spatial_scale);
  for (const at::Tensor& f : features) {
    st.inputs.push_back(f.unsqueeze(0));
  }
  return run<Op::kPool>(st, grad, rois, ph, pw, 1, false, st.set.channels, "roi_pool_ragged_backward");
}

template <Op op>
std::vector<at::Tensor> run_ps(Setup& st, const at::Tensor& grad, const at::Tensor& rois, int64_t ph, int64_t pw, int64_t sr, const char* name) {
  const int64_t bins = ph * pw;
  TORCH_CHECK(
      bins > 0 && st.set.channels % bins == 0,
      name,
      ": the input has ",
      st.set.channels,
      " channels, which is not a multiple of output_size[0] * output_size[1] = ",
      ph,
      " * ",
      pw);
  return run<op>(st, grad, rois, ph, pw, sr, false, st.set.channels / bins, name);
}

at::Tensor ps_roi_align_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef input_size,
    bool channels_last,
    double spatial_scale,
    int64_t ph,
    int64_t pw,
    int64_t sr) {
  Setup st;
  setup_single(st, grad, input_size, channels_last, spatial_scale);
  return run_ps<Op::kPsAlign>(st, grad, rois, ph, pw, sr, "ps_roi_align_backward")[0];
}

std::vector<at::Tensor> ps_roi_align_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    double spatial_scale,
    int64_t ph,
    int64_t pw,
    int64_t sr) {
  Setup st;
  setup_ragged(st, grad, sizes, channels_last, spatial_scale);
  return run_ps<Op::kPsAlign>(st, grad, rois, ph, pw, sr, "ps_roi_align_ragged_backward");
}

at::Tensor ps_roi_pool_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef input_size,
    bool channels_last,
    double spatial_scale,
    int64_t ph,
    int64_t pw) {
  Setup st;
  setup_single(st, grad, input_size, channels_last, spatial_scale);
  return run_ps<Op::kPsPool>(st, grad, rois, ph, pw, 1, "ps_roi_pool_backward")[0];
}

std::vector<at::Tensor> ps_roi_pool_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    double spatial_scale,
    int64_t ph,
    int64_t pw) {
  Setup st;
  setup_ragged(st, grad, sizes, channels_last, spatial_scale);
  return run_ps<Op::kPsPool>(st, grad, rois, ph, pw, 1, "ps_roi_pool_ragged_backward");
}

at::Tensor roi_align_rotated_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef input_size,
    bool channels_last,
    double spatial_scale,
    int64_t ph,
    int64_t pw,
    int64_t sr,
    bool aligned) {
  Setup st;
  setup_single(st, grad, input_size, channels_last, spatial_scale);
  return run<Op::kRotated>(st, grad, rois, ph, pw, sr, aligned, st.set.channels, "roi_align_rotated_backward")[0];
}

std::vector<at::Tensor> roi_align_rotated_ragged_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::IntArrayRef sizes,
    const c10::List<bool>& channels_last,
    double spatial_scale,
    int64_t ph,
    int64_t pw,
    int64_t sr,
    bool aligned) {
  Setup st;
  setup_ragged(st, grad, sizes, channels_last, spatial_scale);
  return run<Op::kRotated>(
      st, grad, rois, ph, pw, sr, aligned, st.set.channels, "roi_align_rotated_ragged_backward");
}

}  // namespace

ROI_KERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("roi_align_backward", &roi_align_backward_kernel);
  m.impl("roi_align_ragged_backward", &roi_align_ragged_backward_kernel);
  m.impl("multiscale_roi_align_backward", &multiscale_roi_align_backward_kernel);
  m.impl("multiscale_roi_align_ragged_backward", &multiscale_roi_align_ragged_backward_kernel);
  m.impl("roi_pool_backward", &roi_pool_backward_kernel);
  m.impl("roi_pool_ragged_backward", &roi_pool_ragged_backward_kernel);
  m.impl("ps_roi_align_backward", &ps_roi_align_backward_kernel);
  m.impl("ps_roi_align_ragged_backward", &ps_roi_align_ragged_backward_kernel);
  m.impl("ps_roi_pool_backward", &ps_roi_pool_backward_kernel);
  m.impl("ps_roi_pool_ragged_backward", &ps_roi_pool_ragged_backward_kernel);
  m.impl("roi_align_rotated_backward", &roi_align_rotated_backward_kernel);
  m.impl("roi_align_rotated_ragged_backward", &roi_align_rotated_ragged_backward_kernel);
}

}  // namespace roi_kernels
