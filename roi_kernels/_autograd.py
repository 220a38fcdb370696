"""Gradients of the ``roi_kernels`` ops: ``torch.library.register_autograd`` for every forward op.

Each forward op ``roi_kernels::<op>`` has a backward op ``roi_kernels::<op>_backward``
(``csrc/schemas.h``; CPU kernels in ``csrc/cpu/*_backward.cpp``) that returns the gradient of
every input map; the boxes get none, as in torchvision. ``setup_context`` keeps only what the
backward reads: the boxes, the maps' sizes and layouts, and the maps themselves only where the
gradient depends on their values (roi_pool, and roi_align's max mode, which recompute the
forward's choice of maximum). The gradients have the layout of the inputs (channels_last for a
channels_last input, else contiguous) and their dtype.

The CPU backward is deterministic (the same bits on every run and thread count, see
``csrc/cpu/backward_common.h``). Double backward is not supported: differentiating a backward
op raises an error that names it.

Under ``torch.inference_mode()`` the autograd formulas are not consulted at all. Under
``torch.no_grad()``, or with inputs that do not require grad, the registration's autograd
kernel (Python) hands the call straight to the op's kernel, which costs some 10-30 us per call
(``benchmarks/bench_kernels.py --registration-cost``): inference paths should call the ops
under ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _build

_build.load()

_ops = torch.ops.roi_kernels
_lib = "roi_kernels::"


def channels_last(t: Tensor) -> bool:
    """Whether the gradient of ``t`` is laid out channels_last (the kernels' rule,
    ``prefers_channels_last`` in ``csrc/cpu/backward_common.h``): a 4-D map that is channels_last
    and not also contiguous, or a 3-D ``[C, H, W]`` map stored as ``[H, W, C]``."""
    if t.is_contiguous():
        return False
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 3 and t.size(0) > 1 and t.stride(0) == 1


def _flat_sizes(maps: Sequence[Tensor]) -> list:
    return [s for m in maps for s in m.shape]


def _empty_grad(grad: Tensor, size: Sequence, last: bool) -> Tensor:
    """An uninitialised gradient of a map of ``size`` in the layout the kernels give."""
    if len(size) == 4:
        fmt = torch.channels_last if last else torch.contiguous_format
        return torch.empty(list(size), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    if last:
        c, h, w = size
        return grad.new_empty((h, w, c)).permute(2, 0, 1)
    return grad.new_empty(list(size))


def _empty_grads(grad: Tensor, sizes: Sequence, layouts: Sequence[bool], dims: int) -> list[Tensor]:
    torch._check(len(sizes) == dims * len(layouts), lambda: f"sizes must hold {dims} sizes per map")
    return [_empty_grad(grad, sizes[i * dims : (i + 1) * dims], last) for i, last in enumerate(layouts)]


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations of the backward ops: the gradients' shapes, dtypes and layouts.
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake(_lib + "roi_align_backward")
def _roi_align_backward_fake(grad, rois, input, input_size, channels_last, *args):
    return _empty_grad(grad, input_size, channels_last)


@torch.library.register_fake(_lib + "roi_align_ragged_backward")
def _roi_align_ragged_backward_fake(grad, rois, features, sizes, channels_last, *args):
    return _empty_grads(grad, sizes, channels_last, 3)


@torch.library.register_fake(_lib + "multiscale_roi_align_backward")
def _multiscale_backward_fake(grad, rois, features, sizes, channels_last, *args):
    return _empty_grads(grad, sizes, channels_last, 4)


@torch.library.register_fake(_lib + "multiscale_roi_align_ragged_backward")
def _multiscale_ragged_backward_fake(grad, rois, features, sizes, channels_last, *args):
    return _empty_grads(grad, sizes, channels_last, 3)


@torch.library.register_fake(_lib + "roi_pool_backward")
def _roi_pool_backward_fake(grad, rois, input, spatial_scale, pooled_height, pooled_width):
    return _empty_grad(grad, input.shape, channels_last(input))


@torch.library.register_fake(_lib + "roi_pool_ragged_backward")
def _roi_pool_ragged_backward_fake(grad, rois, features, spatial_scale, pooled_height, pooled_width):
    return [_empty_grad(grad, f.shape, channels_last(f)) for f in features]


@torch.library.register_fake(_lib + "ps_roi_align_backward")
def _ps_roi_align_backward_fake(grad, rois, input_size, channels_last, *args):
    return _empty_grad(grad, input_size, channels_last)


@torch.library.register_fake(_lib + "ps_roi_align_ragged_backward")
def _ps_roi_align_ragged_backward_fake(grad, rois, sizes, channels_last, *args):
    return _empty_grads(grad, sizes, channels_last, 3)


@torch.library.register_fake(_lib + "ps_roi_pool_backward")
def _ps_roi_pool_backward_fake(grad, rois, input_size, channels_last, *args):
    return _empty_grad(grad, input_size, channels_last)


@torch.library.register_fake(_lib + "ps_roi_pool_ragged_backward")
def _ps_roi_pool_ragged_backward_fake(grad, rois, sizes, channels_last, *args):
    return _empty_grads(grad, sizes, channels_last, 3)


@torch.library.register_fake(_lib + "roi_align_rotated_backward")
def _roi_align_rotated_backward_fake(grad, rois, input_size, channels_last, *args):
    return _empty_grad(grad, input_size, channels_last)


@torch.library.register_fake(_lib + "roi_align_rotated_ragged_backward")
def _roi_align_rotated_ragged_backward_fake(grad, rois, sizes, channels_last, *args):
    return _empty_grads(grad, sizes, channels_last, 3)


# ---------------------------------------------------------------------------------------------
# The autograd formulas
# ---------------------------------------------------------------------------------------------


def _no_grads(n: int) -> tuple:
    return (None,) * n


# roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode)
def _roi_align_setup(ctx, inputs, output):
    input, rois, *args = inputs
    ctx.args = tuple(args)
    ctx.input_size = list(input.shape)
    ctx.channels_last = channels_last(input)
    ctx.save_for_backward(rois, input if args[-1] == "max" else None)


def _roi_align_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return _no_grads(8)
    rois, input = ctx.saved_tensors
    g = _ops.roi_align_backward(grad, rois, input, ctx.input_size, ctx.channels_last, *ctx.args)
    return (g, *_no_grads(7))


def _list_setup(ctx, inputs, needs_values: bool):
    """The ops whose first argument is a list of maps (ragged, multiscale)."""
    features, rois, *args = inputs
    ctx.args = tuple(args)
    ctx.sizes = _flat_sizes(features)
    ctx.layouts = [channels_last(f) for f in features]
    ctx.save_for_backward(rois, *(features if needs_values else ()))


def _roi_align_ragged_setup(ctx, inputs, output):
    _list_setup(ctx, inputs, inputs[-1] == "max")


def _multiscale_setup(ctx, inputs, output):
    _list_setup(ctx, inputs, inputs[7] == "max")


def _list_backward(op, nargs: int):
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return _no_grads(nargs)
        rois, *features = ctx.saved_tensors
        grads = op(grad, rois, features, ctx.sizes, ctx.layouts, *ctx.args)
        return (grads, *_no_grads(nargs - 1))

    return backward


# roi_pool(input, rois, spatial_scale, pooled_height, pooled_width): the input's values decide
# which cell of each bin receives the gradient.
def _roi_pool_setup(ctx, inputs, output):
    input, rois, *args = inputs
    ctx.args = tuple(args)
    ctx.save_for_backward(input, rois)


def _roi_pool_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return _no_grads(5)
    input, rois = ctx.saved_tensors
    return (_ops.roi_pool_backward(grad, rois, input, *ctx.args), *_no_grads(4))


def _roi_pool_ragged_setup(ctx, inputs, output):
    features, rois, *args = inputs
    ctx.args = tuple(args)
    ctx.save_for_backward(rois, *features)


def _roi_pool_ragged_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return _no_grads(5)
    rois, *features = ctx.saved_tensors
    return (_ops.roi_pool_ragged_backward(grad, rois, features, *ctx.args), *_no_grads(4))


# The sizes-only ops: ps_roi_align, ps_roi_pool, roi_align_rotated, one map or ragged.
def _sizes_setup(ctx, inputs, output):
    input, rois, *args = inputs
    ctx.args = tuple(args)
    ctx.save_for_backward(rois)
    if isinstance(input, Tensor):
        ctx.sizes, ctx.layouts = list(input.shape), channels_last(input)
    else:
        ctx.sizes, ctx.layouts = _flat_sizes(input), [channels_last(f) for f in input]


def _sizes_backward(op, nargs: int):
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return _no_grads(nargs)
        (rois,) = ctx.saved_tensors
        return (op(grad, rois, ctx.sizes, ctx.layouts, *ctx.args), *_no_grads(nargs - 1))

    return backward


_FORMULAS = {
    "roi_align": (_roi_align_backward, _roi_align_setup),
    "roi_align_ragged": (_list_backward(_ops.roi_align_ragged_backward, 8), _roi_align_ragged_setup),
    "multiscale_roi_align": (_list_backward(_ops.multiscale_roi_align_backward, 10), _multiscale_setup),
    "multiscale_roi_align_ragged": (
        _list_backward(_ops.multiscale_roi_align_ragged_backward, 10),
        _multiscale_setup,
    ),
    "roi_pool": (_roi_pool_backward, _roi_pool_setup),
    "roi_pool_ragged": (_roi_pool_ragged_backward, _roi_pool_ragged_setup),
    "ps_roi_align": (_sizes_backward(_ops.ps_roi_align_backward, 6), _sizes_setup),
    "ps_roi_align_ragged": (_sizes_backward(_ops.ps_roi_align_ragged_backward, 6), _sizes_setup),
    "ps_roi_pool": (_sizes_backward(_ops.ps_roi_pool_backward, 5), _sizes_setup),
    "ps_roi_pool_ragged": (_sizes_backward(_ops.ps_roi_pool_ragged_backward, 5), _sizes_setup),
    "roi_align_rotated": (_sizes_backward(_ops.roi_align_rotated_backward, 7), _sizes_setup),
    "roi_align_rotated_ragged": (_sizes_backward(_ops.roi_align_rotated_ragged_backward, 7), _sizes_setup),
}

BACKWARD_OPS = tuple(f"{name}_backward" for name in _FORMULAS)


def _double_backward_error(name: str):
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"roi_kernels::{name}: double backwards is not supported (the gradient of a gradient "
            "of this op is not implemented)"
        )

    return backward, setup_context


for _name, (_backward, _setup) in _FORMULAS.items():
    torch.library.register_autograd(_lib + _name, _backward, setup_context=_setup)
for _name in BACKWARD_OPS:
    _b, _s = _double_backward_error(_name)
    torch.library.register_autograd(_lib + _name, _b, setup_context=_s)
