"""ps_roi_align and ps_roi_pool against torchvision (the definition) and float64 references."""

from __future__ import annotations

import math
import time

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

F32 = dict(rtol=1e-5, atol=1e-6)
F64 = dict(rtol=1e-12, atol=1e-12)


def make_input(gen, n=2, c_out=3, output_size=(3, 3), h=23, w=31, dtype=torch.float32, channels_last=False):
    c = c_out * output_size[0] * output_size[1]
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------------------------------------
# float64 references written from docs/SEMANTICS.md (for the boxes where torchvision is defective).
# ---------------------------------------------------------------------------------------------


def _bilinear(plane: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """plane [C, H, W] sampled at every (y, x) of ys [A] x xs [B] -> [C, A, B] (float64)."""
    _, h, w = plane.shape

    def axis(v, size):
        valid = (v >= -1.0) & (v <= size)
        v = v.clamp(min=0.0)
        lo = v.floor().clamp(max=size - 1)
        end = lo >= size - 1
        v = torch.where(end, lo, v)
        hi = torch.where(end, lo, lo + 1)
        frac = v - lo
        return lo.long(), hi.long(), 1.0 - frac, frac, valid

    ylo, yhi, hy, ly, vy = axis(ys, h)
    xlo, xhi, hx, lx, vx = axis(xs, w)

    def at(r, c):
        return plane[:, r][:, :, c]

    val = (
        (hy[:, None] * hx[None, :]) * at(ylo, xlo)
        + (hy[:, None] * lx[None, :]) * at(ylo, xhi)
        + (ly[:, None] * hx[None, :]) * at(yhi, xlo)
        + (ly[:, None] * lx[None, :]) * at(yhi, xhi)
    )
    return val * (vy[:, None] & vx[None, :])


def ps_roi_align_ref(x, rois, output_size, spatial_scale, sampling_ratio):
    """Offset 0.5, no minimum size, average over max(gh * gw, 1) samples; input channel
    (c * PH + ph) * PW + pw for output channel c of bin (ph, pw)."""
    ph_, pw_ = output_size
    x, rois = x.double(), rois.double()
    c_out = x.shape[1] // (ph_ * pw_)
    out = torch.zeros(rois.shape[0], c_out, ph_, pw_, dtype=torch.float64)
    for k in range(rois.shape[0]):
        n = int(rois[k, 0])
        x1, y1, x2, y2 = (float(v) * spatial_scale - 0.5 for v in rois[k, 1:])
        rh, rw = y2 - y1, x2 - x1
        bh, bw = rh / ph_, rw / pw_
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bh), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bw), 0)
        if gh == 0 or gw == 0:
            continue
        for ph in range(ph_):
            ys = y1 + ph * bh + (torch.arange(gh, dtype=torch.float64) + 0.5) * bh / gh
            for pw in range(pw_):
                xs = x1 + pw * bw + (torch.arange(gw, dtype=torch.float64) + 0.5) * bw / gw
                chans = (torch.arange(c_out) * ph_ + ph) * pw_ + pw
                out[k, :, ph, pw] = _bilinear(x[n, chans], ys, xs).sum(dim=(1, 2)) / max(gh * gw, 1)
    return out


# ---------------------------------------------------------------------------------------------
# ps_roi_align
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("output_size", [(7, 7), (3, 5), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ps_roi_align_matches_torchvision_float32(seed, sampling_ratio, output_size, channels_last):
    gen = torch.Generator().manual_seed(seed)
    c_out = int(torch.randint(1, 6, (1,), generator=gen))
    x = make_input(gen, n=3, c_out=c_out, output_size=output_size, h=37, w=45, channels_last=channels_last)
    boxes = random_boxes(gen, 60, 37 * 16, 45 * 16, num_images=3, min_side=4)
    ours = roi_kernels.ps_roi_align(x, boxes, output_size, 1 / 16, sampling_ratio)
    ref = torchvision.ops.ps_roi_align(x, boxes, output_size, 1 / 16, sampling_ratio)
    assert ours.shape == (60, c_out, *output_size)
    assert ours.is_contiguous()
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, ref, **F32)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_ps_roi_align_matches_torchvision_float64(seed, sampling_ratio):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, c_out=4, output_size=(5, 4), dtype=torch.float64)
    boxes = random_boxes(gen, 40, 23 * 8, 31 * 8, num_images=2, min_side=2, dtype=torch.float64)
    ours = roi_kernels.ps_roi_align(x, boxes, (5, 4), 1 / 8, sampling_ratio)
    ref = torchvision.ops.ps_roi_align(x, boxes, (5, 4), 1 / 8, sampling_ratio)
    torch.testing.assert_close(ours, ref, **F64)


