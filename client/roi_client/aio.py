"""The asyncio client: the methods of :class:`~roi_client.RoIClient`, awaited."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from . import features as _features
from . import results
from .channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DESCRIBE,
    HEALTH_CHECK,
    POOL,
    POOL_STREAM,
    PemSource,
    call_metadata,
    channel_credentials,
    channel_options,
    channel_target,
    health_request,
    health_status,
    tls_options,
)
from .client import borrow_failed, one_address
from .errors import RoIError
from .op_methods import UNSET, OpMethods
from .request import EncodedRequest, RequestDraft
from .results import PoolResult, ServerInfo
from .shm import DEFAULT_MIN_BYTES, DEFAULT_PREFIX, AsyncSharedMemory, SharedMemoryRegion


class AsyncRoIClient(OpMethods):
    """As :class:`~roi_client.RoIClient`, for asyncio: ``await client.roi_align(...)``. Use it
    as ``async with AsyncRoIClient(...) as client``, from one event loop.

    The op methods encode the request when called (on the caller's thread) and return an
    awaitable of the result; with ``shared_memory``, a request with tensors for a region is
    written into it when awaited. The constructor's arguments (TLS files, ``token``,
    ``shared_memory``, ...) are :class:`~roi_client.RoIClient`'s; ``client.shared_memory`` is
    an :class:`~roi_client.shm.AsyncSharedMemory`.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        max_attempts: int = 5,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool | None = None,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        shared_memory: bool = False,
        shared_memory_prefix: str = DEFAULT_PREFIX,
        shared_memory_min_bytes: int = DEFAULT_MIN_BYTES,
    ) -> None:
        one_address(target, shared_memory)
        self.target = channel_target(target)
        self.timeout = timeout
        self._metadata = call_metadata(token)
        self._max_message_bytes = max_message_bytes
        self._upload_limit: int | None = None
        creds = channel_credentials(tls, tls_ca, tls_cert, tls_key, credentials)
        opts = channel_options(max_message_bytes, max_attempts) + tls_options(tls_server_name) + list(options)
        if creds is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=opts)
        else:
            self._channel = grpc.aio.secure_channel(self.target, creds, options=opts)
        self._upload = self._channel.stream_unary(_features.UPLOAD)
        self._release = self._channel.unary_unary(_features.RELEASE)
        self._pool = self._channel.unary_unary(POOL)
        self._stream = self._channel.stream_stream(POOL_STREAM)
        self._describe = self._channel.unary_unary(DESCRIBE)
        self._health = self._channel.unary_unary(HEALTH_CHECK)
        self.shared_memory = (
            AsyncSharedMemory(self._channel, self._metadata, timeout, shared_memory_prefix, min_bytes=shared_memory_min_bytes)
            if shared_memory
            else None
        )

    async def close(self) -> None:
        # The regions are unregistered (and the lease ended) while the channel is still open.
        if self.shared_memory is not None:
            await self.shared_memory.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncRoIClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is UNSET else timeout

    def _run(self, draft: RequestDraft, timeout: Any) -> Any:
        shm = self.shared_memory
        nbytes = draft.region_bytes(shm.min_bytes) if shm is not None and shm.available else 0
        if not nbytes:
            return self.pool(draft.encode(), timeout=timeout)
        return self._run_shared(draft, nbytes, timeout)

    async def _run_shared(self, draft: RequestDraft, nbytes: int, timeout: Any) -> Any:
        shm = self.shared_memory
        assert shm is not None
        try:
            region = await shm.borrow(nbytes)
        except RoIError as err:
            if not borrow_failed(err):
                raise
            region = None
        if region is None:
            return await self.pool(draft.encode(), timeout=timeout)
        return await self._pool_in(draft, region, timeout)

    async def _pool_in(self, draft: RequestDraft, region: SharedMemoryRegion, timeout: Any) -> Any:
        shm = self.shared_memory
        assert shm is not None
        try:
            result = await self.pool_with_timings(draft.encode_into(region, shm.min_bytes), timeout=timeout)
        except BaseException as exc:
            # As RoIClient's: a region a failed (or cancelled) call used is not reused.
            await shm.discard(region)
            if isinstance(exc, RoIError) and shm.turned_off(exc):
                return await self.pool(draft.encode(), timeout=timeout)
            raise
        shm.settle(result.output, region)
        return result.output

    async def pool_with_timings(self, request: EncodedRequest, *, timeout: float | None = UNSET) -> PoolResult:
        try:
            raw = await self._pool(request.payload, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        return results.decode_response(raw, request)

    async def pool(self, request: EncodedRequest, *, timeout: float | None = UNSET) -> Any:
        return (await self.pool_with_timings(request, timeout=timeout)).output

    async def pool_stream(
        self,
        requests: Iterable[EncodedRequest] | AsyncIterable[EncodedRequest],
        *,
        timeout: float | None = UNSET,
    ) -> AsyncIterator[PoolResult]:
        """As :meth:`RoIClient.pool_stream`; ``requests`` may be an async iterable."""
        sent: dict[str, EncodedRequest] = {}

        async def payloads() -> AsyncIterator[bytes]:
            if isinstance(requests, AsyncIterable):
                async for r in requests:
                    sent[r.id] = r.without_payload()
                    yield r.payload
            else:
                for r in requests:
                    sent[r.id] = r.without_payload()
                    yield r.payload

        call = self._stream(payloads(), timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            async for raw in call:
                yield results.decode_stream_response(raw, sent)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def describe(self, *, timeout: float | None = UNSET) -> ServerInfo:
        return results.decode_describe(await self._describe_raw(timeout))

    async def _describe_raw(self, timeout: Any) -> bytes:
        try:
            return await self._describe(b"", timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None

    # -- feature handles ----------------------------------------------------------------------

    async def features(
        self,
        maps: Any,
        *,
        image_sizes: Sequence[Sequence[int]] | None = None,
        spatial_scales: Sequence[float] | None = None,
        ttl: float | None = None,
        wire_dtype: Any = None,
        keep: bool = True,
        timeout: float | None = UNSET,
    ) -> _features.AsyncFeatureMaps:
        """As :meth:`RoIClient.features`: ``fm = await client.features(...)``, then
        ``async with fm: await fm.roi_align(...)``."""
        source, state = _features.prepare(maps, image_sizes, spatial_scales, ttl, wire_dtype, keep)
        state.update(await self._upload_features(source, state.ttl, timeout))
        return _features.AsyncFeatureMaps(self, state, source)

    async def _upload_features(self, source: Any, ttl: float, timeout: Any) -> Any:
        if self._upload_limit is None:
            self._upload_limit = _features.feature_limit(await self._describe_raw(timeout), self._max_message_bytes)
        shm = self.shared_memory
        if shm is not None and shm.available:
            parts = _features.upload_parts(source, self._upload_limit, ttl)
            offsets, nbytes = _features.shared_memory_plan(parts, shm.min_bytes)
            try:
                region = await shm.borrow(nbytes) if nbytes else None
            except RoIError as err:
                if not borrow_failed(err):
                    raise
                region = None
            if region is not None:
                try:
                    raw = await self._send_upload(_features.region_messages(parts, region, offsets), timeout)
                except RoIError as err:
                    await shm.discard(region)
                    if not shm.turned_off(err):
                        raise
                else:
                    shm.give_back(region)
                    return _features.decode_upload(raw)
        parts = _features.upload_parts(source, self._upload_limit, ttl)
        return _features.decode_upload(await self._send_upload(_features.wire_messages(parts), timeout))

    async def _send_upload(self, messages: Any, timeout: Any) -> bytes:
        try:
            return await self._upload(messages, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None

    async def _release_features(self, handle: str, timeout: Any) -> None:
        try:
            await self._release(_features.release_request(handle), timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            _features.log_release_failure(handle, RoIError.from_rpc_error(exc))

    async def health(self, service: str = "", *, timeout: float | None = UNSET) -> str:
        try:
            raw = await self._health(health_request(service), timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        return health_status(raw)
