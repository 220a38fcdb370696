"""Overload: a real roi-server with a small queue, offered several times what it can serve.

The server's capacity is measured first (closed loop). Then an open loop offers about six
times that rate for a few seconds, and the test checks what a bounded queue promises:

- the excess is refused with RESOURCE_EXHAUSTED, and promptly (no refusal waits for the device);
- every request gets exactly one answer, OK or RESOURCE_EXHAUSTED (each call has a deadline,
  so a hang would show as DEADLINE_EXCEEDED);
- an admitted request waits at most for the batches the queue can hold ahead of it, so its
  latency is bounded by (queue / batch + 2) batch times, measured in the same run;
- the server keeps serving at about its capacity while it refuses, and its answers are right
  (sampled responses equal the in-process kernels bit for bit);
- its memory stays within what the queue can hold;
- once the load stops, the queue and in-flight gauges are back to 0, health is SERVING and a
  closed-loop run reaches the first capacity figure again.

Every bound is derived from figures measured in the run (batch compute time, request size),
with margins, so that a slower or busier machine moves the bounds with the measurements.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
import numpy as np
import pytest
from test_service_support import assert_bitwise_equal, sample, scrape, start_server_process

from roi_client import RoIClient
from roi_client.loadtest import runner, verify
from roi_client.loadtest import workload as wl
from roi_client.loadtest.senders import encode, open_senders
from roi_client.loadtest.stats import summarize

pytestmark = pytest.mark.slow

QUEUE = 8  # --max-queue
BATCH = 4  # --max-batch-requests
# The request is sized (by its sampling ratio) until the server serves about this many per
# second, on whatever machine runs the test: then OVERLOAD times it is a rate one asyncio
# client can offer. (Far beyond that, the client falls behind.)
TARGET_CAPACITY = 40.0
OVERLOAD = 6.0  # offered rate / measured capacity
OVERLOAD_S = 4.0
CAPACITY_S = 2.0
TIMEOUT_S = 30.0  # every call's deadline
LATENCY_MARGIN = 1.5
OK_CODES = {"OK", "RESOURCE_EXHAUSTED"}


def workload(seed: int, sampling_ratio: int) -> wl.Workload:
    """roi_align of 32 boxes on a 32x32x32 map: a small message, so that refusing one costs
    the server little; the sampling ratio sets the kernel's work (sr x sr samples per bin)."""
    return wl.customize(wl.make("tiny", seed=seed), map_shape=(32, 32, 32), boxes=32, spatial_scale=1 / 8,
                        sampling_ratio=sampling_ratio, seed=seed)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@dataclass
class Watch:
    """Samples the server's resident memory and queue-depth gauge on a thread."""

    pid: int
    metrics_url: str
    rss: list = field(default_factory=list)
    depth: list = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self.rss.append(rss_bytes(self.pid))
            if n % 2 == 0:
                self.depth.append(sample(scrape(self.metrics_url), "roi_queue_depth"))
            n += 1
            self._stop.wait(0.05)


def codes_of(m: dict) -> dict[str, float]:
    """roi_requests_total by status code (summed over ops)."""
    out: dict[str, float] = {}
    for (name, labels), v in m.items():
        if name == "roi_requests_total":
            code = dict(labels)["code"]
            out[code] = out.get(code, 0.0) + v
    return out


async def closed(senders, seconds: float, warmup_s: float = 0.5) -> tuple[dict, runner.RunResult]:
    """A closed-loop run with two batches' worth in flight: the device always has a batch
    waiting, and the queue never overflows."""
    res = await runner.closed_loop(senders, 2 * BATCH, runner.Plan(warmup_s=warmup_s, duration_s=seconds))
    s = summarize(res.records, window_start=res.window_start, window_end=res.window_end, mode="closed",
                  concurrency=2 * BATCH)
    return s, res


def compute_per_request(res: runner.RunResult) -> float:
    """Mean kernel seconds per admitted request (each batch's compute time shared among its
    requests): the machine's speed at the time, as the server saw it."""
    codes = np.asarray(res.records.code, dtype=object)
    ok = codes == "OK"
    compute = np.asarray(res.records.compute, np.float64)[ok]
    return float(np.mean(compute / np.asarray(res.records.batch_requests, np.float64)[ok]))


async def sized_senders(address: str, seed: int):
    """(workload, senders, server description, close) for a request the server serves about
    TARGET_CAPACITY of per second (measured on it: capacity goes as 1 / sampling_ratio**2)."""
    sr = 64
    for attempt in range(4):
        work = workload(seed, sr)
        senders, servers, close = await open_senders([address], work, timeout=TIMEOUT_S)
        s, _ = await closed(senders, 1.0, warmup_s=0.3)
        assert s["error_count"] == 0, s["errors"]
        capacity = s["throughput_rps"]
        print(f"sampling ratio {sr}: {capacity:.1f} req/s")
        if TARGET_CAPACITY / 2 <= capacity <= TARGET_CAPACITY * 2 or attempt == 3:
            return work, senders, servers[0], close
        await close()
        sr = max(1, min(512, round(sr * math.sqrt(capacity / TARGET_CAPACITY))))
    raise AssertionError("unreachable")


