"""``roi.v1.RoIService``: Pool, PoolStream and Describe.

The methods are registered with raw-bytes (de)serializers: gRPC hands over the message's bytes,
and :mod:`roi_client.framing` parses them here without copying a tensor (the maps the kernels
read are views of those bytes); a response is its header and the output's memory joined once.
Large messages are handled on a thread, so that one does not stall every other connection.
Tensors a request gives in shared memory are views of the caller's regions (see
:mod:`roi_server.shm`), and a result asked into an output region is written there: the
response then carries its dtype, shape and reference, and no data.

Error handling lives in one place, :meth:`RoIService._answer`: what a request ends in is turned
into its status by :func:`~roi_server.errors.status_of`, counted, and sent (as the RPC's status
for Pool, as an in-band ``Status`` for each request of a stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from roi_client import framing
from roi_client._proto.roi.v1 import roi_pb2

from .batcher import BatchResult, DynamicBatcher
from .codec import (
    OP_NAMES,
    WIRE_OF_TORCH,
    DecodedRequest,
    Limits,
    decode_request,
    output_payload,
    peek_header,
    shared_memory_bytes,
    write_output,
)
from .errors import InvalidArgument, ServiceError, Unavailable, Unimplemented, status_of
from .metrics import ServiceMetrics
from .streams import answer_stream

if TYPE_CHECKING:
    from .features import FeatureStore
    from .shm_service import SharedMemoryService

log = logging.getLogger(__name__)

SERVICE_NAME = "roi.v1.RoIService"
T = TypeVar("T")

# Messages above this are parsed and serialised on a thread; below it the hop costs more than
# the work.
OFF_LOOP_BYTES = 1 << 20
# A call cancelled this close to its deadline counts as DEADLINE_EXCEEDED, not CANCELLED.
DEADLINE_SLACK_S = 0.05


@dataclass
class ServerInfo:
    version: str
    device: str
    device_name: str
    ops: tuple[str, ...]
    torch_version: str
    threads: int
    limits: roi_pb2.Limits


class RoIService:
    def __init__(
        self,
        limits: Limits,
        metrics: ServiceMetrics,
        stream_window: int = 128,
        shared_memory: SharedMemoryService | None = None,
        features: FeatureStore | None = None,
    ) -> None:
        """``shared_memory``: the registry and the callers of the shared memory methods
        (None: requests that name shared memory are refused). ``features``: the store of
        UploadFeatures and of the requests that name its handles (None: no such calls)."""
        self.limits = limits
        self.metrics = metrics
        self.stream_window = stream_window
        self.shared_memory = shared_memory
        self.features = features
        self.batcher: DynamicBatcher | None = None
        self.info: ServerInfo | None = None
        self._available: frozenset[str] = frozenset()
        self._codec_pool = ThreadPoolExecutor(4, thread_name_prefix="roi-codec")
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = asyncio.Event()
        # time.monotonic() of the last call taken by the event loop, Pool request or stream item.
        self.last_arrival = 0.0

    def set_ready(self, batcher: DynamicBatcher, info: ServerInfo) -> None:
        """Called once the kernels are warmed up; until then requests get UNAVAILABLE."""
        self.batcher = batcher
        self.info = info
        self._available = frozenset(info.ops)

    async def wait_idle(self) -> None:
        """Returns when no Pool request or stream item is being handled."""
        await self._idle.wait()

    @property
    def idle(self) -> bool:
        return self._active == 0

    def begin_shutdown(self) -> None:
        """Open streams stop reading: each answers the items it has read, then ends with
        UNAVAILABLE so that its client resends the rest elsewhere."""
        self._closing.set()

    def close(self) -> None:
        self._codec_pool.shutdown(wait=False, cancel_futures=True)

    # -- registration -------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        return _ArrivalTrackingHandler(
            self,
            {
                # No (de)serializers: the methods take and return bytes (see the module doc).
                f"/{SERVICE_NAME}/Pool": grpc.unary_unary_rpc_method_handler(self.pool),
                f"/{SERVICE_NAME}/PoolStream": grpc.stream_stream_rpc_method_handler(self.pool_stream),
                f"/{SERVICE_NAME}/Describe": grpc.unary_unary_rpc_method_handler(self.describe),
                f"/{SERVICE_NAME}/UploadFeatures": grpc.stream_unary_rpc_method_handler(self.upload_features),
                f"/{SERVICE_NAME}/ReleaseFeatures": grpc.unary_unary_rpc_method_handler(self.release_features),
            },
        )

    # -- methods ------------------------------------------------------------------------------

    async def pool(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        deadline = _deadline(context)
        answer = await self._answer(raw, deadline, in_stream=False, owner=self._owner(context))
        if isinstance(answer, tuple):
            code, message = answer
            await context.abort(code, message)
        return answer

    async def pool_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        deadline = _deadline(context)
        owner = self._owner(context)

        async def one(raw: bytes) -> bytes:
            answer = await self._answer(raw, deadline, in_stream=True, owner=owner)
            assert isinstance(answer, bytes)
            return answer

        # Closed with this generator (a cancelled call), so that its tasks end with it.
        async with contextlib.aclosing(answer_stream(requests, context, one, self.stream_window, self._closing)) as out:
            async for answer in out:
                yield answer

    async def describe(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        info = self.info
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is warming up")
        assert info is not None
        resp = roi_pb2.DescribeResponse(
            version=info.version,
            device=info.device,
            device_name=info.device_name,
            ops=list(info.ops),
            dtypes=sorted(WIRE_OF_TORCH.values()),
            limits=info.limits,
            torch_version=info.torch_version,
            threads=info.threads,
        )
        if self.features is not None:
            resp.feature_store.CopyFrom(self.features.describe())
        return resp.SerializeToString()

    async def upload_features(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        """Stores the maps of an upload's messages and answers with their handle (see
        :mod:`roi_server.features`). Counted by status code in ``roi_feature_uploads_total``."""
        code = grpc.StatusCode.OK
        self.last_arrival = time.monotonic()
        self._enter()
        try:
            if self.features is None:
                raise Unimplemented("this server has no feature store")
            if self._closing.is_set():
                raise Unavailable("the server is shutting down")
            if self.info is None:
                raise Unavailable("the server is warming up")
            registry = self.shared_memory.registry if self.shared_memory is not None else None

            async def counted() -> AsyncIterator[bytes]:
                async for raw in requests:
                    self.metrics.received_bytes.inc(len(raw))
                    yield raw

            resp = await self.features.upload(
                counted(), self._owner(context), self.limits.max_message_bytes, registry, self._off_loop
            )
            return resp.SerializeToString()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("an upload failed")
            code, message = status_of(exc)
            await context.abort(code, message)
            raise  # not reached: abort raises
        finally:
            self.metrics.child(self.metrics.feature_uploads, code.name).inc()
            self._leave()

    async def release_features(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Drops a handle; releasing one that is gone (or not the caller's) is not an error."""
        try:
            if self.features is None:
                raise Unimplemented("this server has no feature store")
            try:
                req = roi_pb2.ReleaseFeaturesRequest.FromString(raw)
            except DecodeError as exc:
                raise InvalidArgument("", f"the message is not a roi.v1.ReleaseFeaturesRequest: {exc}") from None
            released = self.features.release(req.handle, self._owner(context))
            return roi_pb2.ReleaseFeaturesResponse(released=released).SerializeToString()
        except ServiceError as exc:
            await context.abort(*status_of(exc))
            raise  # not reached: abort raises

    def count_refusal(self, method: str, raw: bytes | None, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED) -> None:
        """Counts a call refused before it reached this service (by the token check): a Pool
        call under the op its message's header names, a PoolStream as one request of op
        "unknown"; Describe is not a request and is not counted."""
        if method == f"/{SERVICE_NAME}/Pool":
            op = OP_NAMES.get(peek_header(raw)[1], "unknown") if raw is not None else "unknown"
        elif method == f"/{SERVICE_NAME}/PoolStream":
            op = "unknown"
        else:
            return
        self.metrics.requests.labels(protocol="roi_v1", op=op, code=code.name).inc()

    # -- one request --------------------------------------------------------------------------

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        return self.shared_memory.owner(context) if self.shared_memory is not None else ""

    async def _answer(
        self, raw: bytes, deadline: float | None, in_stream: bool, owner: str = ""
    ) -> bytes | tuple[grpc.StatusCode, str]:
        """Handles one request from its bytes to its response's bytes. Returns the serialised
        PoolResponse (PoolStreamResponse in a stream), or for a failed unary call the status to
        abort with. Counts the request in the metrics whatever it ends in. ``owner`` is the
        caller, whose shared memory regions the request may name."""
        m = self.metrics
        start = time.perf_counter()
        self.last_arrival = time.monotonic()
        self._enter()
        m.received_bytes.inc(len(raw))
        op, code, req_id = "unknown", grpc.StatusCode.OK, ""
        decoded: DecodedRequest | None = None
        try:
            if self._closing.is_set() or self.batcher is None or self.batcher.full:
                # Refused before parsing: under overload a refusal must cost far less than
                # an answer. The id and op are read from the message's header.
                req_id, op_number = peek_header(raw)
                op = OP_NAMES.get(op_number, "unknown")
                if self._closing.is_set():
                    raise Unavailable("the server is shutting down")
                if self.batcher is None:
                    raise Unavailable("the server is warming up")
                self.batcher.refuse_if_full()
            req, frame = await self._off_loop(len(raw), _parse, raw)
            req_id = req.id
            op = OP_NAMES.get(req.op, "unknown")
            registry = self.shared_memory.registry if self.shared_memory is not None else None
            # Tensors in shared memory cost no copy unless misaligned, when they are copied.
            decoded = await self._off_loop(
                len(raw) + shared_memory_bytes(req),
                decode_request,
                req,
                self.limits,
                self._available,
                frame,
                registry,
                owner,
                self.features,
            )
            remaining = None if deadline is None else deadline - time.perf_counter()
            result = await self.batcher.submit(decoded, remaining)
            out_bytes = result.output.numel() * result.output.element_size()
            answer = await self._off_loop(out_bytes, _encode_response, decoded, result, start, in_stream)
            m.sent_bytes.inc(len(answer))
            return answer
        except asyncio.CancelledError:
            # gRPC cancels the handler when the deadline passes, and its timer may fire a
            # little before the deadline as read here.
            expired = deadline is not None and time.perf_counter() >= deadline - DEADLINE_SLACK_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("request %r (%s) failed", req_id, op)
            code, message = status_of(exc)
            if not in_stream:
                return code, message
            err = roi_pb2.PoolStreamResponse(id=req_id, error=roi_pb2.Status(code=code.value[0], message=message))
            answer = err.SerializeToString()
            m.sent_bytes.inc(len(answer))
            return answer
        finally:
            # The output region's view is let go at once, whatever the request ended in: it
            # keeps the region mapped (if unregistered meanwhile) for as long as it lives.
            if decoded is not None:
                decoded.release()
            m.child(m.requests, "roi_v1", op, code.name).inc()
            m.child(m.request_duration, op).observe(time.perf_counter() - start)
            self._leave()

    async def _off_loop(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        if nbytes < OFF_LOOP_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._codec_pool, fn, *args)

    def _enter(self) -> None:
        self._active += 1
        self._idle.clear()
        self.metrics.in_flight.inc()

    def _leave(self) -> None:
        self._active -= 1
        self.metrics.in_flight.dec()
        if self._active == 0:
            self._idle.set()


