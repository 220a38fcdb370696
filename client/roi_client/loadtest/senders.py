"""Targets as the load tester drives them: one :class:`~roi_client.AsyncRoIClient` per target
and connection, all sending one :class:`~roi_client.EncodedRequest` built once. Through shared
memory (``--shared-memory``) each client writes the request's large tensors into a region of
its own once, and each call has its result written into a region borrowed for it."""

from __future__ import annotations

from dataclasses import asdict

import grpc

from .._proto.roi.v1 import roi_pb2
from ..aio import AsyncRoIClient
from ..codec import WIRE_DTYPES, dtype_from_name
from ..errors import RoIError
from ..request import EncodedRequest, RequestDraft
from .runner import Reply
from .workload import Workload


def draft(w: Workload, wire_dtype: str | None = None) -> RequestDraft:
    """The workload as one request, not yet serialised (the maps travel as ``wire_dtype``,
    default their own dtype)."""
    common = dict(boxes=w.boxes, output_size=w.output_size, wire_dtype=wire_dtype)
    if w.op == "multiscale_roi_align":
        return RequestDraft.build(w.op, features=w.maps, image_sizes=w.image_sizes, sampling_ratio=w.sampling_ratio,
                                  aligned=w.aligned, pool_mode=w.pool_mode, **common)
    if w.op == "ragged_roi_align":
        return RequestDraft.build("roi_align", input=w.maps, spatial_scale=w.spatial_scale,
                                  sampling_ratio=w.sampling_ratio, aligned=w.aligned, pool_mode=w.pool_mode, **common)
    if w.op in ("roi_pool", "ps_roi_pool"):
        return RequestDraft.build(w.op, input=w.maps[0], spatial_scale=w.spatial_scale, **common)
    if w.op == "ps_roi_align":
        return RequestDraft.build(w.op, input=w.maps[0], spatial_scale=w.spatial_scale,
                                  sampling_ratio=w.sampling_ratio, **common)
    if w.op == "roi_align_rotated":
        return RequestDraft.build(w.op, input=w.maps[0], spatial_scale=w.spatial_scale,
                                  sampling_ratio=w.sampling_ratio, aligned=w.aligned, **common)
    return RequestDraft.build(w.op, input=w.maps[0], spatial_scale=w.spatial_scale, sampling_ratio=w.sampling_ratio,
                              aligned=w.aligned, pool_mode=w.pool_mode, **common)


def encode(w: Workload, wire_dtype: str | None = None) -> EncodedRequest:
    """The workload as one serialised request."""
    return draft(w, wire_dtype).encode()


def response_bytes(output_shape, wire_dtype: str, region: str = "") -> int:
    """The serialised size of a PoolResponse carrying ``output_shape`` (written into the output
    region ``region`` when given: the message holds its reference): the client hands back the
    decoded tensor, not the message. Computed once per shape, with timings of typical width."""
    count = 1
    for s in output_shape:
        count *= int(s)
    wire = dtype_from_name(wire_dtype)
    msg = roi_pb2.PoolResponse()
    msg.output.dtype = wire
    msg.output.shape.extend(int(s) for s in output_shape)
    nbytes = count * WIRE_DTYPES[wire].itemsize
    if region:
        msg.output.shared_memory.CopyFrom(roi_pb2.SharedMemoryRef(region=region, byte_size=nbytes))
    else:
        msg.output.data = bytes(nbytes)
    t = msg.timings
    t.queue_seconds = t.compute_seconds = t.total_seconds = 1e-3
    t.batch_id, t.batch_requests, t.batch_boxes = 1 << 20, 8, 1 << 12
    return msg.ByteSize()


# gRPC fails messages of 1 GiB and more; the server's own limit is what applies.
MAX_MESSAGE_BYTES = (1 << 30) - (1 << 20)


class ClientSender:
    def __init__(self, client: AsyncRoIClient, request: EncodedRequest, name: str, wire_dtype: str):
        self.client = client
        self.request = request
        self.name = name
        self.sent_bytes = request.nbytes
        self.boxes = request.num_boxes
        self._wire_dtype = wire_dtype
        self._received: dict[tuple, int] = {}

    async def send(self) -> Reply:
        return self._reply(await self.client.pool_with_timings(self.request))

    def _reply(self, result, region: str = "") -> Reply:
        shape = tuple(result.output.shape)
        received = self._received.get(shape)
        if received is None:
            received = self._received[shape] = response_bytes(shape, self._wire_dtype, region)
        t = result.timings
        timings = {"queue_seconds": t.queue_s, "compute_seconds": t.compute_s, "total_seconds": t.total_s,
                   "batch_requests": t.batch_requests, "batch_boxes": t.batch_boxes}
        return Reply(result.output, timings, received)


