"""Multi-scale (FPN) roi_align against torchvision's MultiScaleRoIAlign."""

from __future__ import annotations

import numpy as np
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
    random_boxes,
)
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper

import roi_kernels

F32 = dict(rtol=1e-5, atol=1e-6)


def fpn_maps(gen, image_sizes, channels=16, levels=(2, 3, 4, 5), dtype=torch.float32):
    """Maps P_k for a batch padded to the largest image (as a detector's backbone sees it)."""
    h = max(s[0] for s in image_sizes)
    w = max(s[1] for s in image_sizes)
    n = len(image_sizes)
    return [
        torch.randn(n, channels, -(-h // 2**k), -(-w // 2**k), generator=gen, dtype=torch.float64).to(dtype)
        for k in levels
    ]


def sane_edge_boxes(h, w, sampling_ratio):
    """conftest's edge boxes (outside the map, zero-area, inverted, huge, ...) as list[Tensor[L, 4]],
    the huge one shrunk for adaptive sampling (torchvision samples every point of it)."""
    e = edge_boxes(h, w)[:, 1:]
    if sampling_ratio <= 0:
        e = e.clamp(-2000, 2000)
    return e


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("levels", [(2, 3, 4, 5), (3, 4), (4,)])
@pytest.mark.parametrize("output_size", [7, (14, 14)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torchvision(seed, sampling_ratio, levels, output_size, channels_last):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(320, 448), (288, 416)]
    maps = fpn_maps(gen, sizes, levels=levels)
    if channels_last:
        maps = [m.to(memory_format=torch.channels_last) for m in maps]
    boxes = [random_boxes(gen, 60, h, w, min_side=8, max_side=600)[:, 1:] for h, w in sizes]
    boxes[1] = torch.cat([boxes[1], sane_edge_boxes(288, 416, sampling_ratio)])
    names = [f"p{k}" for k in levels]
    tv = MultiScaleRoIAlign(names, output_size, sampling_ratio)
    ref = tv(dict(zip(names, maps)), boxes, sizes)
    ours = roi_kernels.multiscale_roi_align(maps, boxes, sizes, output_size, sampling_ratio)
    assert ours.is_contiguous()
    torch.testing.assert_close(ours, ref, **F32)
    module = roi_kernels.MultiScaleRoIAlign(names, output_size, sampling_ratio)
    torch.testing.assert_close(module(dict(zip(names, maps)), boxes, sizes), ours, rtol=0, atol=0)


@pytest.mark.parametrize("sampling_ratio", [16, 64])
def test_large_sampling_ratios(seed, sampling_ratio):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(256, 320)]
    maps = fpn_maps(gen, sizes, channels=3)
    boxes = [random_boxes(gen, 12, 256, 320, min_side=8, max_side=400)[:, 1:]]
    names = ["p2", "p3", "p4", "p5"]
    ref = MultiScaleRoIAlign(names, (2, 3), sampling_ratio)(dict(zip(names, maps)), boxes, sizes)
    ours = roi_kernels.multiscale_roi_align(maps, boxes, sizes, (2, 3), sampling_ratio)
    torch.testing.assert_close(ours, ref, **F32)


def test_boxes_of_negative_area_have_no_level(seed):
    """A box inverted along one axis has a negative area: torchvision's LevelMapper gives it a
    NaN level that matches no map, so MultiScaleRoIAlign returns zeros for it; so do we. (Inverted
    along both axes, the area is positive and the box is pooled on its level.)"""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(256, 256)]
    maps = fpn_maps(gen, sizes, channels=4)
    boxes = torch.tensor([[60.0, 50, 20, 90], [60, 50, 100, 10], [60, 50, 20, 10], [10, 12, 10, 12]])
    names = ["p2", "p3", "p4", "p5"]
    ref = MultiScaleRoIAlign(names, 3, 2)(dict(zip(names, maps)), [boxes], sizes)
    ours = roi_kernels.multiscale_roi_align(maps, [boxes], sizes, 3, 2)
    torch.testing.assert_close(ours, ref, **F32)
    assert (ours[:2] == 0).all() and (ours[2:] != 0).any()


def test_aligned_and_max_follow_the_level_rule(seed):
    """aligned=True and pool_mode="max" (which MultiScaleRoIAlign lacks): each box equals
    roi_align on the level torchvision's LevelMapper gives it."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(400, 544)]
    maps = fpn_maps(gen, sizes, channels=8)
    rois = random_boxes(gen, 120, 400, 544, min_side=8, max_side=800)
    # Clipped random boxes rarely reach P5 (sqrt(area) >= 448): one box per level for sure.
    rois[:4, 1:] = torch.tensor([[10.0, 10, 40, 40], [10, 10, 150, 150], [0, 0, 300, 300], [0, 0, 540, 400]])
    levels = LevelMapper(2, 5)([rois[:, 1:]])
    for mode in ("avg", "max"):
        ours = roi_kernels.multiscale_roi_align(maps, rois, sizes, 7, 2, aligned=True, pool_mode=mode)
        for lvl in range(4):
            sel = levels == lvl
            expected = roi_kernels.roi_align(maps[lvl], rois[sel], 7, 2.0 ** -(lvl + 2), 2, True, mode)
            torch.testing.assert_close(ours[sel], expected, rtol=0, atol=0)
            if mode == "avg":
                tv = torchvision.ops.roi_align(maps[lvl], rois[sel], 7, 2.0 ** -(lvl + 2), 2, True)
                torch.testing.assert_close(ours[sel], tv, **F32)
        assert {int(v) for v in levels.unique()} == {0, 1, 2, 3}, "the boxes should cover every level"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtypes(seed, dtype, channels_last):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(256, 256)]
    maps = fpn_maps(gen, sizes, channels=8, dtype=dtype)
    if channels_last:
        maps = [m.to(memory_format=torch.channels_last) for m in maps]
    boxes = random_boxes(gen, 40, 256, 256, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ours = roi_kernels.multiscale_roi_align(maps, boxes, sizes, 7, 2)
    assert ours.dtype == dtype
    # torchvision on the same values in float64, or in float32 for the half types (whose CPU
    # kernels it lacks or accumulates in half): only our final rounding to `dtype` differs.
    names = ["p2", "p3", "p4", "p5"]
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    ref = MultiScaleRoIAlign(names, 7, 2)({n: m.to(wide) for n, m in zip(names, maps)}, [boxes[:, 1:].to(wide)], sizes)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(ours.to(wide), ref, rtol=tol, atol=tol)


def test_errors():
    maps = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8)]
    boxes = torch.tensor([[0.0, 0, 0, 10, 10]])
    with pytest.raises(RuntimeError, match="spatial_scales must give one scale per feature map"):
        torch.ops.roi_kernels.multiscale_roi_align(maps, boxes, [0.25], 2, 2, 2, False, "avg", 224, 4)
    with pytest.raises(RuntimeError, match="consecutive powers"):
        torch.ops.roi_kernels.multiscale_roi_align(maps, boxes, [0.25, 0.0625], 2, 2, 2, False, "avg", 224, 4)
    with pytest.raises(RuntimeError, match=r"features\[1\] must have the batch size and channels"):
        roi_kernels.multiscale_roi_align([maps[0], torch.randn(1, 5, 8, 8)], boxes, [(64, 64)], 2)
    with pytest.raises(RuntimeError, match=r"spatial_scales\[0\]"):
        torch.ops.roi_kernels.multiscale_roi_align(maps, boxes, [-0.25, 0.125], 2, 2, 2, False, "avg", 224, 4)
    with pytest.raises(ValueError, match="image_sizes"):
        roi_kernels.multiscale_roi_align(maps, boxes, [], 2)
    with pytest.raises(RuntimeError, match=r"boxes\[:, 0\]"):
        roi_kernels.multiscale_roi_align(maps, torch.tensor([[3.0, 0, 0, 1, 1]]), [(64, 64)], 2)


def test_level_assignment_at_level_boundaries(seed):
    """Boxes whose sqrt(area) / 224 lies within a few float ulps of a power of two: the level
    expression floor(4 + log2(sqrt(area) / 224) + 1e-6) is decided by its last bits.
    torchvision evaluates it in float32, and so do we, with correctly rounded sqrt and log2; a
    kernel that sums it in double (what `::log2(float)` silently gave on the host) picks
    another level for about 3 % of such boxes. torch's own vectorised float sqrt is not always
    correctly rounded (sqrt(200703.656) = 447.99963 where the nearest float is 447.99960), so
    torchvision's choice is compared only where torch's sqrt is the correctly rounded one."""
    gen = torch.Generator().manual_seed(seed)
    n = 3000
    j = torch.randint(-1, 2, (n,), generator=gen).double()
    delta = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 4e-6
    side = (224 * 2 ** (j - 1e-6 + delta)).float()
    x1 = torch.rand(n, generator=gen) * 64
    y1 = torch.rand(n, generator=gen) * 64
    boxes = torch.stack([x1, y1, x1 + side, y1 + side], dim=1)
    size = (640, 640)
    levels = (2, 3, 4, 5)
    # Level l's map holds the constant l everywhere: a box's pooled value is its level.
    maps = [torch.full((1, 1, 640 // 2**k, 640 // 2**k), float(k)) for k in levels]
    names = [f"p{k}" for k in levels]
    # (rounded: the bilinear weights of a sample need not sum to exactly 1)
    ref = MultiScaleRoIAlign(names, 1, 2)(dict(zip(names, maps)), [boxes], [size]).flatten().round()
    ours = roi_kernels.multiscale_roi_align(maps, [boxes], [size], 1, 2).flatten().round()
    assert set(ref.unique().tolist()) >= {3.0, 4.0, 5.0}, "the boxes straddle three boundaries"

    # The rule in float32 with correctly rounded operations (numpy's float32 sqrt is; log2 in
    # float64 rounded to float32 is, but for arguments far rarer than these boxes).
    b = boxes.numpy()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    s = np.sqrt(area)
    lg = np.log2((s / np.float32(224)).astype(np.float64)).astype(np.float32)
    k = np.floor(np.float32(4) + lg + np.float32(1e-6)).clip(2, 5)
    wrong = np.nonzero(ours.numpy() != k)[0]
    assert len(wrong) == 0, (
        f"{len(wrong)} of {n} boxes pooled from another level than the float32 rule's; first: box "
        f"{boxes[wrong[0]].tolist()}, level {ours[wrong[0]].item()} vs {k[wrong[0]]}"
    )
    exact_sqrt = torch.sqrt(torch.from_numpy(area)).numpy() == s
    assert exact_sqrt.mean() > 0.9
    differs = (ours != ref).numpy() & exact_sqrt
    assert not differs.any(), f"{differs.sum()} boxes on another level than torchvision's"


# ---------------------------------------------------------------------------------------------
# The ragged form (FPN levels per image): bit for bit multiscale_roi_align on the same images
# ---------------------------------------------------------------------------------------------

SCALES = [0.25, 0.125, 0.0625, 0.03125]


def level_major(per_image_levels):
    """[[image 0's levels], [image 1's levels], ...] -> the flat level-major list of the op."""
    return [m for level in zip(*per_image_levels) for m in level]


@pytest.mark.parametrize("kind", RAGGED_LAYOUTS)
@pytest.mark.parametrize("dtype", RAGGED_DTYPES)
@pytest.mark.parametrize("levels", [1, 4])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_ragged_equals_multiscale_roi_align(seed, mode, dtype, kind, levels):
    gen = torch.Generator().manual_seed(seed)
    ops = torch.ops.roi_kernels
    dtype = getattr(torch, dtype)
    box_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scales = SCALES[:levels]
    sr, aligned = int(torch.randint(-1, 3, (1,), generator=gen)), bool(torch.randint(0, 2, (1,), generator=gen))
    tail = (7, 5, sr, aligned, mode, 224, 4)
    # Stacked levels [N, C, H_l, W_l] and their images as views.
    stacked = [in_layout(m, kind) for m in fpn_maps(gen, [(256, 320)] * 3, channels=5, levels=range(2, 2 + levels), dtype=dtype)]
    boxes = torch.cat(
        [
            random_boxes(gen, 60, 256, 320, num_images=3, min_side=4, max_side=600, clip=False, dtype=torch.float64),
            edge_boxes(256, 320, num_images=3, dtype=torch.float64),
        ]
    ).to(box_dtype)
    views = [m.unbind(0) for m in stacked]
    got = ops.multiscale_roi_align_ragged([v for level in views for v in level], boxes, scales, *tail)
    assert_same_bits(got, ops.multiscale_roi_align(stacked, boxes, scales, *tail))
    # Images of different sizes: each as multiscale_roi_align pools it alone.
    sizes = [(256, 320), (130, 70), (200, 256)]
    images = [[in_layout(m, kind)[0] for m in fpn_maps(gen, [size], channels=5, levels=range(2, 2 + levels), dtype=dtype)] for size in sizes]
    boxes = torch.cat(
        [
            random_boxes(gen, 60, 256, 320, num_images=3, min_side=4, max_side=600, clip=False, dtype=torch.float64),
            edge_boxes(256, 320, num_images=3, dtype=torch.float64),
        ]
    ).to(box_dtype)
    got = ops.multiscale_roi_align_ragged(level_major(images), boxes, scales, *tail)
    assert got.is_contiguous()
    assert_same_bits(got, per_image(lambda x, r: ops.multiscale_roi_align(x, r, scales, *tail), images, boxes))
    assert ops.multiscale_roi_align_ragged(level_major(images), boxes[:0], scales, *tail).shape == (0, 5, 7, 5)


def test_ragged_errors():
    ops = torch.ops.roi_kernels
    maps = [torch.randn(4, 16, 16), torch.randn(4, 12, 10), torch.randn(4, 8, 8), torch.randn(4, 6, 5)]
    boxes = torch.tensor([[1.0, 0, 0, 10, 10]])
    tail = (2, 2, 2, False, "avg", 224, 4)
    with pytest.raises(RuntimeError, match=r"features must hold one Tensor\[C, H, W\] per level and image.*got 3 maps"):
        ops.multiscale_roi_align_ragged(maps[:3], boxes, [0.25, 0.125], *tail)
    with pytest.raises(RuntimeError, match="consecutive powers"):
        ops.multiscale_roi_align_ragged(maps, boxes, [0.25, 0.0625], *tail)
    with pytest.raises(RuntimeError, match=r"features\[3\] must have the channels of features\[0\] \(4\), got 5"):
        ops.multiscale_roi_align_ragged([*maps[:3], torch.randn(5, 6, 5)], boxes, [0.25, 0.125], *tail)
    with pytest.raises(RuntimeError, match=r"features\[1\] must be a 3-D tensor"):
        ops.multiscale_roi_align_ragged([maps[0], maps[1][None]], boxes, [0.25, 0.125], *tail)
    with pytest.raises(RuntimeError, match=r"spatial_scales\[1\]"):
        ops.multiscale_roi_align_ragged(maps, boxes, [0.25, -0.125], *tail)
    with pytest.raises(RuntimeError, match=r"boxes\[:, 0\] \(the image index\) must be in \[0, 2\)"):
        ops.multiscale_roi_align_ragged(maps, torch.tensor([[2.0, 0, 0, 10, 10]]), [0.25, 0.125], *tail)
    with pytest.raises(RuntimeError, match="spatial_scales must give the scale of at least one level"):
        ops.multiscale_roi_align_ragged(maps, boxes, [], *tail)
