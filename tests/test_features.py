"""Feature handles (UploadFeatures, PoolRequest.handle, ReleaseFeatures) against real servers
on real ports: every op through a handle equals the same op with inline maps and the kernels
in process, bit for bit; requests on several handles share a launch; time-to-live, eviction,
release, the per-token bound and isolation; re-uploads; chunked and shared-memory uploads;
the asyncio client; metrics; and a flood of concurrent (and broken) uploads that keeps the
store within its budget."""

from __future__ import annotations

import pytest
import torch
from conftest import random_boxes
from roi_client import RoIClient
from test_service_support import assert_bitwise_equal, in_process_server, rotated_rois

import roi_kernels

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@pytest.fixture(scope="module")
def server():
    with in_process_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with RoIClient(server.address, timeout=60) as c:
        yield c


def _maps(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_one_map_ops_through_a_handle_equal_inline_and_the_kernels(client, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    td = DTYPES[dtype]
    x = _maps(gen, (2, 18, 21, 26), td)
    boxes = random_boxes(gen, 23, 21 * 16, 26 * 16, num_images=2)
    rois = rotated_rois(gen, 11, 21 * 16, 26 * 16, 2)
    calls = [
        ("roi_align", (boxes, 7, 1 / 16, 2, True), (x, boxes, 7, 1 / 16, 2, True)),
        (
            "roi_align",
            (boxes, (3, 4), 1 / 16, -1, False, "max"),
            (x, boxes, (3, 4), 1 / 16, -1, False, "max"),
        ),
        ("roi_pool", (boxes, 4, 1 / 16), (x, boxes, 4, 1 / 16)),
        ("ps_roi_align", (boxes, 3, 1 / 16, 2), (x, boxes, 3, 1 / 16, 2)),
        ("ps_roi_pool", (boxes, 3, 1 / 16), (x, boxes, 3, 1 / 16)),
        ("roi_align_rotated", (rois, 5, 1 / 16, 2), (x, rois, 5, 1 / 16, 2)),
    ]
    with client.features(x) as fm:
        assert fm.kind == "map" and fm.nbytes == x.numel() * x.element_size() and not fm.closed
        for op, handle_args, kernel_args in calls:
            want = getattr(roi_kernels, op)(*kernel_args)
            got = getattr(fm, op)(*handle_args)
            assert_bitwise_equal(got, want)
            assert_bitwise_equal(getattr(client, op)(*kernel_args), want)
    assert fm.closed


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_ragged_maps_through_a_handle(client, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    td = DTYPES[dtype]
    sizes = [
        (int(torch.randint(8, 24, (1,), generator=gen)), int(torch.randint(8, 24, (1,), generator=gen)))
        for _ in range(3)
    ]
    maps = [_maps(gen, (10, h, w), td) for h, w in sizes]
    boxes = [
        random_boxes(gen, int(torch.randint(1, 12, (1,), generator=gen)), h * 16, w * 16)[:, 1:]
        for h, w in sizes
    ]
    want = roi_kernels.roi_align(maps, boxes, 4, 1 / 16, 2, True)
    with client.features(maps) as fm:
        assert fm.kind == "ragged"
        assert_bitwise_equal(fm.roi_align(boxes, 4, 1 / 16, 2, True), want)
        assert_bitwise_equal(client.roi_align(maps, boxes, 4, 1 / 16, 2, True), want)
        with pytest.raises(ValueError, match="only roi_align"):
            fm.roi_pool(boxes, 4, 1 / 16)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scales_from", ["image_sizes", "spatial_scales"])
def test_pyramid_through_a_handle(client, seed, dtype, scales_from):
    gen = torch.Generator().manual_seed(seed)
    td = DTYPES[dtype]
    h, w = 320, 384
    levels = [_maps(gen, (2, 6, h // s, w // s), td) for s in (4, 8, 16, 32)]
    sizes = [(h, w), (300, 380)]
    boxes = random_boxes(gen, 40, h, w, num_images=2)
    want = roi_kernels.multiscale_roi_align(levels, boxes, sizes, 7, 2, True)
    kwargs = (
        {"image_sizes": sizes}
        if scales_from == "image_sizes"
        else {"spatial_scales": roi_kernels.infer_scales(levels, sizes)}
    )
    with client.features(levels, **kwargs) as fm:
        assert fm.kind == "pyramid"
        assert_bitwise_equal(fm.multiscale_roi_align(boxes, 7, 2, True), want)
        assert_bitwise_equal(client.multiscale_roi_align(levels, boxes, sizes, 7, 2, True), want)
        with pytest.raises(ValueError, match="pyramid"):
            fm.roi_align(boxes, 7)
