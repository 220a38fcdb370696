"""The blocking client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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
from .errors import RoIError
from .op_methods import UNSET, OpMethods
from .request import EncodedRequest, RequestDraft
from .results import PoolResult, ServerInfo
from .shm import DEFAULT_MIN_BYTES, DEFAULT_PREFIX, SharedMemory, SharedMemoryRegion


def one_address(target: str | Sequence[str], shared_memory: bool) -> None:
    """Shared memory is for one server on this host: a client balanced over several refuses it."""
    if shared_memory and not isinstance(target, str) and len(target) != 1:
        raise RoIError.invalid_argument(
            "shared_memory: needs one server, on this host (several addresses were given); use one client per server"
        )


def borrow_failed(err: RoIError) -> bool:
    """A region that could not be had for this call: /dev/shm is full, or the server holds as
    many regions as it takes (results pin theirs while they live). The call uses the wire."""
    return err.code == grpc.StatusCode.RESOURCE_EXHAUSTED


class RoIClient(OpMethods):
    """RoI ops on a remote server, with the arguments of the ``roi_kernels`` functions::

        with RoIClient("localhost:50051") as client:
            pooled = client.roi_align(features, boxes, 7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)

    Arrays are numpy (or torch, where installed: torch in, torch out). Every method raises
    :class:`RoIError` on failure. Each op method also takes ``out_dtype`` (the result's dtype),
    ``wire_dtype`` (the dtype the maps travel and are computed in, e.g. "float16" or
    "bfloat16" to halve the bytes) and ``timeout`` (seconds; default the client's).

    Args:
        target: ``host:port``, any gRPC target (``dns:///name:port``), or several addresses,
            balanced round-robin.
        timeout: default deadline of each call in seconds (None: no deadline).
        max_message_bytes: largest request and response (the server has its own limit).
        credentials: ready-made ``grpc.ChannelCredentials`` (instead of the ``tls_*`` arguments).
        max_attempts: attempts per call while the server answers UNAVAILABLE (1: no retry).
        options: further ``(name, value)`` channel options.
        tls: connect with TLS (implied by any ``tls_*`` file); verified against the system's
            root certificates unless ``tls_ca`` is given.
        tls_ca: PEM file (path, or its bytes) of the CA that signed the server's certificate.
        tls_cert, tls_key: PEM files of this client's certificate and key (mutual TLS).
        tls_server_name: the name the server's certificate must carry, when it is not the
            target's host (for example a target given as an IP address).
        token: bearer token sent with every call (``authorization: Bearer <token>``).
        shared_memory: for a server on this host started with ``--allow-shared-memory``:
            the op methods write tensors of ``shared_memory_min_bytes`` or more into POSIX
            shared memory regions registered with the server, instead of the message, and
            have large results written into a region too (a numpy result is then a read-only
            view of its region, which stays out of the pool while the result lives). Where
            the server refuses, the calls use the wire (logged once). The regions are
            ``client.shared_memory`` (:class:`~roi_client.shm.SharedMemory`).
            ``pool``/``pool_stream`` send their prepared requests as they are.
        shared_memory_prefix: the server's ``--shared-memory-prefix``.
        shared_memory_min_bytes: tensors below this travel in the message.
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
        # The payload bytes of one UploadFeatures message, from the server's Describe.
        self._upload_limit: int | None = None
        creds = channel_credentials(tls, tls_ca, tls_cert, tls_key, credentials)
        opts = channel_options(max_message_bytes, max_attempts) + tls_options(tls_server_name) + list(options)
        if creds is None:
            self._channel = grpc.insecure_channel(self.target, options=opts)
        else:
            self._channel = grpc.secure_channel(self.target, creds, options=opts)
        self._upload = self._channel.stream_unary(_features.UPLOAD)
        self._release = self._channel.unary_unary(_features.RELEASE)
        # Raw bytes both ways: requests are serialised once (EncodedRequest), and responses
        # are parsed where their tensors are decoded.
        self._pool = self._channel.unary_unary(POOL)
        self._stream = self._channel.stream_stream(POOL_STREAM)
        self._describe = self._channel.unary_unary(DESCRIBE)
        self._health = self._channel.unary_unary(HEALTH_CHECK)
        self.shared_memory = (
            SharedMemory(self._channel, self._metadata, timeout, shared_memory_prefix, min_bytes=shared_memory_min_bytes)
            if shared_memory
            else None
        )

    # -- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        # The regions are unregistered (and the lease ended) while the channel is still open.
        if self.shared_memory is not None:
            self.shared_memory.close()
        self._channel.close()

    def __enter__(self) -> RoIClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is UNSET else timeout

    def _run(self, draft: RequestDraft, timeout: Any) -> Any:
        shm = self.shared_memory
        if shm is not None:
            nbytes = draft.region_bytes(shm.min_bytes)
            try:
                region = shm.borrow(nbytes) if nbytes else None
            except RoIError as err:
                if not borrow_failed(err):
                    raise
                region = None
            if region is not None:
                return self._run_shared(draft, region, timeout)
        return self.pool(draft.encode(), timeout=timeout)

    def _run_shared(self, draft: RequestDraft, region: SharedMemoryRegion, timeout: Any) -> Any:
        shm = self.shared_memory
        assert shm is not None
        try:
            result = self.pool_with_timings(draft.encode_into(region, shm.min_bytes), timeout=timeout)
        except BaseException as exc:
            # Not reused: a call that failed on this side (a deadline) may still be running,
            # and the server would write its result into whatever the region held next.
            shm.discard(region)
            if isinstance(exc, RoIError) and shm.turned_off(exc):
                return self.pool(draft.encode(), timeout=timeout)
            raise
        shm.settle(result.output, region)
        return result.output

    # -- general calls ------------------------------------------------------------------------

    def pool_with_timings(self, request: EncodedRequest, *, timeout: float | None = UNSET) -> PoolResult:
        """Sends a prepared request; returns its output and the server's timings. A request
        with an output region (:meth:`EncodedRequest.with_output_region`) has its result read
        from the region: a numpy result views it, and the caller keeps the region while it
        uses the result."""
        try:
            raw = self._pool(request.payload, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        return results.decode_response(raw, request)

    def pool(self, request: EncodedRequest, *, timeout: float | None = UNSET) -> Any:
        """Sends a prepared request; returns its output ``[K, C, PH, PW]``."""
        return self.pool_with_timings(request, timeout=timeout).output

    def pool_stream(self, requests: Iterable[EncodedRequest], *, timeout: float | None = UNSET) -> Iterator[PoolResult]:
        """Sends requests on one stream; yields a :class:`PoolResult` for each as it is ready
        (not necessarily in order: match them by ``id``, see ``EncodedRequest.with_id``).
        A failed request yields a result with ``error`` set; a failed stream raises."""
        sent: dict[str, EncodedRequest] = {}

        def payloads() -> Iterator[bytes]:
            for r in requests:
                sent[r.id] = r.without_payload()
                yield r.payload

        call = self._stream(payloads(), timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            for raw in call:
                yield results.decode_stream_response(raw, sent)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    def describe(self, *, timeout: float | None = UNSET) -> ServerInfo:
        return results.decode_describe(self._describe_raw(timeout))

    def _describe_raw(self, timeout: Any) -> bytes:
        try:
            return self._describe(b"", timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None

    # -- feature handles ----------------------------------------------------------------------

    def features(
        self,
        maps: Any,
        *,
        image_sizes: Sequence[Sequence[int]] | None = None,
        spatial_scales: Sequence[float] | None = None,
        ttl: float | None = None,
        wire_dtype: Any = None,
        keep: bool = True,
        timeout: float | None = UNSET,
    ) -> _features.FeatureMaps:
        """Uploads maps once, for many requests (:class:`~roi_client.features.FeatureMaps`).

        ``maps``: one map ``[N, C, H, W]``, a list of per-image ``[C, H_i, W_i]`` (ragged), or
        a list of FPN levels ``[N, C, H_l, W_l]``, finest first, with ``image_sizes`` (each
        image's (height, width), from which the server infers the level scales) or
        ``spatial_scales`` (one per level). ``ttl``: seconds the server keeps the handle after
        its last use (at most, and by default, its ``--feature-ttl``). ``wire_dtype``: the
        dtype the maps travel, are stored and computed in. ``keep=False``: no reference to
        the maps is kept, and a handle the server dropped raises
        :class:`~roi_client.FeatureHandleGone` instead of being uploaded again."""
        source, state = _features.prepare(maps, image_sizes, spatial_scales, ttl, wire_dtype, keep)
        state.update(self._upload_features(source, state.ttl, timeout))
        return _features.FeatureMaps(self, state, source)

    def _upload_features(self, source: Any, ttl: float, timeout: Any) -> Any:
        if self._upload_limit is None:
            self._upload_limit = _features.feature_limit(self._describe_raw(timeout), self._max_message_bytes)
        shm = self.shared_memory
        if shm is not None:
            parts = _features.upload_parts(source, self._upload_limit, ttl)
            offsets, nbytes = _features.shared_memory_plan(parts, shm.min_bytes)
            try:
                region = shm.borrow(nbytes) if nbytes else None
            except RoIError as err:
                if not borrow_failed(err):
                    raise
                region = None
            if region is not None:
                try:
                    raw = self._send_upload(_features.region_messages(parts, region, offsets), timeout)
                except RoIError as err:
                    shm.discard(region)
                    if not shm.turned_off(err):
                        raise
                else:
                    shm.give_back(region)
                    return _features.decode_upload(raw)
        parts = _features.upload_parts(source, self._upload_limit, ttl)
        return _features.decode_upload(self._send_upload(_features.wire_messages(parts), timeout))

    def _send_upload(self, messages: Iterator[bytes], timeout: Any) -> bytes:
        try:
            return self._upload(messages, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None

    def _release_features(self, handle: str, timeout: Any) -> None:
        try:
            self._release(_features.release_request(handle), timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            _features.log_release_failure(handle, RoIError.from_rpc_error(exc))

    def health(self, service: str = "", *, timeout: float | None = UNSET) -> str:
        """The standard health check: "SERVING", "NOT_SERVING", ..."""
        try:
            raw = self._health(health_request(service), timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        return health_status(raw)
