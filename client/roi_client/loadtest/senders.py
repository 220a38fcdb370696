"""Targets as the load tester drives them: one :class:`~roi_client.AsyncRoIClient` per target
and connection, all sending one :class:`~roi_client.EncodedRequest` built once."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from .._proto.roi.v1 import roi_pb2
from ..aio import AsyncRoIClient
from ..codec import WIRE_DTYPES, dtype_from_name
from ..errors import RoIError
from ..request import EncodedRequest
from .runner import Reply
from .workload import Workload


def encode(w: Workload, wire_dtype: str | None = None) -> EncodedRequest:
    """The workload as one serialised request (the maps travel as ``wire_dtype``, default
    their own dtype)."""
    common = dict(boxes=w.boxes, output_size=w.output_size, wire_dtype=wire_dtype)
    if w.op == "multiscale_roi_align":
        return EncodedRequest.build(w.op, features=w.maps, image_sizes=w.image_sizes, sampling_ratio=w.sampling_ratio,
                                    aligned=w.aligned, pool_mode=w.pool_mode, **common)
    if w.op == "ragged_roi_align":
        return EncodedRequest.build("roi_align", input=w.maps, spatial_scale=w.spatial_scale,
                                    sampling_ratio=w.sampling_ratio, aligned=w.aligned, pool_mode=w.pool_mode, **common)
    if w.op in ("roi_pool", "ps_roi_pool"):
        return EncodedRequest.build(w.op, input=w.maps[0], spatial_scale=w.spatial_scale, **common)
    if w.op == "ps_roi_align":
        return EncodedRequest.build(w.op, input=w.maps[0], spatial_scale=w.spatial_scale,
                                    sampling_ratio=w.sampling_ratio, **common)
    if w.op == "roi_align_rotated":
        return EncodedRequest.build(w.op, input=w.maps[0], spatial_scale=w.spatial_scale,
                                    sampling_ratio=w.sampling_ratio, aligned=w.aligned, **common)
    return EncodedRequest.build(w.op, input=w.maps[0], spatial_scale=w.spatial_scale, sampling_ratio=w.sampling_ratio,
                                aligned=w.aligned, pool_mode=w.pool_mode, **common)


def response_bytes(output_shape, wire_dtype: str) -> int:
    """The serialised size of a PoolResponse carrying ``output_shape``: the client hands back
    the decoded tensor, not the message. Computed once per shape, with timings of typical width."""
    count = 1
    for s in output_shape:
        count *= int(s)
    wire = dtype_from_name(wire_dtype)
    msg = roi_pb2.PoolResponse()
    msg.output.dtype = wire
    msg.output.shape.extend(int(s) for s in output_shape)
    msg.output.data = bytes(count * WIRE_DTYPES[wire].itemsize)
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
        result = await self.client.pool_with_timings(self.request)
        shape = tuple(result.output.shape)
        received = self._received.get(shape)
        if received is None:
            received = self._received[shape] = response_bytes(shape, self._wire_dtype)
        t = result.timings
        timings = {"queue_seconds": t.queue_s, "compute_seconds": t.compute_s, "total_seconds": t.total_s,
                   "batch_requests": t.batch_requests, "batch_boxes": t.batch_boxes}
        return Reply(result.output, timings, received)


async def open_senders(targets: list[str], w: Workload, *, timeout: float, wire_dtype: str | None = None,
                       connections: int = 1, max_message_bytes: int = MAX_MESSAGE_BYTES,
                       client_options: dict | None = None):
    """(senders, server descriptions, async close). Each target gets ``connections`` clients of
    its own connection; requests take the senders in turn. ``client_options`` go to each
    :class:`~roi_client.AsyncRoIClient` (TLS files, token)."""
    request = encode(w, wire_dtype)
    wire = wire_dtype or w.dtype
    clients, senders = [], []
    # Retries of UNAVAILABLE would hide failures from the error counts, so each call is tried once.
    # A private subchannel pool gives each client its own TCP connection even to the same address.
    options = [("grpc.use_local_subchannel_pool", 1)]
    for target in targets:
        for _ in range(connections):
            client = AsyncRoIClient(target, timeout=timeout, max_attempts=1, max_message_bytes=max_message_bytes,
                                    options=options, **(client_options or {}))
            clients.append(client)
            senders.append(ClientSender(client, request, target, wire))

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
    return senders, servers, close