def test_ps_roi_align_reference_agrees_with_torchvision(seed):
    """The float64 reference (used where torchvision is defective) agrees with torchvision."""
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, c_out=2, output_size=(3, 3), dtype=torch.float64)
    boxes = random_boxes(gen, 20, 23 * 16, 31 * 16, num_images=2, min_side=4, dtype=torch.float64)
    for sr in (-1, 2):
        ref = ps_roi_align_ref(x, boxes, (3, 3), 1 / 16, sr)
        torch.testing.assert_close(torchvision.ops.ps_roi_align(x, boxes, 3, 1 / 16, sr), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ps_half_types_accumulate_in_float32(seed, dtype, tol, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, c_out=5, output_size=(7, 7), dtype=dtype, channels_last=channels_last)
    boxes = random_boxes(gen, 50, 23 * 16, 31 * 16, num_images=2)
    # torchvision on the same values in float32: only the final rounding to `dtype` differs
    # (torchvision has no bfloat16 CPU kernel, and its float16 one accumulates in float16).
    for ours, ref in [
        (roi_kernels.ps_roi_align(x, boxes, 7, 1 / 16, 2), torchvision.ops.ps_roi_align(x.float(), boxes, 7, 1 / 16, 2)),
        (roi_kernels.ps_roi_pool(x, boxes, 7, 1 / 16), torchvision.ops.ps_roi_pool(x.float(), boxes, 7, 1 / 16)),
    ]:
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), ref, rtol=tol, atol=tol)
        # float32 accumulation: the result is float32's rounded once, not a float16 running sum.
        assert (ours.float() - ref.to(dtype).float()).abs().max() <= tol


@pytest.mark.parametrize("sampling_ratio", [16, 64])
def test_ps_roi_align_large_sampling_ratios(seed, sampling_ratio):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c_out=2, output_size=(2, 3), h=19, w=23)
    boxes = torch.cat([random_boxes(gen, 6, 19 * 8, 23 * 8, num_images=2, min_side=2), edge_boxes(152, 184, 2)[:5]])
    ours = roi_kernels.ps_roi_align(x, boxes, (2, 3), 1 / 8, sampling_ratio)
    torch.testing.assert_close(ours, torchvision.ops.ps_roi_align(x, boxes, (2, 3), 1 / 8, sampling_ratio), **F32)
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ps_roi_align_edge_boxes(seed, sampling_ratio, channels_last, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, c_out=3, output_size=(7, 7), dtype=dtype, channels_last=channels_last)
    boxes = edge_boxes(23 * 16, 31 * 16, num_images=2, dtype=dtype)
    ours = roi_kernels.ps_roi_align(x, boxes, 7, 1 / 16, sampling_ratio)
    assert torch.isfinite(ours).all()
    # torchvision returns NaN for a box of zero (or slightly negative) width or height with
    # adaptive sampling (its average has no max(count, 1)): those boxes are checked against the
    # float64 reference only.
    tv = torchvision.ops.ps_roi_align(x, boxes, 7, 1 / 16, sampling_ratio)
    nan_rows = torch.isnan(tv).flatten(1).any(1)
    degenerate = ((boxes[:, 3] - boxes[:, 1]) <= 0) | ((boxes[:, 4] - boxes[:, 2]) <= 0)
    assert not (nan_rows & ~degenerate).any()
    if sampling_ratio <= 0:
        assert nan_rows.any()
    assert (~nan_rows).sum() >= 7
    torch.testing.assert_close(ours[~nan_rows], tv[~nan_rows], **F32)
    # Every edge box except the 2e5-pixel one (millions of samples) against the reference.
    small = (boxes[:, 3] - boxes[:, 1]).abs() < 1e4
    ref64 = ps_roi_align_ref(x, boxes[small], (7, 7), 1 / 16, sampling_ratio)
    torch.testing.assert_close(ours[small].double(), ref64, rtol=1e-4, atol=1e-5)


