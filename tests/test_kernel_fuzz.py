"""Property-based fuzzing of the kernels themselves (through the Python API, in process).

Hypothesis draws maps (every dtype, both layouts, empty channels and empty maps where the op
allows them), box sets (empty, inverted, outside the map, NaN, +-inf, huge and subnormal
coordinates, image indices in and out of range) and arguments (output sizes, sampling ratios,
spatial scales, aligned, pool modes). For every call:

* it returns, or raises only the documented error that names the argument (a box's image index
  out of range is the only bad input drawn here);
* the output has the documented shape, dtype and layout, and is finite (the maps are finite;
  non-finite box coordinates only make samples fall off the map);
* a box with a NaN coordinate pools to zeros (the documented result);
* boxes are independent: shuffling them shuffles the output rows, bit for bit (the CPU kernels
  group boxes by image and cut the work into tasks; no box may see another's);
* the layout does not change the result: a channels_last copy of the maps gives the same bits.

The service's fuzzing of requests over the wire lives elsewhere; this file keeps under ~40 s.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import roi_kernels

SETTINGS = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPECIAL = [0.0, -0.0, 0.5, -1.0, 1e-30, 1e30, -1e30, 3e38, -3e38, 1e300, NAN, INF, -INF]

# A coordinate: mostly on or near a small map (in image pixels), sometimes extreme.
coord = st.one_of(
    st.floats(-64.0, 640.0),
    st.sampled_from(SPECIAL),
    st.floats(allow_nan=True, allow_infinity=True),
)
scales = st.one_of(st.sampled_from([1 / 32, 1 / 16, 1 / 8, 0.25, 1.0, 2.5]), st.floats(1e-6, 1e6))
sampling_ratios = st.sampled_from([-1, 0, 1, 2, 3, 5, 16])
output_sizes = st.tuples(st.integers(1, 8), st.integers(1, 8))


def maps_strategy(min_side: int = 0):
    return st.fixed_dictionaries(
        dict(
            n=st.integers(1, 3),
            c=st.sampled_from([0, 1, 3, 8, 17, 70]),
            h=st.integers(min_side, 21),
            w=st.integers(min_side, 21),
            dtype=st.sampled_from(DTYPES),
            channels_last=st.booleans(),
            seed=st.integers(0, 2**31 - 1),
        )
    )


def boxes_strategy(cols: int):
    """Rows of (index slot, coordinates...): the slot is mapped to an image index later (mostly
    valid; slot 7 gives an index out of range, slot 8 a fractional one)."""
    return st.lists(st.tuples(st.integers(0, 8), *([coord] * cols)), min_size=0, max_size=10)


def make_maps(m, c=None):
    gen = torch.Generator().manual_seed(m["seed"])
    c = m["c"] if c is None else c
    x = torch.randn(m["n"], c, m["h"], m["w"], generator=gen).to(m["dtype"])
    return x.to(memory_format=torch.channels_last) if m["channels_last"] else x


def make_boxes(rows, n, dtype, cols=4):
    """Tensor[K, 1 + cols] and whether some image index is out of range."""
    bad = False
    data = []
    for slot, *coords in rows:
        if slot == 7:
            idx, bad = float(n), True
        elif slot == 8:
            idx = 0.5  # truncated to 0, as torchvision does
        else:
            idx = float(slot % n)
        data.append([idx, *coords])
    box_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor(data, dtype=box_dtype).reshape(-1, 1 + cols), bad


def other_layout(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return other_layout(x[None])[0]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.contiguous()
    return x.to(memory_format=torch.channels_last)


def check_call(fn, maps, boxes, bad_index: bool, index_name: str, expected_shape):
    """Runs fn(maps, boxes) and checks the properties of the module docstring."""
    if bad_index:
        with pytest.raises(RuntimeError, match=rf"{index_name}\[:, 0\] \(the image index\) must be in \[0, "):
            fn(maps, boxes)
        return
    out = fn(maps, boxes)
    ref = maps[0] if isinstance(maps, list) else maps
    assert out.shape == expected_shape
    assert out.dtype == ref.dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), "finite maps give finite outputs, whatever the boxes"
    nan_rows = torch.isnan(boxes[:, 1:]).any(1)
    assert (out[nan_rows] == 0).all(), "a box with a NaN coordinate pools to zeros"
    if boxes.shape[0] > 1:
        perm = torch.randperm(boxes.shape[0])
        assert torch.equal(fn(maps, boxes[perm]), out[perm]), "boxes are pooled independently"
    swapped = [other_layout(m) for m in maps] if isinstance(maps, list) else other_layout(maps)
    assert torch.equal(fn(swapped, boxes), out), "the layout does not change the result"


@SETTINGS
@given(maps_strategy(), boxes_strategy(4), output_sizes, scales, sampling_ratios, st.booleans(), st.sampled_from(["avg", "max"]))
def test_roi_align(m, rows, size, scale, ratio, aligned, mode):
    x = make_maps(m)
    boxes, bad = make_boxes(rows, m["n"], m["dtype"])

    def fn(x, b):
        return roi_kernels.roi_align(x, b, size, scale, ratio, aligned, mode)

    check_call(fn, x, boxes, bad, "boxes", (boxes.shape[0], m["c"], *size))


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 19), st.integers(0, 19)), min_size=1, max_size=9),
    st.sampled_from([0, 1, 5, 33]),
    st.sampled_from(DTYPES),
    st.integers(0, 2**31 - 1),
    boxes_strategy(4),
    output_sizes,
    scales,
    sampling_ratios,
    st.booleans(),
    st.sampled_from(["avg", "max"]),
)
def test_roi_align_ragged(sizes, c, dtype, seed, rows, size, scale, ratio, aligned, mode):
    """A ragged batch of maps of any sizes, zero included; more than 8 maps takes the path that
    passes the map table through device memory on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(c, h, w, generator=gen).to(dtype) for h, w in sizes]
    boxes, bad = make_boxes(rows, len(maps), dtype)

    def fn(maps, b):
        return roi_kernels.roi_align(maps, b, size, scale, ratio, aligned, mode)

    check_call(fn, maps, boxes, bad, "boxes", (boxes.shape[0], c, *size))