class _ArrivalTrackingHandler(grpc.GenericRpcHandler):
    """Finds the method's handler, and notes the time: gRPC asks for it as soon as the event
    loop takes a call, before its message has been read. The stop waits until no call has
    been taken for a while, so that none is left waiting inside gRPC when the transport shuts
    down (gRPC cancels those, and clients do not retry CANCELLED); the message of a call
    taken but still arriving is waited for by the transport's grace, and then refused."""

    def __init__(self, service: RoIService, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._service = service
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is not None:
            self._service.last_arrival = time.monotonic()
        return handler


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.perf_counter() + remaining


def _parse(raw: bytes) -> tuple[roi_pb2.PoolRequest, framing.Frame]:
    try:
        return framing.parse(roi_pb2.PoolRequest, raw)
    except DecodeError as exc:
        raise InvalidArgument("", f"the message is not a roi.v1.PoolRequest: {exc}") from None


def _encode_response(decoded: DecodedRequest, result: BatchResult, start: float, in_stream: bool) -> bytes:
    # The header is built by protobuf with a placeholder for the output's data, which
    # framing.serialize replaces by the output's memory: the one copy of the output. With an
    # output region, that copy goes into the region instead and the message has no payload.
    outer = roi_pb2.PoolStreamResponse(id=decoded.id) if in_stream else None
    resp = outer.response if outer is not None else roi_pb2.PoolResponse()
    resp.id = decoded.id
    if decoded.output_view is not None:
        write_output(result.output, resp.output, decoded)
        payloads = []
    else:
        payloads = [output_payload(result.output, resp.output)]
    t = resp.timings
    t.queue_seconds = result.queue_s
    t.compute_seconds = result.compute_s
    t.batch_id = result.batch_id
    t.batch_requests = result.batch_requests
    t.batch_boxes = result.batch_boxes
    t.total_seconds = time.perf_counter() - start
    return framing.serialize(outer if outer is not None else resp, payloads)