class SharedMemorySender(ClientSender):
    """A sender through its client's shared memory: ``request`` refers to the tensors written
    into a region once, and each call borrows a region for its result (so one per call in
    flight), pinned to the result while it lives (as for a caller of the op methods)."""

    def __init__(self, client: AsyncRoIClient, request: EncodedRequest, name: str, wire_dtype: str, output_nbytes: int):
        super().__init__(client, request, name, wire_dtype)
        self._output_nbytes = output_nbytes

    async def send(self) -> Reply:
        shm = self.client.shared_memory
        assert shm is not None
        if not self._output_nbytes:  # a small result comes in the answer
            return self._reply(await self.client.pool_with_timings(self.request))
        region = await shm.borrow(self._output_nbytes)
        if region is None:
            raise RoIError(grpc.StatusCode.FAILED_PRECONDITION, f"shared memory became unavailable: {shm.disabled_reason}")
        try:
            result = await self.client.pool_with_timings(self.request.with_output_region(region, 0, region.size))
        except BaseException:
            await shm.discard(region)
            raise
        shm.settle(result.output, region)
        return self._reply(result, region.name)


async def _shared_memory_sender(client: AsyncRoIClient, request: RequestDraft, target: str, wire: str) -> ClientSender:
    shm = client.shared_memory
    assert shm is not None
    nbytes = request.region_bytes(shm.min_bytes, output=False)
    encoded = request.encode()
    if nbytes:
        region = await shm.borrow(nbytes)
        if region is None:
            raise ConnectionError(f"{target}: --shared-memory: the server does not take it: {shm.disabled_reason}")
        # Held for the client's life: its close unregisters it.
        encoded = request.encode_into(region, shm.min_bytes, output=False)
    output_nbytes = request.output_nbytes if request.output_nbytes >= shm.min_bytes else 0
    return SharedMemorySender(client, encoded, target, wire, output_nbytes)


async def open_senders(targets: list[str], w: Workload, *, timeout: float, wire_dtype: str | None = None,
                       connections: int = 1, max_message_bytes: int = MAX_MESSAGE_BYTES,
                       client_options: dict | None = None, shared_memory: bool = False):
    """(senders, server descriptions, async close). Each target gets ``connections`` clients of
    its own connection; requests take the senders in turn. ``client_options`` go to each
    :class:`~roi_client.AsyncRoIClient` (TLS files, token). ``shared_memory``: through shared
    memory (same host only; a server that refuses it is a ConnectionError)."""
    request = draft(w, wire_dtype)
    encoded = request.encode() if not shared_memory else None
    wire = wire_dtype or w.dtype
    clients, senders = [], []
    # Retries of UNAVAILABLE would hide failures from the error counts, so each call is tried once.
    # A private subchannel pool gives each client its own TCP connection even to the same address.
    options = [("grpc.use_local_subchannel_pool", 1)]
    for target in targets:
        for _ in range(connections):
            client = AsyncRoIClient(target, timeout=timeout, max_attempts=1, max_message_bytes=max_message_bytes,
                                    options=options, shared_memory=shared_memory, **(client_options or {}))
            clients.append(client)
            if encoded is not None:
                senders.append(ClientSender(client, encoded, target, wire))

    async def close() -> None:
        for c in clients:
            await c.close()

    servers = []
    for target, client in zip(targets, clients[::connections]):
        try:
            info = await client.describe(timeout=min(timeout, 30.0))
        except RoIError as exc:
            await close()
            raise ConnectionError(f"{target}: {exc}") from None
        d = asdict(info)
        d.update(target=target, **{k: v for k, v in info.limits.items()})
        servers.append(d)
    if shared_memory:
        try:
            for client in clients:
                senders.append(await _shared_memory_sender(client, request, client.target, wire))
        except RoIError as exc:
            await close()
            raise ConnectionError(f"{client.target}: --shared-memory: {exc}") from None
        except BaseException:
            await close()
            raise
    return senders, servers, close
