"""roi_align_rotated against a float64 reference written from docs/SEMANTICS.md, and identities
(angle 0 is roi_align, angle 90 on a square is roi_align on the transposed map)."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import (
    RAGGED_DTYPES,
    RAGGED_LAYOUTS,
    assert_same_bits,
    in_layout,
    per_image,
    ragged_maps,
    random_boxes,
    random_sizes,
)

import roi_kernels

# ---------------------------------------------------------------------------------------------
# The reference: detectron2's ROIAlignRotated (aligned=True) / mmcv's legacy mode (aligned=False)
# as docs/SEMANTICS.md defines them, vectorised over a box's samples, in float64.
# ---------------------------------------------------------------------------------------------


def _bilinear_points(plane: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """plane [C, H, W] at points (y, x) of any shape S -> [C, *S]; 0 outside [-1, size]."""
    _, h, w = plane.shape

    def axis(v, size):
        valid = (v >= -1.0) & (v <= size)
        v = torch.where(valid, v, torch.zeros_like(v)).clamp(min=0.0)
        lo = v.floor().clamp(max=size - 1)
        end = lo >= size - 1
        v = torch.where(end, lo, v)
        hi = torch.where(end, lo, lo + 1)
        frac = v - lo
        return lo.long(), hi.long(), 1.0 - frac, frac, valid

    ylo, yhi, hy, ly, vy = axis(y, h)
    xlo, xhi, hx, lx, vx = axis(x, w)
    val = hy * hx * plane[:, ylo, xlo] + hy * lx * plane[:, ylo, xhi] + ly * hx * plane[:, yhi, xlo] + ly * lx * plane[:, yhi, xhi]
    return torch.where(vy & vx, val, torch.zeros_like(val))


def roi_align_rotated_ref(x, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """x: Tensor[N, C, H, W]; rois: Tensor[K, 6] (index, cx, cy, w, h, angle in degrees)."""
    ph_, pw_ = output_size
    x, rois = x.double(), rois.double()
    out = torch.zeros(rois.shape[0], x.shape[1], ph_, pw_, dtype=torch.float64)
    for k in range(rois.shape[0]):
        n = int(rois[k, 0])
        cx, cy, w, h, angle = (float(v) for v in rois[k, 1:])
        offset = 0.5 if aligned else 0.0
        cx, cy = cx * spatial_scale - offset, cy * spatial_scale - offset
        rw, rh = w * spatial_scale, h * spatial_scale
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_, rw / pw_
        gh = sampling_ratio if sampling_ratio > 0 else (math.ceil(bh) if bh > 0 else 0)
        gw = sampling_ratio if sampling_ratio > 0 else (math.ceil(bw) if bw > 0 else 0)
        if gh == 0 or gw == 0:
            continue
        p = torch.arange(ph_, dtype=torch.float64)[:, None]
        i = torch.arange(gh, dtype=torch.float64)[None, :]
        yy = (-rh / 2 + p * bh + (i + 0.5) * bh / gh).reshape(-1, 1)
        q = torch.arange(pw_, dtype=torch.float64)[:, None]
        j = torch.arange(gw, dtype=torch.float64)[None, :]
        xx = (-rw / 2 + q * bw + (j + 0.5) * bw / gw).reshape(1, -1)
        t = angle * math.pi / 180.0
        c, s = math.cos(t), math.sin(t)
        xs = yy * s + xx * c + cx
        ys = yy * c - xx * s + cy
        val = _bilinear_points(x[n], ys, xs)  # [C, PH * gh, PW * gw]
        out[k] = val.reshape(-1, ph_, gh, pw_, gw).sum(dim=(2, 4)) / max(gh * gw, 1)
    return out


def random_rotated(gen, num, image_h, image_w, num_images=1, min_side=4.0, max_side=512.0, dtype=torch.float32):
    """Tensor[num, 6]: sizes and centres as conftest.random_boxes draws them (not clipped),
    angles uniform in [-180, 180] degrees."""
    b = random_boxes(gen, num, image_h, image_w, num_images, min_side, max_side, clip=False, dtype=torch.float64)
    angle = torch.rand(num, generator=gen, dtype=torch.float64) * 360.0 - 180.0
    cx, cy = (b[:, 1] + b[:, 3]) / 2, (b[:, 2] + b[:, 4]) / 2
    w, h = b[:, 3] - b[:, 1], b[:, 4] - b[:, 2]
    return torch.stack([b[:, 0], cx, cy, w, h, angle], dim=1).to(dtype)


def make_input(gen, n=2, c=6, h=23, w=31, dtype=torch.float32, channels_last=False, zero_border=False):
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    if zero_border:
        # With zero border rows and columns the op is continuous in the sample positions (no
        # jump where a sample leaves [-1, size]), so float32 geometry, which rounds sample
        # positions differently from the float64 reference, cannot flip a sample on or off.
        x = F.pad(x[:, :, 1:-1, 1:-1], (1, 1, 1, 1))
    x = x.to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("output_size", [(7, 7), (3, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference_float64(seed, aligned, sampling_ratio, output_size, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=3, c=5, h=21, w=27, dtype=torch.float64, channels_last=channels_last)
    rois = random_rotated(gen, 25, 21 * 8, 27 * 8, num_images=3, min_side=2, max_side=300, dtype=torch.float64)
    ours = roi_kernels.roi_align_rotated(x, rois, output_size, 1 / 8, sampling_ratio, aligned)
    ref = roi_align_rotated_ref(x, rois, output_size, 1 / 8, sampling_ratio, aligned)
    assert ours.shape == (25, 5, *output_size) and ours.is_contiguous()
    assert ref.abs().sum() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampling_ratio", [16, 64])
@pytest.mark.parametrize("aligned", [True, False])
def test_large_sampling_ratios(seed, sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c=3, h=17, w=21, dtype=torch.float64)
    rois = random_rotated(gen, 8, 17 * 8, 21 * 8, num_images=2, min_side=2, max_side=200, dtype=torch.float64)
    ours = roi_kernels.roi_align_rotated(x, rois, (2, 3), 1 / 8, sampling_ratio, aligned)
    ref = roi_align_rotated_ref(x, rois, (2, 3), 1 / 8, sampling_ratio, aligned)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference_float32(seed, aligned, sampling_ratio, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c=7, h=25, w=33, channels_last=channels_last, zero_border=True)
    rois = random_rotated(gen, 40, 25 * 16, 33 * 16, num_images=2)
    ours = roi_kernels.roi_align_rotated(x, rois, 7, 1 / 16, sampling_ratio, aligned)
    ref = roi_align_rotated_ref(x, rois, (7, 7), 1 / 16, sampling_ratio, aligned)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_types_accumulate_in_float32(seed, dtype, tol, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, c=9, dtype=dtype, channels_last=channels_last, zero_border=True)
    rois = random_rotated(gen, 30, 23 * 16, 31 * 16, num_images=2)
    ours = roi_kernels.roi_align_rotated(x, rois, 5, 1 / 16, 2, True)
    assert ours.dtype == dtype
    # The same input values in float32 (the boxes are float32 either way): only the final
    # rounding to `dtype` differs.
    as_float = roi_kernels.roi_align_rotated(x.float(), rois, 5, 1 / 16, 2, True)
    torch.testing.assert_close(ours, as_float.to(dtype), rtol=0, atol=0)
    ref = roi_align_rotated_ref(x, rois, (5, 5), 1 / 16, 2, True)
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)


def test_rois_as_list_and_module(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=3)
    rois = random_rotated(gen, 30, 23 * 16, 31 * 16, num_images=3)
    as_list = [rois[rois[:, 0] == i, 1:] for i in range(3)]
    as_tensor = torch.cat([torch.cat([torch.full((len(r), 1), float(i)), r], 1) for i, r in enumerate(as_list)])
    ours = roi_kernels.roi_align_rotated(x, as_list, (4, 3), 1 / 16, 2, True)
    torch.testing.assert_close(ours, roi_kernels.roi_align_rotated(x, as_tensor, (4, 3), 1 / 16, 2, True), rtol=0, atol=0)
    module = roi_kernels.RoIAlignRotated((4, 3), 1 / 16, 2, aligned=True)
    assert "aligned=True" in repr(module)
    torch.testing.assert_close(module(x, as_tensor), ours, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------


def _axis_aligned(rois: torch.Tensor) -> torch.Tensor:
    """(index, cx, cy, w, h, angle) -> (index, x1, y1, x2, y2) of the unrotated box."""
    i, cx, cy, w, h = rois[:, :5].unbind(1)
    return torch.stack([i, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_angle_zero_equals_roi_align(seed, aligned, sampling_ratio, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c=8, dtype=torch.float64, channels_last=channels_last)
    # roi_align(aligned=False) keeps x1 and stretches a box narrower than 1 pixel to 1 from
    # there, while the rotated op stretches it about its centre: they agree on boxes of at
    # least 1 map pixel (scale 1/16: 16 image pixels). random_rotated's sides are at least
    # min_side / sqrt(2) (aspect ratios up to 2).
    rois = random_rotated(gen, 40, 23 * 16, 31 * 16, num_images=2, min_side=24, dtype=torch.float64)
    assert (rois[:, 3:5] >= 16).all()
    rois[:, 5] = 0.0
    ours = roi_kernels.roi_align_rotated(x, rois, (7, 6), 1 / 16, sampling_ratio, aligned)
    boxes = _axis_aligned(rois)
    torch.testing.assert_close(
        ours, roi_kernels.roi_align(x, boxes, (7, 6), 1 / 16, sampling_ratio, aligned), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        ours, torchvision.ops.roi_align(x, boxes, (7, 6), 1 / 16, sampling_ratio, aligned), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 3])
def test_angle_90_on_a_square_is_roi_align_on_the_transposed_map(seed, aligned, sampling_ratio):
    """Rotating a square box by +90 degrees puts sample (yy, xx) at (y, x) = (cy - xx, cx + yy):
    the unrotated square's sample on the transposed map, with the bin columns reversed
    (the grid is symmetric, so -xx of column pw is xx of column PW - 1 - pw)."""
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c=5, h=19, w=26, dtype=torch.float64)
    rois = random_rotated(gen, 30, 19 * 16, 26 * 16, num_images=2, dtype=torch.float64)
    rois[:, 4] = rois[:, 3]  # square
    rois[:, 5] = 90.0
    ours = roi_kernels.roi_align_rotated(x, rois, (4, 5), 1 / 16, sampling_ratio, aligned)
    swapped = rois.clone()
    swapped[:, 1], swapped[:, 2] = rois[:, 2], rois[:, 1]
    swapped[:, 5] = 0.0
    transposed = roi_kernels.roi_align_rotated(x.transpose(2, 3), swapped, (4, 5), 1 / 16, sampling_ratio, aligned)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, transposed.flip(3), rtol=1e-9, atol=1e-9)


def test_angle_is_periodic_and_signed(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, dtype=torch.float64)
    rois = random_rotated(gen, 20, 23 * 16, 31 * 16, num_images=2, dtype=torch.float64)
    turned = rois.clone()
    turned[:, 5] += 360.0
    a = roi_kernels.roi_align_rotated(x, rois, 5, 1 / 16, 2, True)
    torch.testing.assert_close(a, roi_kernels.roi_align_rotated(x, turned, 5, 1 / 16, 2, True), rtol=1e-9, atol=1e-9)
    # A non-square box at +30 and -30 degrees samples different points.
    rois[:, 3] = rois[:, 4] * 2 + 64
    rois[:, 5] = 30.0
    mirrored = rois.clone()
    mirrored[:, 5] = -30.0
    b = roi_kernels.roi_align_rotated(x, rois, 5, 1 / 16, 2, True)
    assert not torch.allclose(b, roi_kernels.roi_align_rotated(x, mirrored, 5, 1 / 16, 2, True))


# ---------------------------------------------------------------------------------------------
# Huge and non-finite boxes; the bound on the work per bin
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_box_equals_reference_that_visits_every_sample(seed, aligned, dtype):
    """Boxes far larger than the map, at any angle: the kernel visits only the samples that can
    land on the map (roi_math.h's rotated_scan); the reference visits all ~10^6."""
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=1, c=2, h=20, w=24, dtype=torch.float64, zero_border=dtype == torch.float32)
    angle = float(torch.rand(1, generator=gen)) * 360 - 180
    cx, cy = (float(v) for v in torch.rand(2, generator=gen) * 60 - 20)
    rois = torch.tensor(
        [
            [0, cx, cy, 2000.0, 1500.0, angle],
            [0, cx, cy, 1500.0, 40.0, angle],  # a long thin box across the map
            [0, 400.0, -300.0, 1200.0, 900.0, angle],  # off-centre: only a corner can reach the map
        ],
        dtype=dtype,
    )
    ours = roi_kernels.roi_align_rotated(x.to(dtype), rois, 2, 1.0, -1, aligned)
    ref = roi_align_rotated_ref(x, rois, (2, 2), 1.0, -1, aligned)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    assert ref[:2].abs().sum() > 0
    torch.testing.assert_close(ours.double(), ref, **tol)


