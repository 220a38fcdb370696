"""Faults inside a running server: a kernel that fails on one request of a batch, a device that
runs out of memory, a client that goes away while its batch runs, SIGTERM under steady load;
and the batcher's two policies (start at once when idle, or wait ``max_wait``).

Failures are injected by wrapping the engine's ``launch`` (the one place every kernel call
goes through), so the tests see exactly which requests each launch carried.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
import torch
from conftest import random_boxes
from grpc_health.v1 import health_pb2
from roi_client import EncodedRequest
from roi_client._proto.roi.v1 import roi_pb2
from test_service_support import (
    assert_bitwise_equal,
    in_process_server,
    registry_value,
    start_server_process,
)

import roi_kernels

POOL = "/roi.v1.RoIService/Pool"


class Injector:
    """Wraps a server engine's ``launch``: records the request ids of every launch (and
    whether it failed), and runs ``hook(ids)`` first, which may sleep or raise."""

    def __init__(self, srv, hook: Callable[[list[str]], None] = lambda ids: None) -> None:
        self.engine = srv.server.engine
        self.hook = hook
        self.launches: list[tuple[list[str], bool]] = []
        self.entered: list[list[str]] = []
        self.released = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Injector:
        original = self.engine.launch
        original_release = self.engine.release_cached_memory

        def launch(reqs):
            ids = [r.id for r in reqs]
            with self._lock:
                self.entered.append(ids)
            try:
                self.hook(ids)
                launched = original(reqs)
            except BaseException:
                with self._lock:
                    self.launches.append((ids, False))
                raise
            with self._lock:
                self.launches.append((ids, True))
            return launched

        def release():
            self.released += 1
            original_release()

        self.engine.launch = launch
        self.engine.release_cached_memory = release
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.launch
        del self.engine.release_cached_memory

    def ok(self) -> list[list[str]]:
        with self._lock:
            return [ids for ids, ok in self.launches if ok]

    def started(self, request_id: str) -> bool:
        with self._lock:
            return any(request_id in ids for ids in self.entered)

    def wait_started(self, request_id: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.started(request_id):
            assert time.monotonic() < deadline, f"{request_id} never reached a kernel"
            time.sleep(0.002)


def request(gen: torch.Generator, request_id: str, k: int | None = None):
    """A small roi_align request (all of them batch together) and its in-process result."""
    h, w = int(torch.randint(6, 16, (1,), generator=gen)), int(torch.randint(6, 16, (1,), generator=gen))
    x = torch.randn(1, 6, h, w, generator=gen)
    k = int(torch.randint(1, 12, (1,), generator=gen)) if k is None else k
    boxes = random_boxes(gen, k, h * 16, w * 16)
    return (
        EncodedRequest.roi_align(x, boxes, 3, 1 / 16, 2, True).with_id(request_id),
        roi_kernels.roi_align(x, boxes, 3, 1 / 16, 2, True),
    )


def output_of(raw: bytes) -> np.ndarray:
    out = roi_pb2.PoolResponse.FromString(raw).output
    return np.frombuffer(out.data, np.float32).reshape(list(out.shape))


@contextmanager
def queued_behind_blocker(srv, gen, inj: Injector, names: list[str]) -> Iterator[tuple[list, list]]:
    """Sends a request "blocker" (held on the device by ``inj``'s hook), then ``names``, which
    queue behind it and so form one batch when it ends. Yields (futures, expected results)."""
    with grpc.insecure_channel(srv.address) as channel:
        pool = channel.unary_unary(POOL)
        blocker, _ = request(gen, "blocker")
        blocker_future = pool.future(blocker.payload, timeout=60)
        inj.wait_started("blocker")
        cases = [request(gen, name) for name in names]
        futures = [pool.future(req.payload, timeout=60) for req, _ in cases]
        deadline = time.monotonic() + 20
        while registry_value(srv, "roi_queue_depth") < len(names):
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.002)
        assert not blocker_future.done(), "the device was free: the batch would not form"
        yield futures, [want for _, want in cases]
        blocker_future.result()


@pytest.fixture(scope="module")
def server():
    # The hooks stand for slow kernels: those run on the worker thread, never on the event
    # loop, which is where the server's small CPU batches would otherwise go.
    with in_process_server(inline_max_samples=0) as srv:
        yield srv


def outcomes(futures) -> list:
    got = []
    for f in futures:
        try:
            got.append(f.result())
        except grpc.RpcError as exc:
            got.append(exc)
    return got


def test_kernel_failure_fails_only_its_request(server, seed):
    gen = torch.Generator().manual_seed(seed)
    names = [f"r{i}" for i in range(8)]
    bad = names[int(torch.randint(0, 8, (1,), generator=gen))]

    def hook(ids):
        if "blocker" in ids:
            time.sleep(0.3)
        if bad in ids:
            raise RuntimeError("injected kernel failure")

    with Injector(server, hook) as inj, queued_behind_blocker(server, gen, inj, names) as (futures, wants):
        got = outcomes(futures)
    for name, result, want in zip(names, got, wants):
        if name == bad:
            assert isinstance(result, grpc.RpcError)
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "injected kernel failure" in result.details()
            assert "Traceback" not in result.details()
        else:
            assert not isinstance(result, grpc.RpcError), (name, result)
            assert_bitwise_equal(output_of(result), want.numpy())
    # The eight ran together first; the halves that held the bad request were split again
    # (8 -> 4 -> 2 -> 1), the others stayed batched: 2 log2(8) + 1 launches, each good request
    # computed exactly once.
    attempts = [ids for ids, _ in inj.launches if ids != ["blocker"]]
    assert sorted(attempts[0]) == sorted(names)
    assert len(attempts) == 7, inj.launches
    good = [i for ids in inj.ok() for i in ids if i != "blocker"]
    assert sorted(good) == sorted(n for n in names if n != bad)
    assert max(len(ids) for ids in inj.ok() if ids != ["blocker"]) == 4


def test_out_of_memory_splits_the_batch_until_it_fits(server, seed):
    gen = torch.Generator().manual_seed(seed)
    names = [f"m{i}" for i in range(8)]
    fits = int(torch.randint(1, 4, (1,), generator=gen))  # the most requests "memory" holds
    batches_before = registry_value(server, "roi_batch_requests_count")

    def hook(ids):
        if "blocker" in ids:
            time.sleep(0.3)
        elif len(ids) > fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(ids)} GiB")

    with Injector(server, hook) as inj, queued_behind_blocker(server, gen, inj, names) as (futures, wants):
        got = outcomes(futures)
    for result, want in zip(got, wants):
        assert not isinstance(result, grpc.RpcError), result
        assert_bitwise_equal(output_of(result), want.numpy())
    ran = [ids for ids in inj.ok() if ids != ["blocker"]]
    assert sorted(i for ids in ran for i in ids) == sorted(names)
    assert all(len(ids) <= fits for ids in ran)
    # Halving 8 reaches parts of at most `fits` requests: 8 -> 4 -> 2 (-> 1).
    expected_size = {1: 1, 2: 2, 3: 2}[fits]
    assert {len(ids) for ids in ran} == {expected_size}
    assert inj.released == sum(1 for _, ok in inj.launches if not ok)
    assert registry_value(server, "roi_batch_requests_count") - batches_before == len(ran) + 1


def test_request_too_large_for_memory_alone_is_resource_exhausted(server, seed):
    gen = torch.Generator().manual_seed(seed)
    names = ["a", "huge", "b"]

    def hook(ids):
        if "blocker" in ids:
            time.sleep(0.3)
        elif "huge" in ids:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    with Injector(server, hook) as inj, queued_behind_blocker(server, gen, inj, names) as (futures, wants):
        got = outcomes(futures)
    assert isinstance(got[1], grpc.RpcError)
    assert got[1].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of device memory" in got[1].details()
    assert "80.00 GiB" not in got[1].details()
    for i in (0, 2):
        assert_bitwise_equal(output_of(got[i]), wants[i].numpy())
    # The server goes on serving.
    req, want = request(gen, "after")
    with grpc.insecure_channel(server.address) as channel:
        assert_bitwise_equal(output_of(channel.unary_unary(POOL)(req.payload, timeout=60)), want.numpy())


def test_client_gone_mid_batch_costs_the_others_nothing(server, seed):
    gen = torch.Generator().manual_seed(seed)
    cancelled_before = registry_value(server, "roi_requests_total", op="roi_align", code="CANCELLED")
    def hook(ids):
        # The blocker is held so that the three below queue and then run as one batch, which
        # is held in turn so that "gone" can leave while it runs.
        time.sleep(0.3 if "blocker" in ids else 0.5 if "gone" in ids else 0)

    with Injector(server, hook) as inj, grpc.insecure_channel(server.address) as channel:
        pool = channel.unary_unary(POOL)
        blocker, _ = request(gen, "blocker")
        blocker_future = pool.future(blocker.payload, timeout=60)
        inj.wait_started("blocker")
        cases = {name: request(gen, name) for name in ("k1", "gone", "k2")}
        futures = {name: pool.future(req.payload, timeout=60) for name, (req, _) in cases.items()}
        deadline = time.monotonic() + 20
        while registry_value(server, "roi_queue_depth") < 3:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        blocker_future.result()
        inj.wait_started("gone")
        assert futures["gone"].cancel()
        for name in ("k1", "k2"):
            assert_bitwise_equal(output_of(futures[name].result()), cases[name][1].numpy())
    batch = [ids for ids in inj.ok() if "gone" in ids]
    assert len(batch) == 1 and sorted(batch[0]) == ["gone", "k1", "k2"], inj.launches
    deadline = time.monotonic() + 5
    while registry_value(server, "roi_requests_total", op="roi_align", code="CANCELLED") < cancelled_before + 1:
        assert time.monotonic() < deadline, "the cancellation was not counted"
        time.sleep(0.01)
    assert registry_value(server, "roi_requests_in_flight") == 0
    assert registry_value(server, "roi_queue_depth") == 0


def test_idle_server_starts_a_lone_request_at_once(server, seed):
    """With no max_wait (the default) a request that finds the device idle does not wait for
    company: its queue time is the hop to the worker thread, not a timer."""
    gen = torch.Generator().manual_seed(seed)
    with grpc.insecure_channel(server.address) as channel:
        pool = channel.unary_unary(POOL)
        queued = []
        for i in range(5):
            req, want = request(gen, f"lone{i}")
            resp = roi_pb2.PoolResponse.FromString(pool(req.payload, timeout=60))
            assert_bitwise_equal(output_of(resp.SerializeToString()), want.numpy())
            assert resp.timings.batch_requests == 1
            queued.append(resp.timings.queue_seconds)
    # Generous for a loaded machine, and far below what any batching timer would add.
    assert min(queued) < 0.05, queued


def test_max_wait_holds_a_batch_open_for_company(seed):
    gen = torch.Generator().manual_seed(seed)
    wait_s = 0.4
    with in_process_server(max_wait_ms=wait_s * 1000) as srv, grpc.insecure_channel(srv.address) as channel:
        pool = channel.unary_unary(POOL)
        first, first_want = request(gen, "first")
        second, second_want = request(gen, "second")
        start = time.monotonic()
        f1 = pool.future(first.payload, timeout=60)
        time.sleep(wait_s / 4)
        f2 = pool.future(second.payload, timeout=60)
        r1, r2 = (roi_pb2.PoolResponse.FromString(f.result()) for f in (f1, f2))
        elapsed = time.monotonic() - start
    assert elapsed >= wait_s
    assert r1.timings.batch_id == r2.timings.batch_id and r1.timings.batch_requests == 2
    assert r1.timings.queue_seconds >= wait_s * 0.9
    assert_bitwise_equal(output_of(r1.SerializeToString()), first_want.numpy())
    assert_bitwise_equal(output_of(r2.SerializeToString()), second_want.numpy())


def test_sigterm_under_steady_load_loses_no_accepted_request(tmp_path, seed):
    """Senders keep calling while the server gets SIGTERM: every call ends in its correct
    result or in UNAVAILABLE (refused, never started); nothing is cut off, and the process
    exits 0 after serving what it accepted."""
    srv = start_server_process(
        tmp_path, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--grace-s", "30"
    )
    gen = torch.Generator().manual_seed(seed)
    cases = [request(gen, f"s{i}", k=int(torch.randint(50, 200, (1,), generator=gen))) for i in range(6)]
    results: list[tuple[int, object]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(w: int) -> None:
        with grpc.insecure_channel(srv.address) as channel:
            pool = channel.unary_unary(POOL)
            n = 0
            while not stop.is_set():
                i = (w + n) % len(cases)
                n += 1
                try:
                    outcome: object = pool(cases[i][0].payload, timeout=60)
                except grpc.RpcError as exc:
                    outcome = exc
                with lock:
                    results.append((i, outcome))
                if isinstance(outcome, grpc.RpcError):
                    return

    threads = [threading.Thread(target=sender, args=(w,), daemon=True) for w in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(results) < 60:
        assert time.monotonic() < deadline, "the load never got going"
        time.sleep(0.01)
    srv.proc.send_signal(15)
    for t in threads:
        t.join(timeout=60)
    stop.set()
    assert srv.proc.wait(timeout=60) == 0, srv.log()
    ok = refused = 0
    for i, outcome in results:
        if isinstance(outcome, grpc.RpcError):
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, (outcome.code(), outcome.details())
            refused += 1
        else:
            assert_bitwise_equal(output_of(outcome), cases[i][1].numpy())
            ok += 1
    # Every sender stopped on a refusal: none was left waiting, and none got another error.
    assert refused == len(threads), results[-10:]
    assert ok >= 60


def test_sigterm_ends_open_streams_cleanly(tmp_path, seed):
    """An open PoolStream and a health Watch at SIGTERM: the stream answers every item it
    read and ends UNAVAILABLE; the Watch sees NOT_SERVING and ends; the server does not wait
    out its grace period for either."""
    grace = 30
    srv = start_server_process(
        tmp_path, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--grace-s", str(grace)
    )
    gen = torch.Generator().manual_seed(seed)
    cases = {f"i{i}": request(gen, f"i{i}") for i in range(4)}
    sent: queue.Queue = queue.Queue()

    def items():
        while (item := sent.get()) is not None:
            yield item

    with grpc.insecure_channel(srv.address) as channel:
        stream = channel.stream_stream("/roi.v1.RoIService/PoolStream")(items(), timeout=120)
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(service=""), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        answers = {}
        for name, (req, _) in cases.items():
            sent.put(req.payload)
            got = roi_pb2.PoolStreamResponse.FromString(next(stream))
            answers[got.id] = got
        start = time.monotonic()
        srv.proc.send_signal(15)
        statuses = [r.status for r in watch]  # ends when the server ends it
        with pytest.raises(grpc.RpcError) as err:
            for raw in stream:
                got = roi_pb2.PoolStreamResponse.FromString(raw)
                answers[got.id] = got
        sent.put(None)
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in err.value.details()
    assert srv.proc.wait(timeout=60) == 0, srv.log()
    assert time.monotonic() - start < grace / 2, "the server waited out its grace period"
    assert set(answers) == set(cases)
    for name, got in answers.items():
        out = got.response.output
        assert_bitwise_equal(np.frombuffer(out.data, np.float32).reshape(list(out.shape)), cases[name][1].numpy())