@SETTINGS
@given(
    st.tuples(st.integers(1, 22), st.integers(1, 22)),  # image sides in multiples of 32 (padded batches)
    st.sampled_from([(2, 3, 4, 5), (3, 4, 5), (2, 3), (4,)]),
    st.sampled_from([1, 4, 16]),
    st.sampled_from(DTYPES),
    st.booleans(),
    st.integers(0, 2**31 - 1),
    boxes_strategy(4),
    output_sizes,
    sampling_ratios,
    st.booleans(),
    st.sampled_from(["avg", "max"]),
    st.integers(1, 600),
)
def test_multiscale_roi_align(image, levels, c, dtype, channels_last, seed, rows, size, ratio, aligned, mode, canonical):
    gen = torch.Generator().manual_seed(seed)
    ih, iw = 32 * image[0], 32 * image[1]
    maps = [
        torch.randn(2, c, math.ceil(ih / 2**k), math.ceil(iw / 2**k), generator=gen).to(dtype) for k in levels
    ]
    if channels_last:
        maps = [m.to(memory_format=torch.channels_last) for m in maps]
    boxes, bad = make_boxes(rows, 2, dtype)
    sizes = [(ih, iw), (ih // 2 + 1, iw)]

    def fn(maps, b):
        return roi_kernels.multiscale_roi_align(maps, b, sizes, size, ratio, aligned, canonical, 4, mode)

    check_call(fn, maps, boxes, bad, "boxes", (boxes.shape[0], c, *size))


@SETTINGS
@given(maps_strategy(), boxes_strategy(4), output_sizes, scales)
def test_roi_pool(m, rows, size, scale):
    x = make_maps(m)
    boxes, bad = make_boxes(rows, m["n"], m["dtype"])

    def fn(x, b):
        return roi_kernels.roi_pool(x, b, size, scale)

    check_call(fn, x, boxes, bad, "boxes", (boxes.shape[0], m["c"], *size))


@SETTINGS
@given(maps_strategy(), st.integers(0, 3), boxes_strategy(4), output_sizes, scales, sampling_ratios, st.booleans())
def test_ps_ops(m, c_out, rows, size, scale, ratio, use_align):
    x = make_maps(m, c=c_out * size[0] * size[1])
    boxes, bad = make_boxes(rows, m["n"], m["dtype"])

    def fn(x, b):
        if use_align:
            return roi_kernels.ps_roi_align(x, b, size, scale, ratio)
        return roi_kernels.ps_roi_pool(x, b, size, scale)

    check_call(fn, x, boxes, bad, "boxes", (boxes.shape[0], c_out, *size))


@SETTINGS
@given(maps_strategy(), boxes_strategy(5), output_sizes, scales, sampling_ratios, st.booleans())
def test_roi_align_rotated(m, rows, size, scale, ratio, aligned):
    x = make_maps(m)
    rois, bad = make_boxes(rows, m["n"], m["dtype"], cols=5)

    def fn(x, r):
        return roi_kernels.roi_align_rotated(x, r, size, scale, ratio, aligned)

    check_call(fn, x, rois, bad, "rois", (rois.shape[0], m["c"], *size))


@SETTINGS
@given(maps_strategy(min_side=1), st.lists(st.tuples(coord, coord, coord, coord), min_size=1, max_size=6))
def test_boxes_as_lists_equal_boxes_as_a_tensor(m, rows):
    """list[Tensor[L_i, 4]] (torchvision's convention) is the tensor form with the image index
    of each list position, for every op that takes boxes."""
    x = make_maps(m, c=4)
    per_image = [torch.tensor(rows[i :: m["n"]], dtype=torch.float32).reshape(-1, 4) for i in range(m["n"])]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(per_image)])
    for fn in (
        lambda b: roi_kernels.roi_align(x, b, 2, 0.5, 2, True),
        lambda b: roi_kernels.roi_pool(x, b, 2, 0.5),
        lambda b: roi_kernels.ps_roi_align(x, b, (2, 1), 0.5, -1),
        lambda b: roi_kernels.ps_roi_pool(x, b, (1, 2), 0.5),
    ):
        assert torch.equal(fn(per_image), fn(rois))