def test_huge_and_non_finite_rois_are_defined_and_fast(seed):
    """The work per bin is bounded by the map, not the box (see roi_math.h): boxes of
    10^30 pixels, whose adaptive grid is capped at 2^30 x 2^30 samples per bin, finish at once.

    Definition (documented in roi_math.h): NaN or infinite values anywhere in a box leave
    no sample on the map (all 0); for finite boxes whose float32 rounding of sample positions
    exceeds 64 sample spacings (coordinates of about 2^24 spacings and more), samples whose exact
    position is more than 64 spacings off the map are skipped; all outputs stay finite."""
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=1, c=16, h=50, w=68)
    inf, nan = float("inf"), float("nan")
    rois = torch.tensor(
        [
            [0, nan, 10, 20, 20, 0],
            [0, 10, 10, nan, 20, 30],
            [0, 10, 10, 20, 20, nan],
            [0, 10, 10, 20, 20, inf],
            [0, inf, 10, 20, 20, 0],
            [0, 10, 10, inf, inf, 45],
            [0, 30, 20, 1e30, 1e30, 33],
            [0, -1e30, 1e30, 3e38, 3e38, -75],
            [0, 30, 20, 1e9, 5e8, 17],
            [0, 30, 20, 1e5, 1e5, 60],
        ]
    )
    for aligned in (True, False):
        for sr in (-1, 4):
            start = time.perf_counter()
            out = roi_kernels.roi_align_rotated(x, rois, 7, 1.0, sr, aligned)
            assert time.perf_counter() - start < 5.0
            assert torch.isfinite(out).all()
            assert (out[:6] == 0).all()
            if sr <= 0:
                # An adaptive grid samples the map about once a pixel under a box covering it.
                assert (out[-1] != 0).any()


