"""Every op through the service equals the in-process roi_kernels call, bit for bit (CPU)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from conftest import random_boxes
from test_service_support import (
    OPS,
    assert_bitwise_equal,
    in_process_server,
    make_case,
    ragged_case,
    rotated_rois,
)

import roi_kernels
from roi_client import RoIClient, RoIError


@pytest.fixture(scope="module")
def server():
    with in_process_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with RoIClient(server.address, timeout=60) as c:
        yield c


@pytest.mark.parametrize("as_numpy", [False, True], ids=["torch", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_op_equals_in_process_call(client, seed, op, dtype, as_numpy):
    gen = torch.Generator().manual_seed(seed)
    for variant in range(2):
        case = make_case(op, gen, dtype, variant=variant, as_numpy=as_numpy)
        result = client.pool_with_timings(case.request)
        expected = case.expected()
        assert type(result.output) is type(expected), case.name
        assert_bitwise_equal(result.output, expected)
        t = result.timings
        assert t.queue_s >= 0 and t.compute_s > 0 and t.total_s >= t.compute_s
        assert t.batch_requests >= 1 and t.batch_boxes >= case.request.num_boxes


def test_ragged_maps_with_per_image_boxes(client, seed):
    gen = torch.Generator().manual_seed(seed)
    for dtype in ("float32", "bfloat16"):
        case = ragged_case(gen, dtype)
        assert_bitwise_equal(client.pool(case.request), case.expected())


def test_client_op_methods_take_the_kernels_arguments(client, seed):
    """The client's methods, with numpy arrays, against the same roi_kernels functions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 18, 20, 24, generator=gen)
    boxes = random_boxes(gen, 17, 320, 384, num_images=2)
    xn, bn = x.numpy(), boxes.numpy()

    assert_bitwise_equal(client.roi_align(xn, bn, 7, 1 / 16, 2, True), roi_kernels.roi_align(x, boxes, 7, 1 / 16, 2, True).numpy())
    assert_bitwise_equal(
        client.roi_align(xn, bn, (3, 4), 1 / 16, pool_mode="max"),
        roi_kernels.roi_align(x, boxes, (3, 4), 1 / 16, pool_mode="max").numpy(),
    )
    assert_bitwise_equal(client.roi_pool(xn, bn, 4, 1 / 16), roi_kernels.roi_pool(x, boxes, 4, 1 / 16).numpy())
    assert_bitwise_equal(client.ps_roi_align(xn, bn, 3, 1 / 16, 2), roi_kernels.ps_roi_align(x, boxes, 3, 1 / 16, 2).numpy())
    assert_bitwise_equal(client.ps_roi_pool(xn, bn, 3, 1 / 16), roi_kernels.ps_roi_pool(x, boxes, 3, 1 / 16).numpy())
    rois = rotated_rois(gen, 9, 320, 384, 2)
    assert_bitwise_equal(
        client.roi_align_rotated(xn, rois.numpy(), 5, 1 / 16, 2), roi_kernels.roi_align_rotated(x, rois, 5, 1 / 16, 2).numpy()
    )
    levels = [torch.randn(2, 6, 320 // s, 384 // s, generator=gen) for s in (4, 8, 16)]
    sizes = [(320, 384), (300, 380)]
    assert_bitwise_equal(
        client.multiscale_roi_align([lv.numpy() for lv in levels], bn, sizes, 7, 2, True),
        roi_kernels.multiscale_roi_align(levels, boxes, sizes, 7, 2, True).numpy(),
    )
    # Per-image box lists, and the boxes in float64 (the kernels round them to float32).
    per_image = [boxes[boxes[:, 0] == i, 1:].double() for i in range(2)]
    assert_bitwise_equal(
        client.roi_align(xn, [b.numpy() for b in per_image], 7, 1 / 16, 2, True),
        roi_kernels.roi_align(x, per_image, 7, 1 / 16, 2, True).numpy(),
    )


def test_out_dtype_and_wire_dtype(client, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 8, 16, 16, generator=gen)
    boxes = random_boxes(gen, 11, 256, 256)
    ref = roi_kernels.roi_align(x, boxes, 7, 1 / 16, 2, True)
    half = client.roi_align(x.numpy(), boxes.numpy(), 7, 1 / 16, 2, True, out_dtype="float16")
    assert half.dtype == np.float16
    assert_bitwise_equal(half, ref.half().numpy())
    # float32 maps sent as bfloat16 (rounded to nearest even), computed in bfloat16.
    got = client.roi_align(x, boxes, 7, 1 / 16, 2, True, wire_dtype="bfloat16")
    assert got.dtype == torch.bfloat16
    assert_bitwise_equal(got, roi_kernels.roi_align(x.bfloat16(), boxes, 7, 1 / 16, 2, True))


def test_zero_boxes_give_an_empty_result(client):
    x = np.random.default_rng().standard_normal((1, 5, 8, 8), dtype=np.float32)
    out = client.roi_align(x, np.zeros((0, 5), np.float32), (3, 2), 0.5)
    assert out.shape == (0, 5, 3, 2) and out.dtype == np.float32


def test_describe_and_health(client):
    info = client.describe()
    assert info.device == "cpu"
    assert set(info.ops) == set(OPS)
    assert set(info.dtypes) == {"float32", "float16", "bfloat16", "float64"}
    assert info.limits["max_message_bytes"] == 256 << 20
    assert info.version and info.torch_version == torch.__version__ and info.threads >= 1
    assert client.health() == "SERVING"
    assert client.health("roi.v1.RoIService") == "SERVING"
    with pytest.raises(RoIError) as err:
        client.health("no.such.Service")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
