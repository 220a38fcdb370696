"""Dynamic batching: concurrent compatible requests become one kernel launch.

Requests with the same :attr:`~roi_server.codec.DecodedRequest.key` (op, parameters, dtype,
channels, and the map sizes where the op needs them equal) join one open group. When the
device has a free slot, the oldest group runs at once with whatever it holds: an idle server
adds no delay, and under load batches grow from the requests that arrive while the device is
busy. A group also closes when it reaches a cap (requests, boxes or map bytes). With
``max_wait`` above zero a group instead waits for that long after its first request (or for
a cap), trading latency for fuller batches at low load.

The device's worker thread checks each request again when its batch starts: one whose client
went away or whose deadline passed is not computed. If a batch fails (a request the kernel
refuses, or the device running out of memory), it is split in halves and each half retried,
down to single requests: one bad request fails only itself, a batch too large for the device's
memory is run in parts that fit, and the requests around them stay batched.

On the CPU a small batch (one whose kernel reads at most ``inline_max_samples`` samples, see
:func:`inline_cost`) is computed by the dispatcher on the event loop itself: such a kernel
takes less time than handing it to the worker thread and its results back, which are two
wake-ups across threads, each waiting for the GIL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from .codec import DecodedRequest
from .engine import KernelEngine, Launched
from .errors import DeadlineExpired, KernelError, QueueFull, ServiceError, Unavailable, kernel_message
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)


def inline_cost(reqs: list[DecodedRequest], limit: int) -> int | None:
    """An upper bound of the samples the kernel reads for ``reqs`` (bilinear samples, or bin
    pixels for the pool ops), or None when it is above ``limit``: per output element,
    sampling_ratio squared, or with adaptive sampling and for the pool ops each bin's size
    in map pixels (plus one), as the kernels count them."""
    total = 0
    for r in reqs:
        bins = r.out_channels * r.pooled_height * r.pooled_width
        if r.num_boxes * bins > limit:
            return None
        if not r.num_boxes:
            continue
        if r.sampling_ratio > 0 and not r.op.endswith("pool"):
            per_box = float(r.sampling_ratio * r.sampling_ratio * r.num_boxes)
        else:
            b = r.rois.numpy()
            scale = max(r.scales) if r.scales else r.spatial_scale
            with np.errstate(over="ignore"):  # huge boxes give inf: no inline batch
                size = b[:, 3:5] if r.op == "roi_align_rotated" else b[:, 3:5] - b[:, 1:3]
                per_bin = np.ceil(np.abs(size) * (scale / np.array([r.pooled_width, r.pooled_height])) + 1)
                per_box = float(per_bin.prod(axis=1).sum())
        total += int(min(per_box * bins, limit + 1))
        if total > limit:
            return None
    return total


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_requests: int = 64
    max_batch_boxes: int = 8192
    max_batch_bytes: int = 256 << 20
    max_wait_s: float = 0.0
    max_queue: int = 256
    # 0: every batch goes to the worker thread.
    inline_max_samples: int = 0


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batch."""

    output: torch.Tensor
    queue_s: float
    compute_s: float
    batch_id: int
    batch_requests: int
    batch_boxes: int


@dataclass(eq=False)
class Ticket:
    req: DecodedRequest
    future: asyncio.Future
    arrived: float
    deadline: float | None = None
    # Written on the event loop, read by the worker thread (a bool read needs no lock).
    cancelled: bool = False

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def alive(self, now: float) -> bool:
        return not self.cancelled and not self.expired(now)


@dataclass(eq=False)
class _Group:
    key: tuple
    tickets: list[Ticket] = field(default_factory=list)
    boxes: int = 0
    nbytes: int = 0
    ready: bool = False
    dispatched: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Piece:
    """Requests that ran in one launch, or one request whose launch failed."""

    tickets: list[Ticket]
    launched: Launched | None = None
    error: BaseException | None = None