def test_zero_size_boxes(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=1, c=3, dtype=torch.float64)
    rois = torch.tensor([[0, 100.0, 120, 0, 0, 20], [0, 100.0, 120, 0, 64, -40], [0, 50, 60, -30, 40, 10]], dtype=torch.float64)
    for aligned in (True, False):
        for sr in (-1, 2):
            ours = roi_kernels.roi_align_rotated(x, rois, 3, 1 / 16, sr, aligned)
            ref = roi_align_rotated_ref(x, rois, (3, 3), 1 / 16, sr, aligned)
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
            if aligned and sr <= 0:
                assert (ours == 0).all()  # no extent, no adaptive samples
            else:
                assert (ours != 0).any()


def test_boxes_outside_the_map(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=1, c=3, h=20, w=24, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, -500.0, -500, 40, 40, 30],  # far before the map
            [0, 24 * 16 + 400, 100, 64, 32, -70],  # far after it
            [0, -8.0, 160, 64, 64, 45],  # straddling the left edge
            [0, 24 * 16, 20 * 16, 80, 40, 120],  # straddling the far corner
        ],
        dtype=torch.float64,
    )
    for aligned in (True, False):
        for sr in (-1, 2):
            ours = roi_kernels.roi_align_rotated(x, rois, 4, 1 / 16, sr, aligned)
            torch.testing.assert_close(ours, roi_align_rotated_ref(x, rois, (4, 4), 1 / 16, sr, aligned), rtol=1e-10, atol=1e-10)
            assert (ours[:2] == 0).all() and (ours[2:] != 0).any()


