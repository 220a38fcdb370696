"""roi_align (avg and max; single map and ragged) against torchvision and a float64 reference."""

from __future__ import annotations

import time

import pytest
import torch
import torchvision
from conftest import edge_boxes, random_boxes
from reference import roi_align_ref

import roi_kernels

F32 = dict(rtol=1e-5, atol=1e-6)


def make_input(gen, n=2, c=16, h=23, w=31, dtype=torch.float32, channels_last=False):
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("output_size", [(7, 7), (3, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torchvision_float32(seed, aligned, sampling_ratio, output_size, channels_last):
    gen = torch.Generator().manual_seed(seed)
    c = int(torch.randint(1, 140, (1,), generator=gen))
    x = make_input(gen, n=3, c=c, h=37, w=45, channels_last=channels_last)
    boxes = random_boxes(gen, 60, 37 * 16, 45 * 16, num_images=3, min_side=4)
    ours = roi_kernels.roi_align(x, boxes, output_size, 1 / 16, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(x, boxes, output_size, 1 / 16, sampling_ratio, aligned)
    assert ours.shape == (60, c, *output_size)
    assert ours.is_contiguous()
    torch.testing.assert_close(ours, ref, **F32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torchvision_float64(seed, aligned, sampling_ratio, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, c=33, dtype=torch.float64, channels_last=channels_last)
    boxes = random_boxes(gen, 40, 23 * 8, 31 * 8, num_images=2, min_side=2, dtype=torch.float64)
    ours = roi_kernels.roi_align(x, boxes, 5, 1 / 8, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(x, boxes, 5, 1 / 8, sampling_ratio, aligned)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampling_ratio", [16, 64, 1024])
@pytest.mark.parametrize("aligned", [False, True])
def test_large_sampling_ratios(seed, sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c=5, h=19, w=23)
    boxes = torch.cat([random_boxes(gen, 6, 19 * 8, 23 * 8, num_images=2, min_side=2), edge_boxes(152, 184, 2)[:5]])
    size = (2, 3) if sampling_ratio < 1024 else (1, 1)
    ours = roi_kernels.roi_align(x, boxes, size, 1 / 8, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(x, boxes, size, 1 / 8, sampling_ratio, aligned)
    torch.testing.assert_close(ours, ref, **F32)
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_types_accumulate_in_float32(seed, dtype, tol, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, c=70, dtype=dtype, channels_last=channels_last)
    boxes = random_boxes(gen, 50, 23 * 16, 31 * 16, num_images=2)
    ours = roi_kernels.roi_align(x, boxes, 7, 1 / 16, 2, True)
    assert ours.dtype == dtype
    # The same input values in float32: only the final rounding to `dtype` differs.
    ref = torchvision.ops.roi_align(x.float(), boxes, 7, 1 / 16, 2, True)
    torch.testing.assert_close(ours.float(), ref, rtol=tol, atol=tol)
    assert torch.equal(ours, ref.to(dtype)) or (ours.float() - ref).abs().max() <= tol


def test_boxes_as_list_equal_boxes_as_tensor(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=3)
    boxes = random_boxes(gen, 30, 300, 400, num_images=3)
    as_list = [boxes[boxes[:, 0] == i, 1:] for i in range(3)]
    as_tensor = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(as_list)])
    torch.testing.assert_close(
        roi_kernels.roi_align(x, as_list, 7, 1 / 16, 2, True),
        roi_kernels.roi_align(x, as_tensor, 7, 1 / 16, 2, True),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_boxes(seed, aligned, sampling_ratio, channels_last, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c=20, dtype=dtype, channels_last=channels_last)
    boxes = edge_boxes(23 * 16, 31 * 16, num_images=2, dtype=dtype)
    if sampling_ratio <= 0:
        # torchvision visits every sample: the 2e5-pixel box would cost it 10 s; 4000 pixels
        # still covers the map 8 times (test_non_finite_and_huge_boxes_are_defined_and_fast
        # takes the larger ones).
        boxes[:, 1:] = boxes[:, 1:].clamp(-2000, 2000)
    ours = roi_kernels.roi_align(x, boxes, 7, 1 / 16, sampling_ratio, aligned)
    assert torch.isfinite(ours).all()
    inverted = (boxes[:, 3] < boxes[:, 1]) | (boxes[:, 4] < boxes[:, 2])
    if aligned and sampling_ratio <= 0:
        # torchvision raises on inverted boxes here (a known defect); check those against the
        # float64 reference and the others against torchvision.
        keep = ~inverted
        ref = torchvision.ops.roi_align(x, boxes[keep], 7, 1 / 16, sampling_ratio, aligned)
        torch.testing.assert_close(ours[keep], ref, **F32)
        ref64 = roi_align_ref(x, boxes[inverted], (7, 7), 1 / 16, sampling_ratio, aligned)
        torch.testing.assert_close(ours[inverted].double(), ref64, rtol=1e-4, atol=1e-5)
        assert inverted.any()
    else:
        ref = torchvision.ops.roi_align(x, boxes, 7, 1 / 16, sampling_ratio, aligned)
        torch.testing.assert_close(ours, ref, **F32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pooling_matches_reference(seed, aligned, sampling_ratio, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c=19, channels_last=channels_last)
    edges = edge_boxes(368, 496, 2)
    # The reference materialises every sample: leave out the 2e5-pixel box (millions of samples).
    edges = edges[(edges[:, 3] - edges[:, 1]).abs() < 1e4]
    boxes = torch.cat([random_boxes(gen, 30, 23 * 16, 31 * 16, num_images=2, min_side=4), edges])
    ours = roi_kernels.roi_align(x, boxes, (4, 6), 1 / 16, sampling_ratio, aligned, pool_mode="max")
    ref = roi_align_ref(x, boxes, (4, 6), 1 / 16, sampling_ratio, aligned, "max")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)


def test_avg_matches_float64_reference(seed):
    """The reference itself agrees with torchvision (so its max-mode verdicts mean something)."""
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c=5)
    boxes = random_boxes(gen, 20, 23 * 16, 31 * 16, num_images=2, min_side=4)
    ref = roi_align_ref(x, boxes, (7, 7), 1 / 16, -1, True)
    torch.testing.assert_close(roi_kernels.roi_align(x, boxes, 7, 1 / 16, -1, True).double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ragged_input_equals_per_image_calls(seed, pool_mode, sampling_ratio, aligned, dtype, channels_last):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(int(torch.randint(5, 40, (1,), generator=gen)), int(torch.randint(5, 40, (1,), generator=gen))) for _ in range(5)]
    maps = [torch.randn(24, h, w, generator=gen).to(dtype) for h, w in sizes]
    if channels_last:
        maps = [m[None].to(memory_format=torch.channels_last)[0] for m in maps]
    boxes = random_boxes(gen, 80, 40 * 16, 40 * 16, num_images=5, min_side=4)
    boxes = torch.cat([boxes, edge_boxes(40 * 16, 40 * 16, num_images=5).clamp(-2000, 2000)])
    ours = roi_kernels.roi_align(maps, boxes, 7, 1 / 16, sampling_ratio, aligned, pool_mode=pool_mode)
    assert ours.shape == (90, 24, 7, 7) and ours.dtype == dtype
    for i, m in enumerate(maps):
        sel = boxes[:, 0] == i
        one = boxes[sel].clone()
        one[:, 0] = 0
        expected = roi_kernels.roi_align(m[None], one, 7, 1 / 16, sampling_ratio, aligned, pool_mode=pool_mode)
        torch.testing.assert_close(ours[sel], expected, rtol=0, atol=0)
        if pool_mode == "avg" and dtype != torch.float16 and not (aligned and sampling_ratio <= 0):
            tv = torchvision.ops.roi_align(m[None], one.to(dtype), 7, 1 / 16, sampling_ratio, aligned)
            torch.testing.assert_close(ours[sel], tv, **(F32 if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)))


def test_zero_boxes_give_empty_output():
    x = torch.randn(1, 8, 10, 10)
    out = roi_kernels.roi_align(x, torch.zeros(0, 5), (7, 3), 1.0)
    assert out.shape == (0, 8, 7, 3)
    assert roi_kernels.roi_align([x[0]], torch.zeros(0, 5), 2).shape == (0, 8, 2, 2)


def test_non_finite_and_huge_boxes_are_defined_and_fast(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=1, c=8, h=30, w=30)
    inf, nan = float("inf"), float("nan")
    boxes = torch.tensor(
        [
            [0, nan, 1, 5, 5],
            [0, 1, 1, nan, nan],
            [0, -inf, -inf, inf, inf],
            [0, 0, 0, inf, 4],
            [0, -1e30, -1e30, 1e30, 1e30],
            [0, -3e38, 0, 3e38, 30],
        ]
    )
    for aligned in (False, True):
        for sr in (-1, 2):
            for mode in ("avg", "max"):
                start = time.perf_counter()
                out = roi_kernels.roi_align(x, boxes, 7, 1.0, sr, aligned, mode)
                assert time.perf_counter() - start < 5.0
                # Documented result: samples at NaN / infinite coordinates are off the map,
                # so those bins are 0; finite huge boxes give finite values.
                assert torch.isfinite(out).all()
                assert (out[:3] == 0).all()


@pytest.mark.parametrize(
    "boxes,match",
    [
        (torch.tensor([[2.0, 0, 0, 4, 4]]), r"boxes\[:, 0\].*\[0, 2\)"),
        (torch.tensor([[-1.0, 0, 0, 4, 4]]), r"boxes\[:, 0\]"),
        (torch.tensor([[float("nan"), 0, 0, 4, 4]]), r"boxes\[:, 0\]"),
        (torch.zeros(3, 4), r"boxes must be Tensor\[K, 5\]"),
        (torch.zeros(3, 5, dtype=torch.int64), r"boxes must be a floating-point tensor"),
    ],
)
def test_bad_boxes_raise_naming_boxes(boxes, match):
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match=match):
        roi_kernels.roi_align(x, boxes, 2)


def test_bad_arguments_raise_naming_the_argument():
    x = torch.randn(2, 4, 8, 8)
    boxes = torch.tensor([[0.0, 0, 0, 4, 4]])
    with pytest.raises(ValueError, match="output_size"):
        roi_kernels.roi_align(x, boxes, (0, 3))
    with pytest.raises(RuntimeError, match="output_size"):
        torch.ops.roi_kernels.roi_align(x, boxes, 1.0, 2, -1, -1, False, "avg")
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="spatial_scale"):
            roi_kernels.roi_align(x, boxes, 2, spatial_scale=scale)
    with pytest.raises(ValueError, match="pool_mode"):
        roi_kernels.roi_align(x, boxes, 2, pool_mode="sum")
    with pytest.raises(RuntimeError, match="pool_mode"):
        torch.ops.roi_kernels.roi_align(x, boxes, 1.0, 2, 2, -1, False, "median")
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        roi_kernels.roi_align(x[0], boxes, 2)
    with pytest.raises(RuntimeError, match="input must be float32"):
        roi_kernels.roi_align(x.to(torch.int32), boxes, 2)
    with pytest.raises(RuntimeError, match="sampling_ratio"):
        roi_kernels.roi_align(x, boxes, 2, sampling_ratio=100000)
    with pytest.raises(ValueError, match=r"boxes\[1\] must be Tensor\[L, 4\]"):
        roi_kernels.roi_align(x, [torch.zeros(1, 4), torch.zeros(1, 5)], 2)


def test_ragged_bad_arguments():
    maps = [torch.randn(4, 8, 8), torch.randn(5, 9, 9)]
    boxes = torch.tensor([[1.0, 0, 0, 4, 4]])
    with pytest.raises(RuntimeError, match=r"input\[1\] must have the channels of input\[0\]"):
        roi_kernels.roi_align(maps, boxes, 2)
    with pytest.raises(RuntimeError, match=r"input\[1\] must have the dtype"):
        roi_kernels.roi_align([maps[0], maps[0].double()], boxes, 2)
    with pytest.raises(RuntimeError, match=r"boxes\[:, 0\].*\[0, 1\)"):
        roi_kernels.roi_align([maps[0]], boxes, 2)
    with pytest.raises(RuntimeError, match=r"input\[0\] must be a 3-D tensor"):
        roi_kernels.roi_align([maps[0][None]], boxes, 2)


def test_module_wrapper_equals_function(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen)
    boxes = random_boxes(gen, 10, 300, 400, num_images=2)
    module = roi_kernels.RoIAlign((5, 5), 1 / 16, 2, aligned=True, pool_mode="max")
    assert "pool_mode='max'" in repr(module)
    torch.testing.assert_close(module(x, boxes), roi_kernels.roi_align(x, boxes, 5, 1 / 16, 2, True, "max"))


@pytest.mark.slow
def test_offsets_beyond_2_31_elements():
    """A map of more than 2^31 elements: a box at its far corner reads the right values."""
    h = w = 16385
    c = 8  # 8 * 16385^2 = 2.15e9 elements > 2^31 (4.3 GB as float16)
    try:
        x = torch.empty(1, c, h, w, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("not enough memory for a 4.3 GB map")
    patch = torch.randn(c, 12, 12).to(torch.float16)
    x[0, :, h - 12 :, w - 12 :] = patch
    box = torch.tensor([[0.0, w - 10.0, h - 10.0, w - 2.0, h - 2.0]])
    ours = roi_kernels.roi_align(x, box, 4, 1.0, 2, True)
    local = patch[None].float()
    shifted = box.clone()
    shifted[0, 1:] -= torch.tensor([w - 12.0, h - 12.0, w - 12.0, h - 12.0])
    expected = torchvision.ops.roi_align(local, shifted, 4, 1.0, 2, True)
    torch.testing.assert_close(ours.float(), expected, rtol=2e-3, atol=2e-3)