def test_overload_refuses_promptly_stays_bounded_and_recovers(tmp_path, seed):
    srv = start_server_process(
        tmp_path, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cpu",
        "--max-queue", str(QUEUE), "--max-batch-requests", str(BATCH),
    )
    try:
        asyncio.run(asyncio.wait_for(_scenario(srv, seed), timeout=240))
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


async def _scenario(srv, seed: int) -> None:
    work, senders, info, close = await sized_senders(srv.address, seed)
    print(work.describe())
    try:
        await _phases(srv, work, senders, info)
    finally:
        await close()


async def _phases(srv, work, senders, info: dict) -> None:
    assert info["max_queue"] == QUEUE and info["max_batch_requests"] == BATCH
    max_wait_s = info["max_wait_ms"] / 1e3

    # -- capacity
    cap, cap_res = await closed(senders, CAPACITY_S)
    assert cap["error_count"] == 0, cap["errors"]
    capacity = cap["throughput_rps"]
    cap_compute = compute_per_request(cap_res)
    baseline_rss = rss_bytes(srv.proc.pid)

    # -- overload: open loop at OVERLOAD x capacity, every request measured
    rate = OVERLOAD * capacity
    n = max(200, round(rate * OVERLOAD_S))
    before = scrape(srv.metrics_url)
    with Watch(srv.proc.pid, srv.metrics_url) as watch:
        plan = runner.Plan(warmup_s=0.0, duration_s=None, requests=n)
        res = await runner.open_loop(senders, rate, plan, verify=8)
    s = summarize(res.records, window_start=res.window_start, window_end=res.window_end, mode="open",
                  rate=rate, max_inflight_hits=res.max_inflight_hits)
    gen = s["generator"]
    context = (f"capacity {capacity:.1f} req/s (batch compute p50 {cap['server']['compute_ms']['p50']:.1f} "
               f"ms); "
               f"offered {rate:.1f}/s, sent {gen['sent_rate']:.1f}/s; admitted {s['ok']} of {n}, "
               f"{s['throughput_rps']:.1f} req/s; errors {s['errors']}")
    print(context)

    # The client did offer the overload (otherwise the rest shows nothing).
    assert gen["sent_rate"] >= 0.8 * rate, f"the client could not offer the load: {context}"
    assert res.max_inflight_hits == 0, context

    # Exactly one answer per request, and only the two expected ones.
    codes = np.asarray(res.records.code, dtype=object)
    assert len(codes) == n, context
    assert set(codes) <= OK_CODES, context
    refused = codes == "RESOURCE_EXHAUSTED"
    admitted = ~refused
    # About 1 - 1 / OVERLOAD of the offer exceeds the capacity; at least half must be refused.
    assert refused.sum() >= 0.5 * n, context
    # Refusing does not starve the work: the server keeps serving at about its capacity. On a
    # shared machine the kernels' speed drifts, so the figure is also taken at the speed the
    # server measured before (its own per-request compute time).
    served = s["throughput_rps"]
    served_at_speed = served * compute_per_request(res) / cap_compute
    assert max(served, served_at_speed) >= 0.5 * capacity, (
        f"{served_at_speed:.1f} at the first speed; {context}")

    # The server saw the same: its counters moved by exactly these answers.
    want = {"OK": float(admitted.sum()), "RESOURCE_EXHAUSTED": float(refused.sum())}
    deadline = time.monotonic() + 10
    while True:
        moved = {k: v - codes_of(before).get(k, 0.0) for k, v in codes_of(scrape(srv.metrics_url)).items()}
        moved = {k: v for k, v in moved.items() if v}
        if moved == want or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert moved == want, (moved, want)

    # Refusals are prompt: they never wait for the device. (Both kinds of answer carry the same
    # client and network delays, so they are compared with each other and with the kernels.)
    lat = np.asarray(res.records.latency)
    refusal_p50 = float(np.percentile(lat[refused], 50))
    refusal_p99 = float(np.percentile(lat[refused], 99))
    admitted_p99 = float(np.percentile(lat[admitted], 99))
    compute_p50 = s["server"]["compute_ms"]["p50"] / 1e3
    compute_p99 = s["server"]["compute_ms"]["p99"] / 1e3
    print(f"refusal p50 {refusal_p50 * 1e3:.2f} p99 {refusal_p99 * 1e3:.2f} ms; admitted p50 "
          f"{s['latency_ms']['p50']:.1f} p99 {admitted_p99 * 1e3:.1f} ms; batch compute p50 "
          f"{compute_p50 * 1e3:.1f} p99 {compute_p99 * 1e3:.1f} ms; server queue p99 "
          f"{s['server']['queue_ms']['p99']:.1f} ms; outside p99 "
          f"{s['server']['outside_server_ms']['p99']:.1f} ms")
    assert refusal_p50 < 0.5 * compute_p50, (
        f"refusal p50 {refusal_p50 * 1e3:.1f} ms vs one batch's compute p50 {compute_p50 * 1e3:.1f} ms; "
        f"{context}")
    assert refusal_p99 < 0.5 * admitted_p99, (
        f"refusal p99 {refusal_p99 * 1e3:.1f} ms vs admitted p99 {admitted_p99 * 1e3:.1f} ms; {context}")

    # Admitted requests wait at most for what the queue holds: the running batch, QUEUE / BATCH
    # batches ahead, then their own. The batch time is this run's (the server's timings).
    queue_p99 = s["server"]["queue_ms"]["p99"] / 1e3
    queue_bound = LATENCY_MARGIN * ((QUEUE / BATCH + 1) * compute_p99 + max_wait_s)
    assert queue_p99 <= queue_bound, (
        f"server queue wait p99 {queue_p99 * 1e3:.1f} ms > {queue_bound * 1e3:.1f} ms; {context}")
    outside_p99 = s["server"]["outside_server_ms"]["p99"] / 1e3
    latency_bound = LATENCY_MARGIN * ((QUEUE / BATCH + 2) * compute_p99 + max_wait_s + outside_p99)
    assert admitted_p99 <= latency_bound, (
        f"admitted p99 {admitted_p99 * 1e3:.1f} ms > {latency_bound * 1e3:.1f} ms (batch compute p99 "
        f"{compute_p99 * 1e3:.1f} ms, outside the server p99 {outside_p99 * 1e3:.1f} ms); {context}")

    # The queue gauge never went past the limit.
    assert watch.depth and max(watch.depth) <= QUEUE, watch.depth

    # Memory: what the queue, the running batch and the responses being sent can hold, eight
    # times over, plus 64 MiB for allocator and thread-stack noise. An unbounded queue would
    # hold about (OVERLOAD - 1) * capacity * OVERLOAD_S requests by the end: far more.
    per_request = work.input_bytes() + work.output_bytes()
    allowance = 64 * 2**20 + 8 * (QUEUE + 2 * BATCH) * per_request
    peak = max(watch.rss)
    print(f"RSS before {baseline_rss / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, allowance "
          f"{allowance / 2**20:.0f} MiB; queue depth max {max(watch.depth):.0f}")
    assert peak <= baseline_rss + allowance, (
        f"RSS {baseline_rss / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB during the overload "
        f"(allowance {allowance / 2**20:.0f} MiB); {context}")

    # Admitted results are right, bit for bit.
    assert len(res.samples) == min(8, int(admitted.sum()))
    want_out = verify.expected(work)
    for _, got in res.samples:
        assert_bitwise_equal(got, want_out)

    # -- recovery: gauges back to 0, SERVING, and the capacity again
    deadline = time.monotonic() + 10
    while True:
        m = scrape(srv.metrics_url)
        idle = sample(m, "roi_queue_depth") == 0 and sample(m, "roi_requests_in_flight") == 0
        if idle or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert idle, (sample(m, "roi_queue_depth"), sample(m, "roi_requests_in_flight"))
    with RoIClient(srv.address, timeout=10) as client:
        assert client.health() == "SERVING"
        assert client.health("roi.v1.RoIService") == "SERVING"
    # Best of three short runs, each also taken at the first run's kernel speed (as above).
    again = []
    for _ in range(3):
        r, r_res = await closed(senders, CAPACITY_S)
        assert r["error_count"] == 0, r["errors"]
        again.append((r["throughput_rps"], r["throughput_rps"] * compute_per_request(r_res) / cap_compute))
        if max(again[-1]) >= 0.7 * capacity:
            break
    print(f"after: {[(round(a), round(b)) for a, b in again]} req/s (as measured, at the first speed)")
    assert max(max(a) for a in again) >= 0.7 * capacity, (
        f"after the overload: {again} vs {capacity:.1f} req/s")


def test_a_burst_beyond_grpcs_default_pending_limit_is_served(tmp_path, seed):
    """Thousands of small calls at once outrun the server's event loop, and wait in gRPC's
    transport until it takes them. gRPC's default limit on those (1,000) cancelled the excess
    with CANCELLED, which clients neither retry nor read as overload: the server raises it,
    and every call of the burst is answered, OK or (past max_queue) RESOURCE_EXHAUSTED."""
    burst = 4000
    srv = start_server_process(tmp_path, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                               "--device", "cpu")
    try:
        codes = asyncio.run(asyncio.wait_for(_burst(srv.address, seed, burst), timeout=120))
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    assert set(codes) <= OK_CODES, codes
    assert sum(codes.values()) == burst and codes.get("OK", 0) > 0, codes


async def _burst(address: str, seed: int, n: int) -> dict[str, int]:
    payload = encode(wl.make("tiny", seed=seed)).payload
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/roi.v1.RoIService/Pool")

        async def one() -> None:
            try:
                await call(payload, timeout=TIMEOUT_S)
                name = "OK"
            except grpc.aio.AioRpcError as exc:
                name = exc.code().name
            codes[name] = codes.get(name, 0) + 1

        await asyncio.gather(*(one() for _ in range(n)))
    return codes