# ---------------------------------------------------------------------------------------------
# Bad input, empty input
# ---------------------------------------------------------------------------------------------


def test_zero_rois_give_empty_output():
    x = torch.randn(1, 8, 10, 10)
    assert roi_kernels.roi_align_rotated(x, torch.zeros(0, 6), (7, 3)).shape == (0, 8, 7, 3)
    assert roi_kernels.roi_align_rotated(x, [torch.zeros(0, 5)], 2).shape == (0, 8, 2, 2)


def test_bad_input_raises_naming_the_argument():
    x = torch.randn(2, 4, 8, 8)
    rois = torch.tensor([[0.0, 4, 4, 2, 2, 30]])
    f = roi_kernels.roi_align_rotated
    with pytest.raises(RuntimeError, match=r"rois must be Tensor\[K, 6\]"):
        f(x, torch.zeros(3, 5), 2)
    with pytest.raises(ValueError, match=r"rois\[0\] must be Tensor\[L, 5\]"):
        f(x, [torch.zeros(3, 4)], 2)
    with pytest.raises(RuntimeError, match=r"rois must be a floating-point tensor"):
        f(x, torch.zeros(3, 6, dtype=torch.int32), 2)
    for idx in (2.0, -1.0, float("nan")):
        with pytest.raises(RuntimeError, match=r"rois\[:, 0\].*\[0, 2\)"):
            f(x, torch.tensor([[idx, 4, 4, 2, 2, 30]]), 2)
    with pytest.raises(ValueError, match="output_size"):
        f(x, rois, (3, 0))
    with pytest.raises(RuntimeError, match="output_size"):
        torch.ops.roi_kernels.roi_align_rotated(x, rois, 1.0, -2, 2, 2, True)
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="spatial_scale"):
            f(x, rois, 2, scale)
    with pytest.raises(RuntimeError, match="sampling_ratio"):
        f(x, rois, 2, 1.0, 2000)
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        f(x[0], rois, 2)
    with pytest.raises(RuntimeError, match="input must be float32"):
        f(x.long(), rois, 2)