def test_ps_roi_align_boxes_as_list(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=3, c_out=2, output_size=(3, 3))
    boxes = random_boxes(gen, 30, 23 * 16, 31 * 16, num_images=3)
    as_list = [boxes[boxes[:, 0] == i, 1:] for i in range(3)]
    as_tensor = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(as_list)])
    ours = roi_kernels.ps_roi_align(x, as_list, 3, 1 / 16, 2)
    torch.testing.assert_close(ours, roi_kernels.ps_roi_align(x, as_tensor, 3, 1 / 16, 2), rtol=0, atol=0)
    torch.testing.assert_close(ours, torchvision.ops.ps_roi_align(x, as_list, 3, 1 / 16, 2), **F32)


# ---------------------------------------------------------------------------------------------
# ps_roi_pool
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_size", [(7, 7), (3, 5), (2, 1), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("spatial_scale", [1 / 16, 0.5])
def test_ps_roi_pool_matches_torchvision_float32(seed, output_size, channels_last, spatial_scale):
    gen = torch.Generator().manual_seed(seed)
    c_out = int(torch.randint(1, 6, (1,), generator=gen))
    x = make_input(gen, n=3, c_out=c_out, output_size=output_size, h=37, w=45, channels_last=channels_last)
    boxes = random_boxes(gen, 60, 37 / spatial_scale, 45 / spatial_scale, num_images=3, min_side=2)
    ours = roi_kernels.ps_roi_pool(x, boxes, output_size, spatial_scale)
    ref = torchvision.ops.ps_roi_pool(x, boxes, output_size, spatial_scale)
    assert ours.shape == (60, c_out, *output_size)
    assert ours.is_contiguous()
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, ref, **F32)


def test_ps_roi_pool_matches_torchvision_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, c_out=3, output_size=(4, 6), dtype=torch.float64)
    boxes = random_boxes(gen, 40, 23 * 4, 31 * 4, num_images=2, min_side=1, dtype=torch.float64)
    ours = roi_kernels.ps_roi_pool(x, boxes, (4, 6), 1 / 4)
    torch.testing.assert_close(ours, torchvision.ops.ps_roi_pool(x, boxes, (4, 6), 1 / 4), **F64)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ps_roi_pool_edge_boxes(seed, channels_last, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, c_out=3, output_size=(7, 7), dtype=dtype, channels_last=channels_last)
    boxes = edge_boxes(23 * 16, 31 * 16, num_images=2, dtype=dtype)
    ours = roi_kernels.ps_roi_pool(x, boxes, 7, 1 / 16)
    tol = F32 if dtype == torch.float32 else F64
    torch.testing.assert_close(ours, torchvision.ops.ps_roi_pool(x, boxes, 7, 1 / 16), **tol)
    # The boxes entirely off the map pool to 0 (bins clipped to nothing).
    assert (ours[:2] == 0).all()


def test_ps_roi_pool_boxes_as_list_and_exact_cells(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c_out=2, output_size=(2, 2), h=12, w=12)
    # A box snapped to rows 2..6 and columns 4..8 (scale 1): bins of 2 x 2 cells.
    boxes = [torch.tensor([[4.2, 1.8, 7.6, 5.9]]), torch.tensor([[4.2, 1.8, 7.6, 5.9]])]
    ours = roi_kernels.ps_roi_pool(x, boxes, 2, 1.0)
    for n in range(2):
        for c in range(2):
            for ph in range(2):
                for pw in range(2):
                    chan = (c * 2 + ph) * 2 + pw
                    cells = x[n, chan, 2 + 2 * ph : 4 + 2 * ph, 4 + 2 * pw : 6 + 2 * pw]
                    torch.testing.assert_close(ours[n, c, ph, pw], cells.mean(), **F32)


# ---------------------------------------------------------------------------------------------
# Both ops
# ---------------------------------------------------------------------------------------------

OPS = {
    "ps_roi_align": lambda x, b, s, scale=1.0: roi_kernels.ps_roi_align(x, b, s, scale, 2),
    "ps_roi_pool": lambda x, b, s, scale=1.0: roi_kernels.ps_roi_pool(x, b, s, scale),
}


