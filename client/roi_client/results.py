"""What the client hands back: results with the server's timings, and the server's description."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from . import codec, framing
from ._proto.roi.v1 import roi_pb2
from .errors import RoIError
from .request import EncodedRequest


@dataclass(frozen=True)
class Timings:
    """Where the server spent a request's time (seconds), and the batch it ran in."""

    queue_s: float
    compute_s: float
    total_s: float
    batch_id: int
    batch_requests: int
    batch_boxes: int

    @classmethod
    def from_proto(cls, t: roi_pb2.Timings) -> Timings:
        return cls(
            queue_s=t.queue_seconds,
            compute_s=t.compute_seconds,
            total_s=t.total_seconds,
            batch_id=t.batch_id,
            batch_requests=t.batch_requests,
            batch_boxes=t.batch_boxes,
        )


@dataclass(frozen=True)
class PoolResult:
    """One answered request. ``output`` is ``[K, C, PH, PW]`` (numpy: a read-only view of the
    response, or of the shared memory region the result was written into; torch when the
    request's maps were torch tensors), or None with ``error`` set (stream answers only; a
    unary call raises instead)."""

    id: str
    output: Any
    timings: Timings | None
    error: RoIError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ServerInfo:
    version: str
    device: str
    device_name: str
    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    limits: dict[str, float]
    torch_version: str
    threads: int


def decode_response(raw: bytes, request: EncodedRequest) -> PoolResult:
    resp, frame = framing.parse(roi_pb2.PoolResponse, raw)
    return _result(resp, frame, request)


def _output_in_region(ref: roi_pb2.SharedMemoryRef, request: EncodedRequest | None) -> memoryview:
    """The bytes of an output the server wrote into the request's output region (read-only,
    as an output read from a message is)."""
    region = request.output_region if request is not None else None
    expected = region is not None and ref.region == region.name and ref.offset == request.output_offset
    if not expected or ref.offset + ref.byte_size > region.size:
        asked = f"{region.name!r} at {request.output_offset}" if region is not None else "no output region"
        raise RoIError(
            grpc.StatusCode.INTERNAL,
            f"the server answered with its output in region {ref.region!r} at {ref.offset} "
            f"({ref.byte_size} bytes); the request asked for {asked}",
        )
    return region.buffer[ref.offset : ref.offset + ref.byte_size].toreadonly()


def _result(resp: roi_pb2.PoolResponse, frame: framing.Frame, request: EncodedRequest | None) -> PoolResult:
    if resp.output.WhichOneof("contents") == "shared_memory":
        data = _output_in_region(resp.output.shared_memory, request)
    else:
        data = frame.data(resp.output)
    as_torch = request is not None and request.as_torch
    output = codec.decode_array(resp.output, "output", as_torch=as_torch, data=data)
    return PoolResult(id=resp.id, output=output, timings=Timings.from_proto(resp.timings))


def decode_stream_response(raw: bytes, requests_by_id: Mapping[str, EncodedRequest]) -> PoolResult:
    """A stream answer; ``requests_by_id`` holds the requests sent, by id (whether their maps
    were torch, where their output regions are)."""
    msg, frame = framing.parse(roi_pb2.PoolStreamResponse, raw)
    if msg.WhichOneof("result") == "error":
        return PoolResult(id=msg.id, output=None, timings=None, error=RoIError.from_status(msg.error.code, msg.error.message))
    return _result(msg.response, frame, requests_by_id.get(msg.id))


def decode_describe(raw: bytes) -> ServerInfo:
    d = roi_pb2.DescribeResponse.FromString(raw)
    lim = d.limits
    return ServerInfo(
        version=d.version,
        device=d.device,
        device_name=d.device_name,
        ops=tuple(d.ops),
        dtypes=tuple(codec.dtype_name(x) for x in d.dtypes),
        limits={
            "max_message_bytes": lim.max_message_bytes,
            "max_boxes": lim.max_boxes,
            "max_output_elements": lim.max_output_elements,
            "max_batch_boxes": lim.max_batch_boxes,
            "max_batch_bytes": lim.max_batch_bytes,
            "max_batch_requests": lim.max_batch_requests,
            "max_wait_ms": lim.max_wait_ms,
            "max_queue": lim.max_queue,
        },
        torch_version=d.torch_version,
        threads=d.threads,
    )
