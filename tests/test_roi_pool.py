"""roi_pool against torchvision: equal, not merely close (it is a max of input values)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import (
    RAGGED_DTYPES,
    RAGGED_LAYOUTS,
    assert_same_bits,
    edge_boxes,
    in_layout,
    per_image,
    ragged_maps,
    random_boxes,
    random_sizes,
)

import roi_kernels


@pytest.mark.parametrize("output_size", [(7, 7), (2, 5), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torchvision(seed, output_size, channels_last, dtype):
    gen = torch.Generator().manual_seed(seed)
    c = int(torch.randint(1, 130, (1,), generator=gen))
    x = torch.randn(3, c, 29, 41, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    boxes = torch.cat([random_boxes(gen, 70, 29 * 16, 41 * 16, num_images=3, min_side=4), edge_boxes(464, 656, 3)])
    boxes = boxes.to(dtype)
    ours = roi_kernels.roi_pool(x, boxes, output_size, 1 / 16)
    ref = torchvision.ops.roi_pool(x, boxes, output_size, 1 / 16)
    assert ours.dtype == dtype and ours.is_contiguous()
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_types_equal_float32_max(seed, dtype, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 70, 20, 30, generator=gen).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    boxes = torch.cat([random_boxes(gen, 40, 320, 480, num_images=2, min_side=4), edge_boxes(320, 480, 2)])
    ours = roi_kernels.roi_pool(x, boxes, 7, 1 / 16)
    # A max picks an input value: exact in the input's dtype.
    assert torch.equal(ours, torchvision.ops.roi_pool(x.float(), boxes, 7, 1 / 16).to(dtype))


def test_list_boxes_and_module(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 20, 30, generator=gen)
    boxes = [random_boxes(gen, n, 320, 480)[:, 1:] for n in (5, 0)]
    ours = roi_kernels.RoIPool(3, 1 / 16)(x, boxes)
    assert torch.equal(ours, torchvision.ops.roi_pool(x, boxes, 3, 1 / 16))


def test_nan_boxes_pool_to_zero_and_nan_cells_never_win():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    x[0, 0, 0, 0] = float("nan")
    boxes = torch.tensor([[0.0, float("nan"), 0, 3, 3], [0, 0, 0, 2, 2], [1, -1e30, -1e30, 1e30, 1e30]])
    out = roi_kernels.roi_pool(x, boxes, 2, 1.0)
    assert (out[0] == 0).all()
    assert torch.equal(out[1], torchvision.ops.roi_pool(x, boxes[1:2], 2, 1.0)[0])
    assert torch.isfinite(out).all()


def test_errors_name_the_argument():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match=r"boxes\[:, 0\]"):
        roi_kernels.roi_pool(x, torch.tensor([[1.0, 0, 0, 2, 2]]), 2)
    with pytest.raises(RuntimeError, match="spatial_scale"):
        roi_kernels.roi_pool(x, torch.tensor([[0.0, 0, 0, 2, 2]]), 2, spatial_scale=0.0)
    with pytest.raises(RuntimeError, match=r"boxes must be Tensor\[K, 5\]"):
        roi_kernels.roi_pool(x, torch.zeros(2, 6), 2)
    assert roi_kernels.roi_pool(x, torch.zeros(0, 5), (3, 2)).shape == (0, 4, 3, 2)


# ---------------------------------------------------------------------------------------------
# The ragged form (per-image maps): bit for bit the single-map op on the same images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", RAGGED_LAYOUTS)
@pytest.mark.parametrize("dtype", RAGGED_DTYPES)
def test_ragged_equals_the_single_map_op(seed, dtype, kind):
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype)
    box_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    c = int(torch.randint(1, 70, (1,), generator=gen))
    ops = torch.ops.roi_kernels
    # One map's images as views (what the server passes for a dense request).
    x = in_layout(torch.randn(3, c, 17, 23, generator=gen, dtype=torch.float64).to(dtype), kind)
    boxes = torch.cat([random_boxes(gen, 40, 17 * 16, 23 * 16, num_images=3, min_side=4), edge_boxes(272, 368, 3)])
    boxes = boxes.to(box_dtype)
    args = (1 / 16, 5, 4)
    assert_same_bits(ops.roi_pool_ragged(list(x.unbind(0)), boxes, *args), ops.roi_pool(x, boxes, *args))
    # Images of different sizes: each image's boxes as the single-map op pools them on it alone.
    sizes = random_sizes(gen, 5, 1, 30)
    maps = ragged_maps(gen, sizes, c, dtype, kind)
    boxes = torch.cat([random_boxes(gen, 60, 30 * 16, 30 * 16, num_images=5, min_side=2), edge_boxes(480, 480, 5)])
    boxes = boxes.to(box_dtype)
    got = ops.roi_pool_ragged(maps, boxes, *args)
    assert got.is_contiguous()
    assert_same_bits(got, per_image(ops.roi_pool, maps, boxes, *args))
    assert_same_bits(roi_kernels.roi_pool(maps, boxes, (5, 4), 1 / 16), got)
    assert ops.roi_pool_ragged(maps, boxes[:0], *args).shape == (0, c, 5, 4)


def test_ragged_errors_name_the_argument():
    maps = [torch.randn(4, 8, 8), torch.randn(4, 6, 5)]
    box = torch.tensor([[1.0, 0, 0, 2, 2]])
    with pytest.raises(RuntimeError, match=r"input\[1\] must have the channels of input\[0\] \(4\), got 3"):
        roi_kernels.roi_pool([maps[0], torch.randn(3, 5, 5)], box, 2)
    with pytest.raises(RuntimeError, match=r"input\[1\] must be a 3-D tensor"):
        roi_kernels.roi_pool([maps[0], maps[1][None]], box, 2)
    with pytest.raises(RuntimeError, match=r"input\[1\] must have the dtype of the first map"):
        roi_kernels.roi_pool([maps[0], maps[1].double()], box, 2)
    with pytest.raises(RuntimeError, match=r"boxes\[:, 0\] \(the image index\) must be in \[0, 2\)"):
        roi_kernels.roi_pool(maps, torch.tensor([[2.0, 0, 0, 2, 2]]), 2)
    with pytest.raises(RuntimeError, match="input must hold at least one"):
        torch.ops.roi_kernels.roi_pool_ragged([], box, 1.0, 2, 2)
    with pytest.raises(TypeError, match="input must be Tensor"):
        roi_kernels.roi_pool("maps", box, 2)