@pytest.mark.parametrize("op", OPS)
def test_zero_boxes_give_empty_output(op):
    x = torch.randn(1, 2 * 7 * 3, 10, 10)
    out = OPS[op](x, torch.zeros(0, 5), (7, 3))
    assert out.shape == (0, 2, 7, 3)
    assert OPS[op](x, [torch.zeros(0, 4)], (7, 3)).shape == (0, 2, 7, 3)


@pytest.mark.parametrize("op", OPS)
def test_non_finite_and_huge_boxes_are_defined_and_fast(op, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=1, c_out=2, output_size=(7, 7), h=30, w=30)
    inf, nan = float("inf"), float("nan")
    boxes = torch.tensor(
        [
            [0, nan, 1, 5, 5],
            [0, 1, 1, nan, nan],
            [0, -inf, -inf, inf, inf],
            [0, -1e30, -1e30, 1e30, 1e30],
            [0, -3e38, 0, 3e38, 30],
            [0, 0, 0, inf, 4],
        ]
    )
    start = time.perf_counter()
    out = OPS[op](x, boxes, 7)
    assert time.perf_counter() - start < 5.0
    # Documented result: NaN coordinates leave nothing to sample (0); huge finite boxes give
    # finite values.
    assert torch.isfinite(out).all()
    assert (out[:2] == 0).all()


@pytest.mark.parametrize("op", OPS)
def test_bad_input_raises_naming_the_argument(op):
    x = torch.randn(2, 18, 8, 8)
    boxes = torch.tensor([[0.0, 0, 0, 4, 4]])
    f = OPS[op]
    with pytest.raises(RuntimeError, match=r"input has 18 channels.*multiple of output_size"):
        f(x, boxes, (2, 2))
    with pytest.raises(RuntimeError, match=r"boxes must be Tensor\[K, 5\]"):
        f(x, torch.zeros(3, 4), 3)
    with pytest.raises(ValueError, match=r"boxes\[0\] must be Tensor\[L, 4\]"):
        f(x, [torch.zeros(3, 5)], 3)
    with pytest.raises(RuntimeError, match=r"boxes must be a floating-point tensor"):
        f(x, torch.zeros(3, 5, dtype=torch.int64), 3)
    for idx in (2.0, -1.0, float("nan")):
        with pytest.raises(RuntimeError, match=r"boxes\[:, 0\].*\[0, 2\)"):
            f(x, torch.tensor([[idx, 0, 0, 4, 4]]), 3)
    with pytest.raises(ValueError, match="output_size"):
        f(x, boxes, (0, 3))
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="spatial_scale"):
            f(x, boxes, 3, scale)
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        f(x[0], boxes, 3)


def test_bad_input_raises_at_the_op_level():
    x = torch.randn(2, 18, 8, 8)
    boxes = torch.tensor([[0.0, 0, 0, 4, 4]])
    with pytest.raises(RuntimeError, match="output_size"):
        torch.ops.roi_kernels.ps_roi_align(x, boxes, 1.0, 0, 3, 2)
    with pytest.raises(RuntimeError, match="output_size"):
        torch.ops.roi_kernels.ps_roi_pool(x, boxes, 1.0, 3, -1)
    with pytest.raises(RuntimeError, match="sampling_ratio"):
        torch.ops.roi_kernels.ps_roi_align(x, boxes, 1.0, 3, 3, 5000)


def test_modules_match_functions(seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n=2, c_out=3, output_size=(3, 3))
    boxes = random_boxes(gen, 20, 23 * 16, 31 * 16, num_images=2)
    align = roi_kernels.PSRoIAlign((3, 3), 1 / 16, 2)
    pool = roi_kernels.PSRoIPool(3, 1 / 16)
    assert "sampling_ratio=2" in repr(align) and "spatial_scale=0.0625" in repr(pool)
    torch.testing.assert_close(align(x, boxes), torchvision.ops.PSRoIAlign((3, 3), 1 / 16, 2)(x, boxes), **F32)
    torch.testing.assert_close(pool(x, boxes), torchvision.ops.PSRoIPool(3, 1 / 16)(x, boxes), **F32)