# ---------------------------------------------------------------------------------------------
# The ragged form (per-image maps): bit for bit the single-map op on the same images
# ---------------------------------------------------------------------------------------------


def edge_rotated(h, w, n):
    """Boxes off the map, empty, of negative width, huge, with a NaN angle."""
    edges = torch.tensor(
        [
            [0, -40.0, -30.0, 10.0, 8.0, 30.0],
            [0, w / 2, h / 2, 1e5, 1e5, 45.0],
            [0, 5.0, 5.0, 0.0, 0.0, 10.0],
            [0, 5.0, 5.0, -4.0, 6.0, 0.0],
            [0, 3.0, 4.0, 6.0, 6.0, math.nan],
        ],
        dtype=torch.float64,
    )
    edges[:, 0] = torch.arange(len(edges)) % n
    return edges


@pytest.mark.parametrize("kind", RAGGED_LAYOUTS)
@pytest.mark.parametrize("dtype", RAGGED_DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_ragged_equals_the_single_map_op(seed, dtype, kind, aligned):
    gen = torch.Generator().manual_seed(seed)
    ops = torch.ops.roi_kernels
    dtype = getattr(torch, dtype)
    box_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    c = int(torch.randint(1, 20, (1,), generator=gen))
    args = (0.5, 3, 4, int(torch.randint(-1, 3, (1,), generator=gen)), aligned)
    x = in_layout(torch.randn(3, c, 11, 13, generator=gen, dtype=torch.float64).to(dtype), kind)
    rois = torch.cat([random_rotated(gen, 25, 22, 26, num_images=3, min_side=1, max_side=30, dtype=torch.float64), edge_rotated(22, 26, 3)])
    rois = rois.to(box_dtype)
    assert_same_bits(ops.roi_align_rotated_ragged(list(x.unbind(0)), rois, *args), ops.roi_align_rotated(x, rois, *args))
    sizes = random_sizes(gen, 4, 1, 16)
    maps = ragged_maps(gen, sizes, c, dtype, kind)
    rois = torch.cat([random_rotated(gen, 30, 32, 32, num_images=4, min_side=1, max_side=30, dtype=torch.float64), edge_rotated(32, 32, 4)])
    rois = rois.to(box_dtype)
    got = ops.roi_align_rotated_ragged(maps, rois, *args)
    assert got.is_contiguous()
    assert_same_bits(got, per_image(ops.roi_align_rotated, maps, rois, *args))
    assert_same_bits(roi_kernels.roi_align_rotated(maps, rois, (3, 4), *args[:1], *args[3:]), got)
    assert ops.roi_align_rotated_ragged(maps, rois[:0], *args).shape == (0, c, 3, 4)


def test_ragged_errors_name_the_argument():
    maps = [torch.randn(4, 8, 8), torch.randn(4, 6, 5)]
    rois = torch.tensor([[1.0, 3, 3, 2, 2, 30]])
    with pytest.raises(RuntimeError, match=r"input\[1\] must have the channels of input\[0\] \(4\), got 3"):
        roi_kernels.roi_align_rotated([maps[0], torch.randn(3, 5, 5)], rois, 2)
    with pytest.raises(RuntimeError, match=r"rois must be Tensor\[K, 6\]"):
        roi_kernels.roi_align_rotated(maps, torch.zeros(2, 5), 2)
    with pytest.raises(RuntimeError, match=r"rois\[:, 0\] \(the image index\) must be in \[0, 2\)"):
        roi_kernels.roi_align_rotated(maps, torch.tensor([[2.0, 3, 3, 2, 2, 30]]), 2)
