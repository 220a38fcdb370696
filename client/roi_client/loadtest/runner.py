"""Closed-loop, open-loop (Poisson) and sweep drivers on one asyncio event loop.

Each driver runs a warm-up (not recorded), then a measured window given by a duration or a
request count, then waits for the measured requests still in flight. A request is measured
when it is due inside the window: sent, in closed loop; scheduled, in open loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from .stats import Records

clock = time.perf_counter


@dataclass
class Reply:
    output: Any  # the decoded result (numpy), kept only for --verify
    timings: dict  # queue_seconds, compute_seconds, total_seconds, batch_requests, batch_boxes
    received_bytes: int


class Sender(Protocol):
    """One target: sends the prepared request and returns its reply, or raises an exception
    whose ``code`` names the gRPC status."""

    name: str
    sent_bytes: int
    boxes: int

    async def send(self) -> Reply: ...


@dataclass
class Plan:
    warmup_s: float = 1.0
    duration_s: float | None = 5.0  # measured window; or
    requests: int | None = None  # a count of measured requests
    max_inflight: int = 4096  # open loop: beyond this many outstanding requests the sender waits


@dataclass
class RunResult:
    records: Records
    window_start: float
    window_end: float
    mode: str
    concurrency: int | None = None
    rate: float | None = None
    max_inflight_hits: int = 0
    samples: list = field(default_factory=list)  # (target index, output) kept for --verify


class _Sampler:
    """A uniform sample of ``size`` outputs over the run (reservoir sampling), for --verify:
    holding every output would keep the whole run's responses in memory."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seen = 0
        self.items: list = []
        self._rng = random.Random(seed)

    def offer(self, target: int, output: Any) -> None:
        if self.size <= 0:
            return
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append((target, output))
        else:
            j = self._rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = (target, output)


def _code_of(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        code = code()
    name = getattr(code, "name", None)
    if name:
        return str(name)
    if code is not None:
        return str(code)
    if isinstance(exc, asyncio.TimeoutError):
        return "DEADLINE_EXCEEDED"
    return type(exc).__name__


class Progress:
    """Calls ``tick(done_in_window, errors)`` a few times a second while a run goes on."""

    def __init__(self, tick: Callable[[float, int, int], None] | None):
        self.tick = tick


async def _one(sender: Sender, index: int, due: float, sent_at: float, measured: bool, rec: Records,
               sampler: _Sampler, counters: dict) -> None:
    try:
        reply = await sender.send()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a figure, not a crash
        done = clock()
        if measured:
            rec.add(start=due, latency=done - due, lag=sent_at - due, code=_code_of(exc), target=index,
                    sent=sender.sent_bytes, received=0, boxes=sender.boxes)
            counters["errors"] += 1
            counters["last_done"] = max(counters["last_done"], done)
            counters["done"] += 1
        return
    done = clock()
    if measured:
        rec.add(start=due, latency=done - due, lag=sent_at - due, code="OK", target=index,
                sent=sender.sent_bytes, received=reply.received_bytes, boxes=sender.boxes,
                timings=reply.timings)
        counters["last_done"] = max(counters["last_done"], done)
        counters["done"] += 1
        sampler.offer(index, reply.output)


async def _ticker(tick, counters: dict, t_window: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if tick is not None:
            now = clock()
            tick(max(now - t_window, 0.0), counters["done"], counters["errors"])
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def closed_loop(senders: list[Sender], concurrency: int, plan: Plan, *, verify: int = 0,
                      tick=None) -> RunResult:
    """``concurrency`` workers, each sending its next request as soon as the last one is
    answered. Workers take the targets in turn."""
    rec = Records()
    sampler = _Sampler(verify)
    counters = {"done": 0, "errors": 0, "issued": 0, "last_done": 0.0}
    t0 = clock()
    t_window = t0 + plan.warmup_s
    t_end = t_window + plan.duration_s if plan.duration_s is not None else None
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        index = w % len(senders)
        sender = senders[index]
        while True:
            t = clock()
            measured = t >= t_window
            if measured:
                if t_end is not None and t >= t_end:
                    return
                if plan.requests is not None:
                    if counters["issued"] >= plan.requests:
                        return
                    counters["issued"] += 1
            await _one(sender, index, t, t, measured, rec, sampler, counters)

    ticker = asyncio.create_task(_ticker(tick, counters, t_window, stop))
    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        stop.set()
        await ticker
    end = max(counters["last_done"], t_window)
    return RunResult(rec, t_window, end, "closed", concurrency=concurrency, samples=sampler.items)


async def open_loop(senders: list[Sender], rate: float, plan: Plan, *, verify: int = 0, tick=None,
                    seed: int = 0) -> RunResult:
    """Poisson arrivals at ``rate`` per second, whatever the server's pace, so that queueing
    shows. Latency counts from each request's scheduled time (no coordinated omission)."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rec = Records()
    sampler = _Sampler(verify)
    counters = {"done": 0, "errors": 0, "issued": 0, "last_done": 0.0}
    rng = random.Random(seed)
    t0 = clock()
    t_window = t0 + plan.warmup_s
    t_end = t_window + plan.duration_s if plan.duration_s is not None else None
    inflight: set[asyncio.Task] = set()
    slots = asyncio.Semaphore(plan.max_inflight)
    hits = 0
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(tick, counters, t_window, stop))

    async def run_one(sender, index, due, measured):
        try:
            await _one(sender, index, due, clock(), measured, rec, sampler, counters)
        finally:
            slots.release()

    due = t0
    n = 0
    try:
        while True:
            due += rng.expovariate(rate)
            measured = due >= t_window
            if measured:
                if t_end is not None and due >= t_end:
                    break
                if plan.requests is not None and counters["issued"] >= plan.requests:
                    break
                counters["issued"] += 1
            wait = due - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            if slots.locked():
                hits += measured
            await slots.acquire()
            index = n % len(senders)
            n += 1
            task = asyncio.create_task(run_one(senders[index], index, due, measured))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.gather(*list(inflight))
    finally:
        stop.set()
        await ticker
    end = max(counters["last_done"], t_window)
    return RunResult(rec, t_window, end, "open", rate=rate, max_inflight_hits=hits, samples=sampler.items)


def run(coro: Awaitable[RunResult]) -> RunResult:
    return asyncio.run(coro)