# ---------------------------------------------------------------------------------------------
# The ragged forms (per-image maps): bit for bit the single-map ops on the same images
# ---------------------------------------------------------------------------------------------

RAGGED = {
    "ps_roi_align": (torch.ops.roi_kernels.ps_roi_align, torch.ops.roi_kernels.ps_roi_align_ragged, (0.5, 3, 2, -1)),
    "ps_roi_align_sr2": (torch.ops.roi_kernels.ps_roi_align, torch.ops.roi_kernels.ps_roi_align_ragged, (0.5, 2, 3, 2)),
    "ps_roi_pool": (torch.ops.roi_kernels.ps_roi_pool, torch.ops.roi_kernels.ps_roi_pool_ragged, (0.5, 3, 2)),
}


@pytest.mark.parametrize("kind", RAGGED_LAYOUTS)
@pytest.mark.parametrize("dtype", RAGGED_DTYPES)
@pytest.mark.parametrize("op", RAGGED)
def test_ragged_equals_the_single_map_op(seed, op, dtype, kind):
    gen = torch.Generator().manual_seed(seed)
    single, ragged, args = RAGGED[op]
    dtype = getattr(torch, dtype)
    box_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    c = int(torch.randint(1, 5, (1,), generator=gen)) * 6
    x = in_layout(torch.randn(3, c, 13, 17, generator=gen, dtype=torch.float64).to(dtype), kind)
    boxes = torch.cat([random_boxes(gen, 30, 26, 34, num_images=3, min_side=1, max_side=30), edge_boxes(26, 34, 3)])
    boxes = boxes.to(box_dtype)
    assert_same_bits(ragged(list(x.unbind(0)), boxes, *args), single(x, boxes, *args))
    sizes = random_sizes(gen, 4, 1, 20)
    maps = ragged_maps(gen, sizes, c, dtype, kind)
    boxes = torch.cat([random_boxes(gen, 40, 40, 40, num_images=4, min_side=1, max_side=40), edge_boxes(40, 40, 4)])
    boxes = boxes.to(box_dtype)
    got = ragged(maps, boxes, *args)
    assert got.is_contiguous()
    assert_same_bits(got, per_image(single, maps, boxes, *args))
    assert ragged(maps, boxes[:0], *args).shape == (0, c // 6, *args[1:3])


@pytest.mark.parametrize("op", OPS)
def test_ragged_through_the_python_api(op, seed):
    gen = torch.Generator().manual_seed(seed)
    maps = ragged_maps(gen, [(9, 14), (20, 7)], 2 * 3 * 3, torch.float32, "contiguous")
    boxes = random_boxes(gen, 15, 40, 40, num_images=2, min_side=2, max_side=40)
    want = per_image(lambda x, b: OPS[op](x, b, 3, 0.5), maps, boxes)
    assert_same_bits(OPS[op](maps, boxes, 3, 0.5), want)
    with pytest.raises(RuntimeError, match=r"input\[1\] must have the channels of input\[0\] \(18\), got 9"):
        OPS[op]([maps[0], maps[1][:9]], boxes, 3, 0.5)
    with pytest.raises(RuntimeError, match=r"input has 18 channels.*multiple of output_size"):
        OPS[op](maps, boxes, 2, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_offsets_beyond_2_31_elements(op):
    """A map of more than 2^31 elements: a box at its far corner reads the right values."""
    h = w = 16385
    c = 8  # 8 * 16385^2 = 2.15e9 elements > 2^31 (4.3 GB as float16); 2 channels out of 2x2 bins
    try:
        x = torch.empty(1, c, h, w, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("not enough memory for a 4.3 GB map")
    patch = torch.randn(c, 12, 12).to(torch.float16)
    x[0, :, -12:, -12:] = patch
    small = patch[None].clone()
    # Boxes one cell inside the patch: the bilinear taps stay inside it too.
    box = torch.tensor([[0.0, w - 11, h - 11, w - 1, h - 1]])
    local = torch.tensor([[0.0, 1, 1, 11, 11]])
    big, ref = OPS[op](x, box, 2), OPS[op](small, local, 2)
    assert ref.abs().sum() > 0
    # Sample coordinates near 16384 round differently from those near 0 (float32 geometry).
    torch.testing.assert_close(big, ref, rtol=1e-2, atol=1e-2)
