"""The shared memory methods of ``roi.v1.RoIService``: RegisterSharedMemory,
SharedMemoryStatus, UnregisterSharedMemory and HoldSharedMemory (the registry is
:mod:`roi_server.shm`).

They are registered beside the pool methods, under the same service name and with raw-bytes
handlers as those are, so that the token interceptor applies to them alike. Who the caller is
(the owner of what it registers) comes from its token when tokens are required, and is one
shared owner otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from roi_client._proto.roi.v1 import roi_pb2

from .auth import caller_of
from .errors import InvalidArgument, ServiceError, status_of
from .service import SERVICE_NAME
from .shm import Region, SharedMemoryRegistry

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down: this lease ended and its regions were unregistered"


class SharedMemoryService:
    def __init__(
        self,
        registry: SharedMemoryRegistry,
        tokens_required: bool,
        note_arrival: Callable[[], None] = lambda: None,
    ) -> None:
        """``note_arrival`` is called as each call is taken (the server's stop waits for a
        quiet line, see :class:`roi_server.service.RoIService`)."""
        self.registry = registry
        self.tokens_required = tokens_required
        self._note_arrival = note_arrival
        self._ending = asyncio.Event()

    def owner(self, context: grpc.aio.ServicerContext) -> str:
        """The caller, as the registry knows it."""
        return caller_of(context.invocation_metadata()) if self.tokens_required else ""

    def end_leases(self) -> None:
        """Every HoldSharedMemory call ends (UNAVAILABLE), releasing its regions: the server
        is stopping, and its transport would otherwise wait its grace period for them."""
        self._ending.set()

    def handler(self) -> grpc.GenericRpcHandler:
        unary = {
            "RegisterSharedMemory": (roi_pb2.RegisterSharedMemoryRequest, self._register),
            "SharedMemoryStatus": (roi_pb2.SharedMemoryStatusRequest, self._status),
            "UnregisterSharedMemory": (roi_pb2.UnregisterSharedMemoryRequest, self._unregister),
        }
        handlers = {
            f"/{SERVICE_NAME}/{name}": grpc.unary_unary_rpc_method_handler(self._unary(message, fn))
            for name, (message, fn) in unary.items()
        }
        handlers[f"/{SERVICE_NAME}/HoldSharedMemory"] = grpc.unary_stream_rpc_method_handler(self.hold)
        return _Handlers(handlers, self._note_arrival)

    # -- methods ------------------------------------------------------------------------------

    def _unary(
        self, message: type[Message], fn: Callable[[str, Message], Message]
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        async def method(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                try:
                    request = message.FromString(raw)
                except DecodeError as exc:
                    raise InvalidArgument("", f"the message is not a roi.v1.{message.__name__}: {exc}") from None
                return fn(self.owner(context), request).SerializeToString()
            except Exception as exc:
                if not isinstance(exc, ServiceError):
                    log.exception("%s failed", message.__name__)
                await context.abort(*status_of(exc))
                raise  # not reached: abort raises

        return method

    def _register(self, owner: str, req: roi_pb2.RegisterSharedMemoryRequest) -> Message:
        self.registry.register(owner, req.region, req.key, req.offset, req.byte_size, req.lease)
        return roi_pb2.RegisterSharedMemoryResponse()

    def _status(self, owner: str, req: roi_pb2.SharedMemoryStatusRequest) -> Message:
        return roi_pb2.SharedMemoryStatusResponse(regions=[_status_of(r) for r in self.registry.status(owner, req.region)])

    def _unregister(self, owner: str, req: roi_pb2.UnregisterSharedMemoryRequest) -> Message:
        return roi_pb2.UnregisterSharedMemoryResponse(unregistered=self.registry.unregister(owner, req.region))

    async def hold(self, raw: bytes, context: grpc.aio.ServicerContext) -> None:
        """Opens a lease, sends its id, and keeps it until the call ends: gRPC cancels this
        handler when the client cancels, closes its channel or its connection drops (a killed
        process's socket is closed by its kernel), and the lease's regions go with it."""
        try:
            lease = self.registry.open_lease(self.owner(context))
        except ServiceError as exc:
            await context.abort(*status_of(exc))
            return
        try:
            await context.write(roi_pb2.HoldSharedMemoryResponse(lease=lease).SerializeToString())
            await self._ending.wait()
        finally:
            self.registry.close_lease(lease)
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)


def _status_of(r: Region) -> roi_pb2.SharedMemoryRegionStatus:
    try:
        file_size = r.file_size()
    except (OSError, ValueError):  # unregistered meanwhile: its mapping is closed
        file_size = 0
    return roi_pb2.SharedMemoryRegionStatus(
        region=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size, lease=r.lease, file_size=file_size
    )


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler], note_arrival: Callable[[], None]) -> None:
        self._handlers = handlers
        self._note_arrival = note_arrival

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is not None:
            self._note_arrival()
        return handler
