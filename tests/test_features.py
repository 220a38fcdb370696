"""Feature handles (UploadFeatures, PoolRequest.handle, ReleaseFeatures) against real servers
on real ports: every op through a handle equals the same op with inline maps and the kernels
in process, bit for bit; requests on several handles share a launch; time-to-live, eviction,
release, the per-token bound and isolation; re-uploads; chunked and shared-memory uploads;
the asyncio client; metrics; and a flood of concurrent (and broken) uploads that keeps the
store within its budget."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import fuzz_requests
import grpc
import numpy as np
import pytest
import torch
import torchvision.ops as tv_ops
from conftest import random_boxes
from fuzz_requests import UploadCase, classify_upload, random_upload
from roi_client import AsyncRoIClient, EncodedRequest, FeatureHandleGone, RoIClient, RoIError, codec
from roi_client._proto.roi.v1 import roi_pb2
from roi_client.channel import call_metadata
from roi_client.features import RELEASE, UPLOAD
from roi_server import features as features_module
from roi_server.features import FeatureStore
from roi_server.server import BackgroundServer
from roi_server.settings import Settings, load_settings
from test_service_support import (
    assert_bitwise_equal,
    in_process_server,
    registry_value,
    rotated_rois,
    sample,
    scrape,
    server_settings,
)

import roi_kernels

TOKEN_A = "token-a-for-feature-handles-0123456789"
TOKEN_B = "token-b-for-feature-handles-9876543210"

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


def test_float32_handles_equal_torchvision(client, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _maps(gen, (2, 18, 21, 26), torch.float32)
    boxes = random_boxes(gen, 31, 21 * 16, 26 * 16, num_images=2)
    with client.features(x.numpy()) as fm:
        got = fm.roi_align(boxes.numpy(), 7, 1 / 16, 2, True)
        assert isinstance(got, np.ndarray)
        assert_bitwise_equal(got, tv_ops.roi_align(x, boxes, 7, 1 / 16, 2, True))
        assert_bitwise_equal(fm.roi_pool(boxes.numpy(), 5, 1 / 16), tv_ops.roi_pool(x, boxes, 5, 1 / 16))
        assert_bitwise_equal(
            fm.ps_roi_align(boxes.numpy(), 3, 1 / 16, 2), tv_ops.ps_roi_align(x, boxes, 3, 1 / 16, 2)
        )
        assert_bitwise_equal(
            fm.ps_roi_pool(boxes.numpy(), 3, 1 / 16), tv_ops.ps_roi_pool(x, boxes, 3, 1 / 16)
        )
    h, w = 256, 320
    levels = {
        f"p{i}": _maps(gen, (2, 8, h // s, w // s), torch.float32) for i, s in enumerate((4, 8, 16, 32))
    }
    sizes = [(h, w), (240, 300)]
    per_image = [random_boxes(gen, 13, hh, ww)[:, 1:] for hh, ww in sizes]
    pooler = tv_ops.MultiScaleRoIAlign(list(levels), 7, 2)
    want = pooler(levels, per_image, sizes)
    with client.features(list(levels.values()), image_sizes=sizes) as fm:
        assert_bitwise_equal(fm.multiscale_roi_align(per_image, 7, 2), want)


def test_many_requests_on_one_handle(client, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _maps(gen, (3, 16, 24, 30), torch.float32)
    with client.features(x) as fm:
        for k in (1, 7, 0, 100, 3):
            boxes = random_boxes(gen, k, 24 * 8, 30 * 8, num_images=3)
            assert_bitwise_equal(
                fm.roi_align(boxes, 5, 1 / 8, 2), roi_kernels.roi_align(x, boxes, 5, 1 / 8, 2)
            )
            assert_bitwise_equal(fm.roi_pool(boxes, 3, 1 / 8), roi_kernels.roi_pool(x, boxes, 3, 1 / 8))
        # Out-of-range image indices are refused as for inline maps.
        with pytest.raises(RoIError) as err:
            fm.roi_align(torch.tensor([[3, 0.0, 0.0, 5.0, 5.0]]), 2)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "image index" in err.value.details


def _handle_request(handle: str, boxes, op: str = "roi_align", **params) -> EncodedRequest:
    return EncodedRequest.build(op, handle=handle, boxes=boxes, output_size=2, out_dtype="float32", **params)


def test_requests_on_several_handles_and_inline_share_one_launch(seed):
    gen = torch.Generator().manual_seed(seed)
    with (
        in_process_server(max_wait_ms=300, inline_max_samples=0) as srv,
        RoIClient(srv.address, timeout=60) as client,
    ):
        maps = [_maps(gen, (1 + i % 2, 8, 12 + i, 14), torch.float32) for i in range(4)]
        handles = [client.features(m) for m in maps]
        boxes = [random_boxes(gen, 5, (12 + i) * 4, 56, num_images=1 + i % 2) for i in range(4)]
        inline = _maps(gen, (1, 8, 10, 10), torch.float32)
        inline_boxes = random_boxes(gen, 4, 40, 40)
        batches = registry_value(srv, "roi_batches_total", op="roi_align")
        requests = [
            _handle_request(h.handle, b, spatial_scale=0.25, sampling_ratio=2) for h, b in zip(handles, boxes)
        ]
        requests.append(EncodedRequest.roi_align(inline, inline_boxes, 2, 0.25, 2))
        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(client.pool_with_timings, requests))
        for r, m, b in zip(results, maps, boxes):
            assert_bitwise_equal(r.output, roi_kernels.roi_align(m, b, 2, 0.25, 2))
        assert_bitwise_equal(results[-1].output, roi_kernels.roi_align(inline, inline_boxes, 2, 0.25, 2))
        # Fewer launches than requests, and the answers say which requests ran together.
        launches = registry_value(srv, "roi_batches_total", op="roi_align") - batches
        assert launches < len(requests)
        assert max(r.timings.batch_requests for r in results) >= 2
        assert len({r.timings.batch_id for r in results}) == launches
        for h in handles:
            h.release()


def _expect_refusal(call, code: grpc.StatusCode, *words: str) -> RoIError:
    with pytest.raises(RoIError) as info:
        call()
    err = info.value
    assert err.code == code, err
    for w in words:
        assert w in err.details, (w, err.details)
    return err


def test_time_to_live_release_and_failed_precondition_naming_the_handle(client, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _maps(gen, (1, 4, 10, 10), torch.float32)
    boxes = random_boxes(gen, 3, 10, 10)
    fm = client.features(x, ttl=0.5, keep=False)
    assert 0 < fm.ttl_s <= 0.5 and fm.expires_at > time.time()
    # Each use refreshes the time-to-live.
    for _ in range(4):
        time.sleep(0.2)
        assert_bitwise_equal(fm.roi_align(boxes, 2), roi_kernels.roi_align(x, boxes, 2))
    time.sleep(1.0)
    err = _expect_refusal(
        lambda: fm.roi_align(boxes, 2), grpc.StatusCode.FAILED_PRECONDITION, fm.handle, "expired"
    )
    assert isinstance(err, FeatureHandleGone)
    fm.release()
    fm.release()  # idempotent
    with pytest.raises(ValueError, match="released"):
        fm.roi_align(boxes, 2)

    fm = client.features(x)
    handle = fm.handle
    fm.release()
    assert fm.closed
    _expect_refusal(
        lambda: client.pool(_handle_request(handle, boxes)),
        grpc.StatusCode.FAILED_PRECONDITION,
        handle,
        "released",
    )
    _expect_refusal(
        lambda: client.pool(_handle_request("no-such-handle", boxes)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no-such-handle",
        "unknown",
    )
    assert release_rpc(client, handle) is False


def release_rpc(client: RoIClient, handle: str, token: str | None = None) -> bool:
    call = client._channel.unary_unary(RELEASE)
    metadata = call_metadata(token) if token is not None else client._metadata
    raw = call(
        roi_pb2.ReleaseFeaturesRequest(handle=handle).SerializeToString(), timeout=10, metadata=metadata
    )
    return roi_pb2.ReleaseFeaturesResponse.FromString(raw).released


def test_eviction_takes_the_least_recently_used_handle_and_reupload_brings_it_back(seed):
    gen = torch.Generator().manual_seed(seed)
    one = 4 * 16 * 32 * 32  # bytes of one [1, 16, 32, 32] float32 map
    with (
        in_process_server(feature_store_bytes=3 * one + 100) as srv,
        RoIClient(srv.address, timeout=60) as client,
    ):
        maps = [_maps(gen, (1, 16, 32, 32), torch.float32) for _ in range(4)]
        boxes = random_boxes(gen, 6, 32, 32)
        a, b, c = (client.features(m, keep=False) for m in maps[:3])
        a.roi_align(boxes, 2)  # a is now more recently used than b
        b_handle = b.handle
        d = client.features(maps[3], keep=False)
        assert registry_value(srv, "roi_feature_evictions_total") == 1
        assert registry_value(srv, "roi_feature_store_bytes") == 3 * one
        for fm, m in ((a, maps[0]), (c, maps[2]), (d, maps[3])):
            assert_bitwise_equal(fm.roi_align(boxes, 2), roi_kernels.roi_align(m, boxes, 2))
        _expect_refusal(
            lambda: b.roi_align(boxes, 2), grpc.StatusCode.FAILED_PRECONDITION, b_handle, "evicted"
        )

        # Kept arrays: the client uploads them again by itself and retries once.
        e = client.features(maps[1])
        first = e.handle
        for _ in range(3):  # each upload evicts the least recently used of a, c, d
            client.features(_maps(gen, (1, 16, 32, 32), torch.float32), keep=False)
        assert_bitwise_equal(e.roi_align(boxes, 2), roi_kernels.roi_align(maps[1], boxes, 2))
        assert e.handle != first
        # And after a release on the server (by another copy of the handle, say).
        assert release_rpc(client, e.handle)
        second = e.handle
        assert_bitwise_equal(e.roi_pool(boxes, 2), roi_kernels.roi_pool(maps[1], boxes, 2))
        assert e.handle != second
        assert registry_value(srv, "roi_feature_misses_total", reason="released") >= 1
        assert registry_value(srv, "roi_feature_misses_total", reason="evicted") >= 2


def test_uploads_beyond_the_budget_or_the_callers_bound_and_cross_token_isolation(seed, tmp_path):
    gen = torch.Generator().manual_seed(seed)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    one = 4 * 8 * 32 * 32  # bytes of one [1, 8, 32, 32] float32 map
    budget = 10 * one
    with (
        in_process_server(
            feature_store_bytes=budget, feature_store_caller_bytes=5 * one, auth_token_file=str(tokens)
        ) as srv,
        RoIClient(srv.address, timeout=60, token=TOKEN_A) as a,
        RoIClient(srv.address, timeout=60, token=TOKEN_B) as b,
    ):
        info = roi_pb2.DescribeResponse.FromString(a._describe_raw(10)).feature_store
        assert (
            info.enabled
            and info.budget_bytes == budget
            and info.caller_bytes == 5 * one
            and info.ttl_seconds == 300
        )
        boxes = random_boxes(gen, 5, 32, 32)
        _expect_refusal(
            lambda: a.features(_maps(gen, (11, 8, 32, 32), torch.float32)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            str(budget),
        )
        _expect_refusal(
            lambda: a.features(_maps(gen, (6, 8, 32, 32), torch.float32)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            str(5 * one),
            "--feature-store-caller-bytes",
        )
        mine = [_maps(gen, (2, 8, 32, 32), torch.float32) for _ in range(3)]
        theirs = _maps(gen, (4, 8, 32, 32), torch.float32)
        fb = b.features(theirs, keep=False)
        fa = [a.features(m, keep=False) for m in mine]
        # A's third upload evicted A's first (its bound), never B's handle.
        assert registry_value(srv, "roi_feature_store_bytes") == 4 * one + 4 * one
        _expect_refusal(lambda: fa[0].roi_align(boxes, 2), grpc.StatusCode.FAILED_PRECONDITION, "evicted")
        assert_bitwise_equal(fb.roi_align(boxes, 2), roi_kernels.roi_align(theirs, boxes, 2))
        # Another token's handle is unknown to B, exactly as one that never existed.
        err = _expect_refusal(
            lambda: b.pool(_handle_request(fa[1].handle, boxes)),
            grpc.StatusCode.FAILED_PRECONDITION,
            fa[1].handle,
        )
        assert "unknown" in err.details and "evicted" not in err.details
        assert release_rpc(b, fa[1].handle) is False
        assert_bitwise_equal(fa[1].roi_align(boxes, 2), roi_kernels.roi_align(mine[1], boxes, 2))
        assert release_rpc(a, fa[1].handle) is True


def test_feature_handles_off_is_failed_precondition(seed):
    with in_process_server(feature_store_bytes=0) as srv, RoIClient(srv.address, timeout=60) as client:
        x = torch.randn(1, 4, 8, 8)
        _expect_refusal(lambda: client.features(x), grpc.StatusCode.FAILED_PRECONDITION, "off")
        raw = roi_pb2.UploadFeaturesRequest(input=codec.encode_tensor(x.numpy())).SerializeToString()
        call = client._channel.stream_unary(UPLOAD)
        with pytest.raises(grpc.RpcError) as err:
            call(iter([raw]), timeout=10)
        assert (
            err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "--feature-store-bytes" in err.value.details()
        )
        _expect_refusal(
            lambda: client.pool(_handle_request("h", torch.zeros(1, 5))),
            grpc.StatusCode.FAILED_PRECONDITION,
            "off",
        )


def test_an_upload_larger_than_one_message_goes_in_chunks_of_whole_images(seed):
    gen = torch.Generator().manual_seed(seed)
    limit = 256 << 10
    with in_process_server(max_message_bytes=limit) as srv, RoIClient(srv.address, timeout=60) as client:
        x = _maps(gen, (12, 16, 40, 48), torch.float32)  # 123 KiB per image, 1.4 MiB in all
        boxes = random_boxes(gen, 30, 40 * 8, 48 * 8, num_images=12)
        _expect_refusal(lambda: client.roi_align(x, boxes, 3, 1 / 8), grpc.StatusCode.RESOURCE_EXHAUSTED)
        received = registry_value(srv, "roi_received_bytes_total")
        with client.features(x) as fm:
            assert fm.nbytes == x.numel() * 4
            assert_bitwise_equal(
                fm.roi_align(boxes, 3, 1 / 8, 2), roi_kernels.roi_align(x, boxes, 3, 1 / 8, 2)
            )
        assert registry_value(srv, "roi_received_bytes_total") - received >= x.numel() * 4
        # A pyramid whose largest image comes in the last message: the scales are inferred
        # over every image, as torchvision does.
        h, w = 256, 192
        levels = [_maps(gen, (6, 8, h // s, w // s), torch.float16) for s in (4, 8, 16)]
        sizes = [(160, 120)] * 5 + [(h, w)]
        boxes = random_boxes(gen, 25, 160, 120, num_images=6)
        with client.features(levels, image_sizes=sizes) as fm:
            assert_bitwise_equal(
                fm.multiscale_roi_align(boxes, 4, 2),
                roi_kernels.multiscale_roi_align(levels, boxes, sizes, 4, 2),
            )
        # One image larger than a message is refused by the client, naming the limit.
        _expect_refusal(
            lambda: client.features(_maps(gen, (1, 64, 40, 48), torch.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image 0",
        )


def test_upload_through_shared_memory(seed):
    gen = torch.Generator().manual_seed(seed)
    with (
        in_process_server(allow_shared_memory=True) as srv,
        RoIClient(srv.address, timeout=60, shared_memory=True) as client,
    ):
        x = _maps(gen, (2, 32, 40, 48), torch.float32)  # 480 KiB
        boxes = random_boxes(gen, 20, 40 * 8, 48 * 8, num_images=2)
        received = registry_value(srv, "roi_received_bytes_total")
        with client.features(x) as fm:
            sent = registry_value(srv, "roi_received_bytes_total") - received
            assert sent < 4096, sent  # the maps came as a reference to a region
            client.shared_memory.close()  # the store holds a copy of its own
            assert_bitwise_equal(
                fm.roi_align(boxes, 3, 1 / 8, 2), roi_kernels.roi_align(x, boxes, 3, 1 / 8, 2)
            )
            # The server's store holds the maps it copied out of the region.
            assert registry_value(srv, "roi_feature_store_bytes") == x.numel() * 4

        async def through_asyncio():
            async with AsyncRoIClient(srv.address, timeout=60, shared_memory=True) as aclient:
                received = registry_value(srv, "roi_received_bytes_total")
                async with await aclient.features(x) as fm:
                    sent = registry_value(srv, "roi_received_bytes_total") - received
                    return sent, await fm.roi_align(boxes, 3, 1 / 8, 2)

        sent, got = asyncio.run(through_asyncio())
        assert sent < 4096, sent
        assert_bitwise_equal(got, roi_kernels.roi_align(x, boxes, 3, 1 / 8, 2))


def test_the_asyncio_client(server, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _maps(gen, (2, 8, 20, 24), torch.float32)
    levels = [_maps(gen, (2, 8, 128 // s, 160 // s), torch.float32) for s in (4, 8, 16)]
    sizes = [(128, 160), (120, 150)]
    boxes = [random_boxes(gen, k, 128, 160, num_images=2) for k in (3, 9, 17)]

    async def main():
        async with AsyncRoIClient(server.address, timeout=60) as aclient:
            fm = await aclient.features(x)
            async with fm:
                outs = await asyncio.gather(*(fm.roi_align(b, 3, 1 / 8, 2) for b in boxes))
                # Released on the server: the next call uploads again by itself.
                call = aclient._channel.unary_unary(RELEASE)
                await call(roi_pb2.ReleaseFeaturesRequest(handle=fm.handle).SerializeToString(), timeout=10)
                again = await fm.roi_pool(boxes[0], 2, 1 / 8)
            assert fm.closed
            pyramid = await aclient.features(levels, image_sizes=sizes, keep=False)
            async with pyramid:
                multi = await pyramid.multiscale_roi_align(boxes[2], 5, 2)
                with pytest.raises(ValueError, match="pyramid"):
                    pyramid.roi_align(boxes[0], 2)
            return outs, again, multi

    outs, again, multi = asyncio.run(main())
    for got, b in zip(outs, boxes):
        assert_bitwise_equal(got, roi_kernels.roi_align(x, b, 3, 1 / 8, 2))
    assert_bitwise_equal(again, roi_kernels.roi_pool(x, boxes[0], 2, 1 / 8))
    assert_bitwise_equal(multi, roi_kernels.multiscale_roi_align(levels, boxes[2], sizes, 5, 2))


def test_metrics_on_the_http_endpoint(seed):
    gen = torch.Generator().manual_seed(seed)
    with in_process_server(feature_store_bytes=1 << 20) as srv, RoIClient(srv.address, timeout=60) as client:
        x = _maps(gen, (1, 8, 16, 16), torch.float32)
        boxes = random_boxes(gen, 3, 16, 16)
        fms = [client.features(x, keep=False) for _ in range(3)]
        for fm in fms:
            fm.roi_align(boxes, 2)
        fms[0].roi_align(boxes, 2)
        gone = fms[1].handle
        fms[1].release()
        for h in (gone, "never-uploaded"):
            with pytest.raises(RoIError):
                client.pool(_handle_request(h, boxes))
        with pytest.raises(RoIError):
            client.features(_maps(gen, (40, 8, 32, 32), torch.float32))  # above the budget
        s = scrape(srv.metrics_url)
        assert sample(s, "roi_feature_store_bytes") == 2 * x.numel() * 4
        assert sample(s, "roi_feature_store_budget_bytes") == 1 << 20
        assert sample(s, "roi_feature_store_handles") == 2
        assert sample(s, "roi_feature_hits_total") == 4
        assert sample(s, "roi_feature_misses_total", reason="released") == 1
        assert sample(s, "roi_feature_misses_total", reason="unknown") == 1
        assert sample(s, "roi_feature_uploads_total", code="OK") == 3
        assert sample(s, "roi_feature_uploads_total", code="RESOURCE_EXHAUSTED") == 1
        assert sample(s, "roi_feature_evictions_total") == 0


def test_a_flood_of_concurrent_and_broken_uploads_keeps_the_store_within_its_budget(seed):
    """Eight clients upload at once, valid uploads (some larger than the budget) and broken
    ones (tests/fuzz_requests.py); the store's bytes, scraped all along, never pass the
    budget, every answer obeys classify_upload, and the server serves plain requests after."""
    rng = np.random.default_rng(seed)
    budget = 96 << 10
    cases = [random_upload(rng, max_side=40) for _ in range(240)]
    assert any(c.valid and c.nbytes > budget for c in cases) and any(c.must_fail for c in cases)
    with in_process_server(feature_store_bytes=budget, feature_ttl=5.0) as srv:
        seen: list[float] = []
        done = threading.Event()

        def scraper() -> None:
            while not done.is_set():
                seen.append(sample(scrape(srv.metrics_url), "roi_feature_store_bytes"))

        def send(part: list[UploadCase]) -> list[str]:
            outcomes = []
            with grpc.insecure_channel(srv.address) as channel:
                call = channel.stream_unary(UPLOAD)
                release = channel.unary_unary(RELEASE)
                for case in part:
                    try:
                        raw = call(iter(case.messages), timeout=30)
                    except grpc.RpcError as exc:
                        outcomes.append(classify_upload(case, exc.code(), exc.details() or "", None))
                        continue
                    outcomes.append(classify_upload(case, grpc.StatusCode.OK, "", raw))
                    if rng.random() < 0.3:
                        handle = roi_pb2.UploadFeaturesResponse.FromString(raw).handle
                        release(roi_pb2.ReleaseFeaturesRequest(handle=handle).SerializeToString(), timeout=10)
            return outcomes

        watcher = threading.Thread(target=scraper)
        watcher.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                outcomes = [o for part in pool.map(send, [cases[i::8] for i in range(8)]) for o in part]
        finally:
            done.set()
            watcher.join()
        assert len(seen) >= 3 and max(seen) <= budget, (len(seen), max(seen))
        assert {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} <= set(outcomes), set(outcomes)
        assert registry_value(srv, "roi_feature_store_bytes") <= budget
        assert registry_value(srv, "roi_feature_evictions_total") > 0
        with RoIClient(srv.address, timeout=60) as client:
            gen = torch.Generator().manual_seed(seed)
            x = _maps(gen, (2, 8, 16, 16), torch.float32)
            boxes = random_boxes(gen, 9, 64, 64, num_images=2)
            want = roi_kernels.roi_align(x, boxes, 3, 0.25, 2)
            assert_bitwise_equal(client.roi_align(x, boxes, 3, 0.25, 2), want)
            with client.features(x) as fm:
                assert_bitwise_equal(fm.roi_align(boxes, 3, 0.25, 2), want)


def _upload_raw(client: RoIClient, messages: list[roi_pb2.UploadFeaturesRequest]) -> RoIError | None:
    call = client._channel.stream_unary(UPLOAD)
    try:
        call(iter([m.SerializeToString() for m in messages]), timeout=10)
    except grpc.RpcError as exc:
        return RoIError.from_rpc_error(exc)
    return None


def _t(shape, dtype=roi_pb2.DTYPE_FLOAT32) -> roi_pb2.Tensor:
    size = {roi_pb2.DTYPE_FLOAT32: 4, roi_pb2.DTYPE_FLOAT16: 2, roi_pb2.DTYPE_FLOAT64: 8}[dtype]
    n = int(np.prod(shape))
    data = np.random.default_rng(n).standard_normal(n).astype(codec.WIRE_DTYPES[dtype]).tobytes()
    assert len(data) == n * size
    return roi_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def _level(shape, scale=None, dtype=roi_pb2.DTYPE_FLOAT32) -> roi_pb2.FeatureLevel:
    lv = roi_pb2.FeatureLevel(map=_t(shape, dtype))
    if scale is not None:
        lv.spatial_scale = scale
    return lv


U = roi_pb2.UploadFeaturesRequest
BAD_UPLOADS = {
    "rank": ([U(input=_t((2, 3, 4)))], "input.shape", "[N, C, H, W]"),
    "short data": (
        [U(input=roi_pb2.Tensor(dtype=1, shape=[1, 2, 3, 4], data=bytes(8)))],
        "input.data",
        "96 bytes",
    ),
    "unknown dtype": (
        [U(input=roi_pb2.Tensor(dtype=9, shape=[1, 1, 1, 1], data=bytes(4)))],
        "input.dtype",
        "unknown",
    ),
    "zero size": ([U(input=roi_pb2.Tensor(dtype=1, shape=[1, 0, 3, 3]))], "input.shape", "positive"),
    "no features": ([U(ttl_seconds=5)], "features", "message 0"),
    "negative ttl": ([U(input=_t((1, 2, 3, 3)), ttl_seconds=-1)], "ttl_seconds", ">= 0"),
    "kinds mixed": (
        [U(input=_t((1, 2, 3, 3))), U(ragged=roi_pb2.RaggedMaps(maps=[_t((2, 3, 3))]))],
        "ragged",
        "message 1",
    ),
    "channels across messages": (
        [U(input=_t((1, 2, 3, 3))), U(input=_t((1, 3, 3, 3)))],
        "input.shape",
        "2 channels",
    ),
    "dtype across messages": (
        [U(input=_t((1, 2, 3, 3))), U(input=_t((1, 2, 3, 3), roi_pb2.DTYPE_FLOAT16))],
        "input.dtype",
        "float32, got float16",
    ),
    "map size across messages": (
        [U(input=_t((1, 2, 3, 3))), U(input=_t((1, 2, 4, 3)))],
        "input.shape",
        "(H, W)",
    ),
    "ragged channels": (
        [U(ragged=roi_pb2.RaggedMaps(maps=[_t((2, 3, 3)), _t((4, 3, 3))]))],
        "ragged.maps[1].shape",
        "2 channels",
    ),
    "level N": (
        [U(pyramid=roi_pb2.FeaturePyramid(levels=[_level((2, 2, 8, 8), 0.25), _level((1, 2, 4, 4), 0.125)]))],
        "pyramid.levels[1].map.shape",
        "N of levels[0]",
    ),
    "scales not halving": (
        [U(pyramid=roi_pb2.FeaturePyramid(levels=[_level((1, 2, 8, 8), 0.25), _level((1, 2, 4, 4), 0.25)]))],
        "pyramid.levels[1].spatial_scale",
        "powers of 1/2",
    ),
    "scales on some levels": (
        [U(pyramid=roi_pb2.FeaturePyramid(levels=[_level((1, 2, 8, 8), 0.25), _level((1, 2, 4, 4))]))],
        "pyramid.levels.spatial_scale",
        "every level",
    ),
    "image sizes missing": (
        [
            U(
                pyramid=roi_pb2.FeaturePyramid(
                    levels=[_level((2, 2, 8, 8))], image_sizes=[roi_pb2.ImageSize(height=32, width=32)]
                )
            )
        ],
        "pyramid.image_sizes",
        "one per image",
    ),
    "levels across messages": (
        [
            U(
                pyramid=roi_pb2.FeaturePyramid(
                    levels=[_level((1, 2, 8, 8), 0.25), _level((1, 2, 4, 4), 0.125)]
                )
            ),
            U(pyramid=roi_pb2.FeaturePyramid(levels=[_level((1, 2, 8, 8), 0.25)])),
        ],
        "pyramid.levels",
        "2 levels",
    ),
    "shared memory off": (
        [
            U(
                input=roi_pb2.Tensor(
                    dtype=1,
                    shape=[1, 1, 1, 1],
                    shared_memory=roi_pb2.SharedMemoryRef(region="r", byte_size=4),
                )
            )
        ],
        "input.shared_memory",
        "shared memory is off",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_is_refused_naming_the_field_and_stores_nothing(server, client, case):
    messages, field, words = BAD_UPLOADS[case]
    before = registry_value(server, "roi_feature_store_bytes")
    err = _upload_raw(client, messages)
    assert err is not None, case
    expected = (
        grpc.StatusCode.FAILED_PRECONDITION
        if case == "shared memory off"
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert err.code == expected, err
    assert err.details.startswith(field) and words in err.details, err.details
    assert registry_value(server, "roi_feature_store_bytes") == before
    assert _upload_raw(client, []).code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_settings_come_from_flags_and_variables():
    s = load_settings(
        ["--feature-store-bytes", "2_000_000", "--feature-ttl", "1.5"],
        {"ROI_FEATURE_STORE_CALLER_BYTES": "500000"},
    )
    assert (s.feature_store_bytes, s.feature_ttl, s.feature_store_caller_bytes) == (2_000_000, 1.5, 500_000)
    d = Settings()
    assert (d.feature_store_bytes, d.feature_ttl, d.feature_store_caller_bytes) == (1 << 30, 300.0, 0)
    for bad, words in (
        ({"feature_ttl": 0.0}, "feature_ttl"),
        ({"feature_store_bytes": -1}, "feature_store_bytes"),
        ({"feature_store_bytes": 10, "feature_store_caller_bytes": 11}, "feature_store_caller_bytes"),
    ):
        with pytest.raises(ValueError, match=words):
            Settings(**bad)


def test_stopping_the_server_answers_every_queued_request_on_a_handle(seed):
    gen = torch.Generator().manual_seed(seed)
    server = BackgroundServer(server_settings(max_wait_ms=500, inline_max_samples=0)).start()
    stopped = False
    try:
        with RoIClient(server.address, timeout=60) as client:
            x = _maps(gen, (2, 8, 16, 16), torch.float32)
            fm = client.features(x, keep=False)
            boxes = [random_boxes(gen, 4, 64, 64, num_images=2) for _ in range(6)]
            with ThreadPoolExecutor(len(boxes)) as pool:
                futures = [pool.submit(fm.roi_align, b, 2, 0.25) for b in boxes]
                time.sleep(0.2)  # queued, waiting for company
                server.stop(grace=10)
                stopped = True
                for f, b in zip(futures, boxes):
                    assert_bitwise_equal(f.result(), roi_kernels.roi_align(x, b, 2, 0.25))
        assert server.server.features.held_bytes == 0 and len(server.server.features) == 0
    finally:
        if not stopped:
            server.stop()


def test_threads_that_find_the_handle_gone_together_upload_it_once(client, server, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _maps(gen, (2, 8, 16, 16), torch.float32)
    boxes = [random_boxes(gen, 5, 64, 64, num_images=2) for _ in range(6)]
    with client.features(x) as fm:
        assert release_rpc(client, fm.handle)  # gone on the server, unknown to the client
        uploads = registry_value(server, "roi_feature_uploads_total", code="OK")
        with ThreadPoolExecutor(len(boxes)) as pool:
            outs = list(pool.map(lambda b: fm.roi_align(b, 2, 0.25, 2), boxes))
        for got, b in zip(outs, boxes):
            assert_bitwise_equal(got, roi_kernels.roi_align(x, b, 2, 0.25, 2))
        assert registry_value(server, "roi_feature_uploads_total", code="OK") - uploads == 1


def test_the_store_keeps_views_of_a_message_that_is_all_maps_and_copies_out_of_one_that_is_not(seed):
    """On the CPU an upload costs no copy: the maps stay views of the received bytes, which the
    store then holds; a message padded with other bytes (an unknown field) has its maps copied,
    so that the store never holds more than it counts."""
    gen = torch.Generator().manual_seed(seed)
    x = _maps(gen, (2, 16, 64, 64), torch.float32)  # 512 KiB: read by the zero-copy walker
    msg = roi_pb2.UploadFeaturesRequest(input=codec.encode_tensor(x.numpy()))
    junk = fuzz_requests.wire_field(99, 2, bytes(256 << 10))
    for raw, viewed in ((msg.SerializeToString(), True), (msg.SerializeToString() + junk, False)):
        store = FeatureStore(8 << 20, 60.0)
        up, res = features_module._Upload(), features_module._Reservation("")
        store._receive(raw, 0, up, res, None, "")
        kept = up.chunks[0][0]
        start = np.frombuffer(raw, np.uint8).ctypes.data
        inside = start <= kept.data_ptr() < start + len(raw)
        assert inside == viewed and res.nbytes == x.numel() * 4
        assert_bitwise_equal(kept, x)
