"""roi_pool against torchvision: equal, not merely close (it is a max of input values)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import edge_boxes, random_boxes

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