@dataclass
class _Outcome:
    """What the worker thread made of a batch."""

    live: list[Ticket]
    dead: list[Ticket]
    launch_start: float = 0.0
    # The whole batch when it launched; None when it failed and was split into ``pieces``.
    launched: Launched | None = None
    pieces: list[_Piece] | None = None


class DynamicBatcher:
    def __init__(self, engine: KernelEngine, policy: BatchPolicy, metrics: ServiceMetrics | None = None) -> None:
        self.engine = engine
        self.policy = policy
        self.metrics = metrics
        self._open: dict[tuple, _Group] = {}
        self._ready: deque[_Group] = deque()
        self._depth = 0
        self._closed = False
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._dispatcher: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._batch_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inline = engine.device.type == "cpu" and policy.inline_max_samples > 0

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._inline:
            # Inline batches are small: they run on one thread, so that no OpenMP team spins
            # on the cores that gRPC and the other requests need. The count is per thread;
            # the worker keeps the server's (set there first: torch hands the last count set
            # to threads that start later).
            threads = self.engine.num_threads
            await self._loop.run_in_executor(self.engine.worker, torch.set_num_threads, threads)
            torch.set_num_threads(1)
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.engine.pipeline_depth)
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="roi-batcher")

    async def close(self) -> None:
        """Refuses new requests, runs every queued one without waiting for timers, returns
        when all have finished."""
        self._closed = True
        for group in list(self._open.values()):
            self._mark_ready(group)
        while self._depth > 0 or self._ready or self._running:
            if self._running:
                await asyncio.wait(set(self._running))
            else:
                await asyncio.sleep(0.001)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            try:
                await self._dispatcher
            except asyncio.CancelledError:
                pass

    @property
    def queue_depth(self) -> int:
        return self._depth

    # -- submission ---------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self._depth >= self.policy.max_queue

    def refuse_if_full(self) -> None:
        """Raises QueueFull when ``max_queue`` requests wait already."""
        if self.full:
            raise QueueFull(f"queue full ({self.policy.max_queue} requests waiting); retry later")

    async def submit(self, req: DecodedRequest, timeout_s: float | None = None) -> BatchResult:
        """Queues ``req`` and returns its result. ``timeout_s`` is the time left before the
        client's deadline (None: no deadline)."""
        if self._closed or self._loop is None:
            raise Unavailable("the server is shutting down")
        self.refuse_if_full()
        now = time.perf_counter()
        ticket = Ticket(
            req=req,
            future=self._loop.create_future(),
            arrived=now,
            deadline=None if timeout_s is None else now + timeout_s,
        )
        self._add(ticket)
        try:
            return await ticket.future
        except asyncio.CancelledError:
            ticket.cancelled = True
            self._withdraw(ticket)
            raise

    def _fits(self, group: _Group, req: DecodedRequest) -> bool:
        p = self.policy
        return (
            len(group.tickets) < p.max_batch_requests
            and group.boxes + req.num_boxes <= p.max_batch_boxes
            and group.nbytes + req.map_bytes <= p.max_batch_bytes
        )

    def _full(self, group: _Group) -> bool:
        p = self.policy
        return len(group.tickets) >= p.max_batch_requests or group.boxes >= p.max_batch_boxes or group.nbytes >= p.max_batch_bytes

    def _add(self, ticket: Ticket) -> None:
        req = ticket.req
        group = self._open.get(req.key)
        if group is not None and group.tickets and not self._fits(group, req):
            self._close_group(group)
            group = None
        if group is None:
            group = _Group(req.key)
            self._open[req.key] = group
            if self.policy.max_wait_s > 0:
                assert self._loop is not None
                group.timer = self._loop.call_later(self.policy.max_wait_s, self._mark_ready, group)
            else:
                # Runs as soon as a slot is free; until then it takes the requests that come.
                assert self._wake is not None
                self._wake.set()
        group.tickets.append(ticket)
        group.boxes += req.num_boxes
        group.nbytes += req.map_bytes
        self._set_depth(self._depth + 1)
        if self._full(group):
            self._close_group(group)

    def _close_group(self, group: _Group) -> None:
        """No more requests join ``group``; it runs when the device is free."""
        if self._open.get(group.key) is group:
            del self._open[group.key]
        self._mark_ready(group)

    def _mark_ready(self, group: _Group) -> None:
        if group.ready or group.dispatched:
            return
        group.ready = True
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        self._ready.append(group)
        assert self._wake is not None
        self._wake.set()

    def _withdraw(self, ticket: Ticket) -> None:
        """Takes a cancelled request out of its group if the group has not started."""
        group = self._open.get(ticket.req.key)
        candidates = [group] if group is not None else []
        candidates += [g for g in self._ready if g is not group]
        for g in candidates:
            if ticket in g.tickets:
                g.tickets.remove(ticket)
                g.boxes -= ticket.req.num_boxes
                g.nbytes -= ticket.req.map_bytes
                self._set_depth(self._depth - 1)
                return

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self.metrics is not None:
            self.metrics.queue_depth.set(depth)

    # -- dispatch -----------------------------------------------------------------------------

    def _next_group(self) -> _Group | None:
        """The group to run now: the first ready one, or with no ``max_wait`` the oldest open
        one."""
        if self._ready:
            return self._ready.popleft()
        if self.policy.max_wait_s <= 0 and self._open:
            return next(iter(self._open.values()))
        return None

    async def _dispatch_forever(self) -> None:
        assert self._wake is not None and self._slots is not None
        while True:
            await self._slots.acquire()
            while (group := self._next_group()) is None:
                self._wake.clear()
                await self._wake.wait()
            if self._open.get(group.key) is group:
                del self._open[group.key]
            group.dispatched = True
            tickets = list(group.tickets)
            self._set_depth(self._depth - len(tickets))
            if not tickets:
                self._slots.release()
                continue
            if self._inline and inline_cost([t.req for t in tickets], self.policy.inline_max_samples) is not None:
                self._run_inline(tickets)
                continue
            task = asyncio.create_task(self._run(tickets))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _run_inline(self, tickets: list[Ticket]) -> None:
        """A small CPU batch, computed here on the event loop (see the module's doc)."""
        assert self._slots is not None
        batch_id = next(self._batch_ids)
        try:
            self._resolve(batch_id, self._launch_live(tickets))
        except Exception as exc:  # noqa: BLE001
            self._fail(tickets, exc, batch_id)
        finally:
            self._slots.release()

    def _fail(self, tickets: list[Ticket], exc: BaseException, batch_id: int) -> None:
        if not isinstance(exc, asyncio.CancelledError):
            log.exception("batch %d: unexpected failure", batch_id, exc_info=exc)
        for t in tickets:
            if not t.future.done():
                t.future.set_exception(ServiceError("internal error (logged by the server)"))

    async def _run(self, tickets: list[Ticket]) -> None:
        assert self._loop is not None and self._slots is not None
        batch_id = next(self._batch_ids)
        try:
            outcome = await self._loop.run_in_executor(self.engine.worker, self._launch_live, tickets)
            if outcome.launched is not None and not outcome.launched.done:
                assert self.engine.waiter is not None
                try:
                    await self._loop.run_in_executor(self.engine.waiter, outcome.launched.wait)
                except Exception as exc:  # noqa: BLE001  (the batch failed on the device: split it)
                    outcome.launched = None
                    outcome.pieces = await self._loop.run_in_executor(
                        self.engine.worker, self._split, outcome.live, exc, batch_id
                    )
            self._resolve(batch_id, outcome)
        except BaseException as exc:
            self._fail(tickets, exc, batch_id)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._slots.release()

    # Runs on the worker thread.
    def _launch_live(self, tickets: list[Ticket]) -> _Outcome:
        now = time.perf_counter()
        live = [t for t in tickets if t.alive(now)]
        outcome = _Outcome(live=live, dead=[t for t in tickets if not t.alive(now)], launch_start=now)
        if not live:
            return outcome
        try:
            outcome.launched = self.engine.launch([t.req for t in live])
        except Exception as exc:  # noqa: BLE001
            outcome.pieces = self._split(live, exc, None)
        return outcome

    # Runs on the worker thread.
    def _split(self, tickets: list[Ticket], exc: BaseException, batch_id: int | None) -> list[_Piece]:
        """``tickets`` failed together with ``exc``: runs each half again, halving what fails
        until single requests carry their own errors."""
        if isinstance(exc, torch.OutOfMemoryError):
            self.engine.release_cached_memory()
        if len(tickets) == 1:
            return [_Piece(tickets, error=exc)]
        log.warning(
            "batch %s of %d requests failed (%s); retrying it in halves",
            batch_id if batch_id is not None else "-",
            len(tickets),
            kernel_message(exc),
        )
        pieces: list[_Piece] = []
        half = len(tickets) // 2
        for part in (tickets[:half], tickets[half:]):
            try:
                launched = self.engine.launch([t.req for t in part])
                launched.wait()
                pieces.append(_Piece(part, launched))
            except Exception as part_exc:  # noqa: BLE001
                pieces.extend(self._split(part, part_exc, batch_id))
        return pieces

    def _resolve(self, batch_id: int, outcome: _Outcome) -> None:
        for t in outcome.dead:
            if not t.future.done():
                t.future.set_exception(DeadlineExpired("deadline passed while the request was queued"))
        if not outcome.live:
            return
        op = outcome.live[0].req.op
        if outcome.launched is not None:
            launched = outcome.launched
            assert launched.outputs is not None
            boxes = sum(t.req.num_boxes for t in outcome.live)
            self._record_batch(op, len(outcome.live), boxes, launched.compute_s)
            for t, out in zip(outcome.live, launched.outputs):
                self._deliver(t, out, outcome.launch_start, launched.compute_s, batch_id, len(outcome.live), boxes)
            return
        assert outcome.pieces is not None
        first = True
        for piece in outcome.pieces:
            if piece.launched is None:
                assert piece.error is not None and len(piece.tickets) == 1
                t = piece.tickets[0]
                if not t.future.done():
                    t.future.set_exception(_request_error(piece.error))
                continue
            launched = piece.launched
            assert launched.outputs is not None
            boxes = sum(t.req.num_boxes for t in piece.tickets)
            self._record_batch(op, len(piece.tickets), boxes, launched.compute_s)
            sub_id = batch_id if first else next(self._batch_ids)
            first = False
            for t, out in zip(piece.tickets, launched.outputs):
                self._deliver(t, out, outcome.launch_start, launched.compute_s, sub_id, len(piece.tickets), boxes)

    def _record_batch(self, op: str, requests: int, boxes: int, compute_s: float) -> None:
        m = self.metrics
        if m is None:
            return
        m.child(m.batches, op).inc()
        m.batch_requests.observe(requests)
        m.batch_boxes.observe(boxes)
        m.child(m.compute, op).observe(compute_s)

    def _deliver(
        self, t: Ticket, out: torch.Tensor, launch_start: float, compute_s: float, batch_id: int, n: int, boxes: int
    ) -> None:
        queue_s = max(0.0, launch_start - t.arrived)
        if self.metrics is not None:
            self.metrics.child(self.metrics.queue_wait, t.req.op).observe(queue_s)
        if not t.future.done():
            t.future.set_result(BatchResult(out, queue_s, compute_s, batch_id, n, boxes))


def _request_error(exc: BaseException) -> ServiceError:
    """A single request's kernel failure, as the client sees it."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return ServiceError("out of device memory for this request", code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    if isinstance(exc, (RuntimeError, ValueError, IndexError, TypeError)):
        # The kernels' argument checks (TORCH_CHECK) raise these; the service validates the
        # same preconditions first, so reaching here means an input the kernel refused.
        log.info("kernel refused a request: %s", kernel_message(exc))
        return KernelError(f"the kernel refused the input: {kernel_message(exc)}")
    log.error("unexpected error from the kernel", exc_info=exc)
    return ServiceError("internal error (logged by the server)")

