"""How the service behaves around the ops: batching, the stream, every error path, deadlines,
cancellation, metrics, health and reflection. Real servers on real ports.

Where a test says a request was *not* computed, it watches the engine's launches (the ids of
the requests each kernel call ran), so that the claim fails if the request ever reached a
kernel.
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
import torch
from conftest import random_boxes
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from test_service_support import (
    assert_bitwise_equal,
    in_process_server,
    make_case,
    registry_value,
    sample,
    scrape,
    slow_case,
)

import roi_kernels
from roi_client import AsyncRoIClient, EncodedRequest, RoIClient, RoIError
from roi_client._proto.roi.v1 import roi_pb2

POOL = "/roi.v1.RoIService/Pool"
# What must never reach a client: file paths, Python or C++ tracebacks.
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|\.cpp\b|\.h\b|(/[\w.\-]+){2,}|Exception raised from")


# ---------------------------------------------------------------------------------------------
# Helpers


class LaunchLog:
    """Records the request ids of every kernel launch of a server's engine."""

    def __init__(self, srv) -> None:
        self.engine = srv.server.engine
        self.ids: list[list[str]] = []
        self._lock = threading.Lock()
        self._original = self.engine.launch

    def __enter__(self) -> LaunchLog:
        def launch(reqs):
            with self._lock:
                self.ids.append([r.id for r in reqs])
            return self._original(reqs)

        self.engine.launch = launch
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.launch  # the instance attribute; the class's method shows again

    def launched(self) -> set[str]:
        with self._lock:
            return {i for batch in self.ids for i in batch}

    def wait_for(self, request_id: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while request_id not in self.launched():
            assert time.monotonic() < deadline, f"{request_id} was never launched"
            time.sleep(0.005)


def raw_pool(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(POOL)


def small_request(gen: torch.Generator, request_id: str = "", k: int = 5, channels: int = 6):
    x = torch.randn(1, channels, 10, 12, generator=gen)
    boxes = random_boxes(gen, k, 160, 192)
    req = EncodedRequest.roi_align(x, boxes, 3, 1 / 16, 2, True).with_id(request_id)
    return req, roi_kernels.roi_align(x, boxes, 3, 1 / 16, 2, True)


def base_message(gen: torch.Generator, op: str = "roi_align") -> roi_pb2.PoolRequest:
    case = make_case(op, gen)
    return roi_pb2.PoolRequest.FromString(case.request.payload)


def assert_clean(message: str) -> None:
    assert message, "an error without a message"
    assert not INTERNALS.search(message), f"internal detail in {message!r}"


# ---------------------------------------------------------------------------------------------
# Batching


@pytest.fixture(scope="module")
def server():
    with in_process_server() as srv:
        yield srv


def test_concurrent_requests_are_batched_each_with_its_own_result(server, seed):
    """While the device is busy, compatible requests gather into one batch; each still gets
    its own result."""
    gen = torch.Generator().manual_seed(seed)
    slow = slow_case(gen, 0.6)
    cases = []
    for i in range(24):
        # roi_align batches any map sizes (its ragged form); the box counts differ too.
        h, w = int(torch.randint(6, 20, (1,), generator=gen)), int(torch.randint(6, 20, (1,), generator=gen))
        x = torch.randn(int(torch.randint(1, 3, (1,), generator=gen)), 8, h, w, generator=gen)
        boxes = random_boxes(gen, int(torch.randint(1, 30, (1,), generator=gen)), h * 16, w * 16, num_images=x.shape[0])
        req = EncodedRequest.roi_align(x, boxes, (4, 3), 1 / 16, 2, True).with_id(f"r{i}")
        cases.append((req, roi_kernels.roi_align(x, boxes, (4, 3), 1 / 16, 2, True)))
    before = scrape(server.metrics_url)

    async def run():
        async with AsyncRoIClient(server.address, timeout=60) as client:
            busy = asyncio.ensure_future(client.pool_with_timings(slow.request))
            await asyncio.sleep(0.15)
            results = await asyncio.gather(*(client.pool_with_timings(req) for req, _ in cases))
            return await busy, results

    slow_result, results = asyncio.run(run())
    assert_bitwise_equal(slow_result.output, slow.reference)
    for (req, want), got in zip(cases, results):
        assert got.id == req.id
        assert_bitwise_equal(got.output, want)
    sizes = [r.timings.batch_requests for r in results]
    assert max(sizes) > 1, sizes
    # The requests that shared a batch agree on its id, size and boxes.
    by_batch: dict[int, list] = {}
    for (req, _), got in zip(cases, results):
        by_batch.setdefault(got.timings.batch_id, []).append((req, got))
    for members in by_batch.values():
        assert len({g.timings.batch_requests for _, g in members}) == 1
        assert members[0][1].timings.batch_requests == len(members)
        assert members[0][1].timings.batch_boxes == sum(r.num_boxes for r, _ in members)

    after = scrape(server.metrics_url)
    d = lambda name, **labels: sample(after, name, **labels) - sample(before, name, **labels)  # noqa: E731
    # The histogram on /metrics: 25 requests (the slow one alone), fewer batches, some > 1.
    assert d("roi_batch_requests_sum") == 25
    assert d("roi_batch_requests_count") == len(by_batch) + 1 < 25
    assert d("roi_batch_requests_bucket", le="1.0") < d("roi_batch_requests_count")
    assert d("roi_batch_boxes_sum") == 16 + sum(r.num_boxes for r, _ in cases)
    assert d("roi_requests_total", op="roi_align", code="OK") == 25


def test_incompatible_requests_are_not_mixed(server, seed):
    """Different ops, parameters, dtypes and channel counts sent together: each comes back as
    its in-process result."""
    gen = torch.Generator().manual_seed(seed)
    cases = [make_case(op, gen, dtype, variant=v) for op in ("roi_align", "roi_pool", "ps_roi_align")
             for dtype in ("float32", "float16") for v in range(2)]
    cases = [(c.request.with_id(f"c{i}"), c) for i, c in enumerate(cases)]

    async def run():
        async with AsyncRoIClient(server.address, timeout=60) as client:
            return await asyncio.gather(*(client.pool(r) for r, _ in cases))

    for (_, case), got in zip(cases, asyncio.run(run())):
        assert_bitwise_equal(got, case.expected())


# ---------------------------------------------------------------------------------------------
# The stream


def test_stream_answers_every_id_once_with_its_own_result(server, seed):
    gen = torch.Generator().manual_seed(seed)
    sent, expected, bad = [], {}, set()
    ops = ("roi_align", "roi_pool", "ps_roi_pool", "roi_align_rotated", "multiscale_roi_align")
    for i in range(40):
        rid = f"req-{i:03d}-{seed % 1000}"
        if i % 9 == 4:
            # An invalid request in the middle: answered in band, with its id; the stream goes on.
            msg = base_message(gen)
            msg.params.pooled_height = 0
            sent.append(EncodedRequest("roi_align", msg.SerializeToString(), 0).with_id(rid))
            bad.add(rid)
            continue
        case = make_case(ops[i % len(ops)], gen, ("float32", "bfloat16")[i % 2], variant=i)
        sent.append(case.request.with_id(rid))
        expected[rid] = case.expected()
    order = [r.id for r in sent]

    with RoIClient(server.address, timeout=120) as client:
        answers = list(client.pool_stream(iter(sent)))
    ids = [a.id for a in answers]
    assert sorted(ids) == sorted(order), "every id answered exactly once"
    for a in answers:
        if a.id in bad:
            assert not a.ok and a.error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "params.pooled_height" in a.error.details
            assert_clean(a.error.details)
        else:
            assert a.ok, a.error
            assert_bitwise_equal(a.output, expected[a.id])


def test_stream_window_does_not_drop_requests(seed):
    """More requests than the stream's window (2 * max_batch_requests, at least 16) on one
    stream: reading pauses instead of refusing, and all are answered."""
    gen = torch.Generator().manual_seed(seed)
    with in_process_server(max_batch_requests=2, max_queue=4) as srv:
        reqs = [small_request(gen, f"w{i}") for i in range(60)]
        with RoIClient(srv.address, timeout=120) as client:
            answers = {a.id: a for a in client.pool_stream(r for r, _ in reqs)}
        assert set(answers) == {r.id for r, _ in reqs}
        for r, want in reqs:
            assert answers[r.id].ok, answers[r.id].error
            assert_bitwise_equal(answers[r.id].output, want)


# ---------------------------------------------------------------------------------------------
# Error paths


LIMITS = dict(max_boxes=64, max_output_elements=60_000, max_message_bytes=1 << 20)


@pytest.fixture(scope="module")
def limited():
    with in_process_server(**LIMITS) as srv:
        yield srv


def _set(path: str, value) -> Callable[[roi_pb2.PoolRequest], None]:
    def edit(msg):
        *parents, leaf = path.split(".")
        target = msg
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)

    return edit


def _truncate(field: str) -> Callable:
    def edit(msg):
        t = msg.input if field == "input" else msg.boxes.rois
        t.data = t.data[:-2]

    return edit


def _rois(fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    """Replaces boxes.rois by fn(rois) (float32)."""

    def edit(msg):
        t = msg.boxes.rois
        rois = np.frombuffer(t.data, np.float32).reshape(list(t.shape)).copy()
        new = np.ascontiguousarray(fn(rois), dtype=np.float32)
        del t.shape[:]
        t.shape.extend(new.shape)
        t.data = new.tobytes()

    return edit


def _input(shape) -> Callable:
    def edit(msg):
        n = int(np.prod(shape))
        msg.input.dtype = roi_pb2.DTYPE_FLOAT32
        del msg.input.shape[:]
        msg.input.shape.extend(shape)
        msg.input.data = np.zeros(n, np.float32).tobytes()

    return edit


def _with_boxes(k: int) -> Callable:
    return _rois(lambda r: np.tile(r[:1], (k, 1)))


def _nan_box(r):
    r[len(r) // 2, 2] = np.nan
    return r


def _inf_box(r):
    r[0, 3] = np.inf
    return r


def _index(value):
    def fn(r):
        r[-1, 0] = value
        return r

    return fn


# (name, op of the base request, edit, status, words the message must hold)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
ERROR_CASES = [
    ("data shorter than shape x dtype", "roi_align", _truncate("input"), INVALID, ["input.data", "bytes"]),
    ("box data shorter", "roi_align", _truncate("rois"), INVALID, ["boxes.rois.data"]),
    ("unknown op", "roi_align", _set("op", 42), INVALID, ["op", "42"]),
    ("no op", "roi_align", _set("op", 0), INVALID, ["op"]),
    ("unknown input dtype", "roi_align", _set("input.dtype", 9), INVALID, ["input.dtype"]),
    ("unknown out_dtype", "roi_align", _set("out_dtype", 7), INVALID, ["out_dtype"]),
    ("float16 boxes", "roi_align", _set("boxes.rois.dtype", roi_pb2.DTYPE_FLOAT16), INVALID, ["boxes.rois.dtype"]),
    ("box rows of 4", "roi_align", _rois(lambda r: r[:, 1:]), INVALID, ["boxes.rois.shape", "[K, 5]"]),
    ("rotated rois of 5", "roi_align_rotated", _rois(lambda r: r[:, :5]), INVALID, ["boxes.rois.shape", "[K, 6]"]),
    ("image index past N", "roi_align", _rois(_index(2)), INVALID, ["boxes", "image index 2"]),
    ("negative image index", "roi_align", _rois(_index(-1)), INVALID, ["boxes", "image index -1"]),
    ("fractional image index", "roi_align", _rois(_index(0.5)), INVALID, ["boxes", "image index 0.5", "whole number"]),
    ("fractional image index below N", "roi_pool", _rois(_index(1.9)), INVALID, ["boxes", "image index 1.9", "whole number"]),
    ("fractional rotated image index", "roi_align_rotated", _rois(_index(0.25)), INVALID, ["boxes", "image index 0.25"]),
    ("NaN box", "roi_align", _rois(_nan_box), INVALID, ["boxes", "non-finite"]),
    ("inf box", "roi_pool", _rois(_inf_box), INVALID, ["boxes", "non-finite"]),
    ("zero output height", "roi_align", _set("params.pooled_height", 0), INVALID, ["params.pooled_height"]),
    ("zero output width", "roi_pool", _set("params.pooled_width", 0), INVALID, ["pooled_width"]),
    ("zero spatial scale", "roi_align", _set("params.spatial_scale", 0.0), INVALID, ["params.spatial_scale"]),
    ("negative spatial scale", "ps_roi_pool", _set("params.spatial_scale", -0.5), INVALID, ["params.spatial_scale"]),
    ("NaN spatial scale", "roi_align", _set("params.spatial_scale", float("nan")), INVALID, ["params.spatial_scale"]),
    ("ps channels not divisible", "ps_roi_align", _input((2, 26, 16, 20)), INVALID, ["input.shape", "divisible", "26"]),
    ("ps channels for another size", "ps_roi_pool", _set("params.pooled_height", 2), INVALID, ["input.shape", "divisible"]),
    ("3-d input", "roi_align", _input((12, 16, 20)), INVALID, ["input.shape", "[N, C, H, W]"]),
    ("empty map", "roi_align", _input((2, 12, 0, 20)), INVALID, ["input.shape", "positive"]),
    ("too many boxes", "roi_align", _with_boxes(65), INVALID, ["boxes", "65 boxes", "limit of 64"]),
    ("too many output elements", "roi_align", _set("params.pooled_height", 200), INVALID, ["boxes", "output", "60000"]),
    ("max pool mode on roi_pool", "roi_pool", _set("params.pool_mode", roi_pb2.POOL_MODE_MAX), INVALID, ["params.pool_mode"]),
    ("sampling ratio too large", "roi_align", _set("params.sampling_ratio", 5000), INVALID, ["params.sampling_ratio"]),
    ("pyramid for roi_align", "roi_align", lambda m: m.pyramid.levels.add(), INVALID, ["pyramid"]),
    ("no features", "roi_align", lambda m: m.ClearField("input"), INVALID, ["features"]),
    ("no boxes", "roi_align", lambda m: m.ClearField("boxes"), INVALID, ["boxes"]),
    ("level scales not halving", "multiscale_roi_align",
     lambda m: [setattr(lv, "spatial_scale", s) for lv, s in zip(m.pyramid.levels, (0.25, 0.25, 0.125, 1 / 16))],
     INVALID, ["pyramid.levels[1].spatial_scale"]),
]


@pytest.mark.parametrize("name, op, edit, code, words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_paths(limited, seed, name, op, edit, code, words):
    gen = torch.Generator().manual_seed(seed)
    msg = base_message(gen, op)
    if op == "roi_align" and name == "too many output elements":
        msg.params.pooled_width = 200
    edit(msg)
    before = registry_value(limited, "roi_requests_total", op=op if name not in ("unknown op", "no op") else "unknown",
                            code=code.name)
    with grpc.insecure_channel(limited.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            raw_pool(channel)(msg.SerializeToString(), timeout=30)
    assert err.value.code() == code, (name, err.value.details())
    details = err.value.details()
    for word in words:
        assert word in details, (name, details)
    assert_clean(details)
    after = registry_value(limited, "roi_requests_total", op=op if name not in ("unknown op", "no op") else "unknown",
                           code=code.name)
    assert after == before + 1
    # The server goes on serving.
    req, want = small_request(gen)
    with RoIClient(limited.address, timeout=30) as client:
        assert_bitwise_equal(client.pool(req), want)


def test_garbage_bytes_are_invalid_argument(limited):
    with grpc.insecure_channel(limited.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            raw_pool(channel)(b"\xff\xff\xff\x0f not a protobuf", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "roi.v1.PoolRequest" in err.value.details()
    assert_clean(err.value.details())


def test_message_over_the_limit_is_refused(limited, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 64, 64, 80, generator=gen)  # 1.3 MB > the 1 MiB limit
    boxes = random_boxes(gen, 3, 1024, 1280)
    with RoIClient(limited.address, timeout=30, max_attempts=1) as client:
        with pytest.raises(RoIError) as err:
            client.roi_align(x, boxes, 2, 1 / 16)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_clean(err.value.details)
        # A response that would not fit the limit is refused before it is computed.
        x = torch.randn(1, 16, 8, 8, generator=gen)
        boxes = random_boxes(gen, 60, 128, 128)
        with pytest.raises(RoIError) as err:
            client.roi_align(x, boxes, 15, 1 / 16)  # 60 * 16 * 225 elements > 60,000
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        req, want = small_request(gen)
        assert_bitwise_equal(client.pool(req), want)


# ---------------------------------------------------------------------------------------------
# Queue, deadlines, cancellation


@pytest.fixture(scope="module")
def tight():
    """One request per batch and room for three waiting ones."""
    with in_process_server(max_batch_requests=1, max_queue=3, max_wait_ms=0) as srv:
        yield srv


@contextmanager
def device_busy(srv, gen, seconds: float) -> Iterator[tuple[grpc.Future, object, LaunchLog, grpc.Channel]]:
    """A slow request occupying the server's device; yields once its kernel has started."""
    slow = slow_case(gen, seconds)
    slow_req = slow.request.with_id("slow")
    with LaunchLog(srv) as log, grpc.insecure_channel(srv.address) as channel:
        future = raw_pool(channel).future(slow_req.payload, timeout=120)
        log.wait_for("slow")
        yield future, slow, log, channel
        raw = future.result()
        got = roi_pb2.PoolResponse.FromString(raw)
        assert got.id == "slow"


def test_full_queue_is_resource_exhausted_and_recovers(tight, seed):
    gen = torch.Generator().manual_seed(seed)
    reqs = [small_request(gen, f"q{i}") for i in range(8)]
    refused_before = registry_value(tight, "roi_requests_total", op="roi_align", code="RESOURCE_EXHAUSTED")
    with device_busy(tight, gen, 1.0) as (slow_future, _, log, channel):
        futures = [raw_pool(channel).future(r.payload, timeout=60) for r, _ in reqs]
        # Refusals come at once, while the slow request still holds the device.
        deadline = time.monotonic() + 10
        while sum(f.done() for f in futures) < 5:
            assert time.monotonic() < deadline, "no prompt refusals"
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as garbage:
            raw_pool(channel)(b"\xff\xff\xff not a request", timeout=10)
        assert garbage.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, garbage.value.details()
        assert not slow_future.done(), "the device was free: the test shows nothing"
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except grpc.RpcError as exc:
                outcomes.append(exc)
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    accepted = [(o, want) for o, (_, want) in zip(outcomes, reqs) if not isinstance(o, grpc.RpcError)]
    assert len(accepted) == 3 and len(refused) == 5, [type(o) for o in outcomes]
    for exc in refused:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in exc.details()
        assert_clean(exc.details())
    for raw, want in accepted:
        out = roi_pb2.PoolResponse.FromString(raw).output
        assert_bitwise_equal(np.frombuffer(out.data, np.float32).reshape(list(out.shape)), want.numpy())
    refused_ids = {r.id for (r, _), o in zip(reqs, outcomes) if isinstance(o, grpc.RpcError)}
    assert not refused_ids & log.launched()
    # A full queue refuses before the message is parsed (a refusal must cost far less than an
    # answer): even bytes that are no PoolRequest get RESOURCE_EXHAUSTED, and the refusals
    # above were still counted under their op, read from the message's header.
    refused_op = registry_value(tight, "roi_requests_total", op="roi_align", code="RESOURCE_EXHAUSTED")
    assert refused_op == refused_before + 5
    assert registry_value(tight, "roi_queue_depth") == 0
    # Recovered: a burst the queue can hold is served.
    with RoIClient(tight.address, timeout=60) as client:
        for r, want in reqs[:3]:
            assert_bitwise_equal(client.pool(r), want)


def test_deadline_passed_in_the_queue_is_not_computed(tight, seed):
    gen = torch.Generator().manual_seed(seed)
    late, _ = small_request(gen, "late", k=7)
    probe, probe_want = small_request(gen, "probe", k=3)
    expired_before = registry_value(tight, "roi_requests_total", op="roi_align", code="DEADLINE_EXCEEDED")
    boxes_before = registry_value(tight, "roi_batch_boxes_sum")
    with device_busy(tight, gen, 1.0) as (slow_future, _, log, channel):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            raw_pool(channel)(late.payload, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 5
        assert not slow_future.done(), "the device was free: the test shows nothing"
        # After the slow request, a probe: anything queued before it has been dealt with.
        got = roi_pb2.PoolResponse.FromString(raw_pool(channel)(probe.payload, timeout=60))
    assert "late" not in log.launched(), "a request whose deadline passed was computed"
    assert {"slow", "probe"} <= log.launched()
    assert got.id == "probe"
    out = got.output
    assert_bitwise_equal(np.frombuffer(out.data, np.float32).reshape(list(out.shape)), probe_want.numpy())
    assert registry_value(tight, "roi_batch_boxes_sum") - boxes_before == 16 + 3
    assert registry_value(tight, "roi_requests_total", op="roi_align", code="DEADLINE_EXCEEDED") == expired_before + 1
    assert registry_value(tight, "roi_queue_depth") == 0


def test_cancelled_request_is_dropped(tight, seed):
    gen = torch.Generator().manual_seed(seed)
    gone, _ = small_request(gen, "gone", k=11)
    kept, kept_want = small_request(gen, "kept", k=2)
    cancelled_before = registry_value(tight, "roi_requests_total", op="roi_align", code="CANCELLED")
    boxes_before = registry_value(tight, "roi_batch_boxes_sum")
    with device_busy(tight, gen, 1.0) as (slow_future, _, log, channel):
        doomed = raw_pool(channel).future(gone.payload, timeout=60)
        keeper = raw_pool(channel).future(kept.payload, timeout=60)
        deadline = time.monotonic() + 10
        while registry_value(tight, "roi_queue_depth") < 2:
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.005)
        assert doomed.cancel()
        deadline = time.monotonic() + 10
        while registry_value(tight, "roi_queue_depth") > 1:
            assert time.monotonic() < deadline, "the cancelled request stayed in the queue"
            time.sleep(0.005)
        assert not slow_future.done(), "the device was free: the test shows nothing"
        got = roi_pb2.PoolResponse.FromString(keeper.result())
    assert "gone" not in log.launched(), "a cancelled request was computed"
    assert got.id == "kept"
    out = got.output
    assert_bitwise_equal(np.frombuffer(out.data, np.float32).reshape(list(out.shape)), kept_want.numpy())
    assert registry_value(tight, "roi_batch_boxes_sum") - boxes_before == 16 + 2
    deadline = time.monotonic() + 5
    while registry_value(tight, "roi_requests_total", op="roi_align", code="CANCELLED") < cancelled_before + 1:
        assert time.monotonic() < deadline, "the cancellation was not counted"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# Metrics, health, reflection


def test_metrics_parse_follow_conventions_and_move(server, seed):
    gen = torch.Generator().manual_seed(seed)
    before = scrape(server.metrics_url)
    reqs = [make_case("roi_pool", gen, variant=i).request for i in range(3)]
    bad = base_message(gen, "roi_pool")
    bad.params.spatial_scale = -1.0
    with RoIClient(server.address, timeout=60) as client:
        results = [client.pool_with_timings(r) for r in reqs]
        with pytest.raises(RoIError):
            client.pool(EncodedRequest("roi_pool", bad.SerializeToString(), 0))
    after = scrape(server.metrics_url)
    d = lambda name, **labels: sample(after, name, **labels) - sample(before, name, **labels)  # noqa: E731

    assert d("roi_requests_total", op="roi_pool", code="OK") == 3
    assert d("roi_requests_total", op="roi_pool", code="INVALID_ARGUMENT") == 1
    assert d("roi_request_duration_seconds_count", op="roi_pool") == 4
    assert d("roi_queue_wait_seconds_count", op="roi_pool") == 3
    assert d("roi_compute_seconds_count", op="roi_pool") == 3
    assert d("roi_batches_total", op="roi_pool") == 3
    assert d("roi_received_bytes_total") == sum(r.nbytes for r in reqs) + len(bad.SerializeToString())
    out_bytes = sum(r.output.numel() * r.output.element_size() for r in results)
    assert out_bytes < d("roi_sent_bytes_total") < out_bytes + 3 * 200
    assert sample(after, "roi_queue_depth") == 0
    assert sample(after, "roi_requests_in_flight") == 0
    assert sample(after, "roi_server_info", version="0.1.0", device="cpu") == 1

    # Conventions: roi_ prefix, _total on counters, base units in the names.
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    # prometheus_client also writes each counter's and histogram's creation time as a gauge
    # named <name>_created; those follow from the metric's own name.
    families = [f for f in text_string_to_metric_families(text) if not f.name.endswith("_created")]
    assert families
    # The process's own figures, under the names every Prometheus client library uses.
    process = {f.name: f for f in families if f.name.startswith("process_")}
    if sys.platform == "linux":
        rss = process["process_resident_memory_bytes"].samples[0].value
        assert 10 << 20 < rss < 64 << 30, rss
        assert process["process_cpu_seconds"].samples[0].value > 0
    families = [f for f in families if f.name not in process]
    for f in families:
        assert f.name.startswith("roi_"), f.name
        assert not re.search(r"_(ms|milliseconds|microseconds|kb|mb|megabytes)(_|$)", f.name), f.name
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
        if f.type == "histogram" and ("duration" in f.name or "wait" in f.name or "compute" in f.name):
            assert f.name.endswith("_seconds"), f.name
        if "bytes" in f.name:
            assert f.name.endswith("_bytes"), f.name
    types = {f.name: f.type for f in families}
    for name, kind in {
        "roi_requests": "counter",
        "roi_request_duration_seconds": "histogram",
        "roi_queue_wait_seconds": "histogram",
        "roi_compute_seconds": "histogram",
        "roi_batch_requests": "histogram",
        "roi_batch_boxes": "histogram",
        "roi_queue_depth": "gauge",
        "roi_requests_in_flight": "gauge",
        "roi_received_bytes": "counter",
        "roi_sent_bytes": "counter",
    }.items():
        assert types.get(name) == kind, (name, types.get(name))


def test_compute_histogram_resolves_small_batches(server, seed):
    """Small batches on the CPU take tens of microseconds: the compute histogram must have
    buckets there, or every observation lands in its lowest one."""
    gen = torch.Generator().manual_seed(seed)
    before = scrape(server.metrics_url)
    with RoIClient(server.address, timeout=60) as client:
        for i in range(30):
            req, _ = small_request(gen, f"s{i}", k=2, channels=4)
            client.pool(req)
    after = scrape(server.metrics_url)
    buckets = sorted(
        (float(dict(labels)["le"]), value - before.get((name, labels), 0.0))
        for (name, labels), value in after.items()
        if name == "roi_compute_seconds_bucket" and dict(labels).get("op") == "roi_align"
    )
    bounds = [le for le, _ in buckets]
    assert bounds[0] <= 1e-5 and sum(le <= 1e-4 for le in bounds) >= 4, bounds
    total = buckets[-1][1]
    assert total >= 30
    counts = [c for _, c in buckets]
    per_bucket = [b - a for a, b in zip([0.0, *counts[:-1]], counts)]
    print("compute seconds per bucket:", dict(zip(bounds, per_bucket)))
    # Resolved: the median falls in a bucket that is not the lowest and whose bounds are at
    # most a factor of 2 apart (small CPU batches run on the event loop, so their times are
    # close together: they may all share one such bucket).
    median = next(i for i, c in enumerate(counts) if c >= total / 2)
    assert median > 0 and bounds[median] <= 2 * bounds[median - 1], dict(zip(bounds, per_bucket))


def test_health_and_reflection(server):
    with RoIClient(server.address, timeout=10) as client:
        assert client.health() == "SERVING"
        assert client.health("roi.v1.RoIService") == "SERVING"
    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"roi.v1.RoIService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("roi.v1.RoIService")
        assert {m.name for m in svc.methods} == {
            "Pool", "PoolStream", "Describe",
            "RegisterSharedMemory", "SharedMemoryStatus", "UnregisterSharedMemory", "HoldSharedMemory",
            "UploadFeatures", "ReleaseFeatures",
        }  # fmt: skip
        method = svc.FindMethodByName("PoolStream")
        assert method.client_streaming and method.server_streaming
        request = pool.FindMessageTypeByName("roi.v1.PoolRequest")
        assert {"id", "op", "params", "input", "pyramid", "ragged", "boxes", "out_dtype"} <= set(request.fields_by_name)
