"""The blocking client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

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
from .request import EncodedRequest
from .results import PoolResult, ServerInfo

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
    ) -> None:
        self.target = channel_target(target)
        self.timeout = timeout
        self._metadata = call_metadata(token)
        creds = channel_credentials(tls, tls_ca, tls_cert, tls_key, credentials)
        opts = channel_options(max_message_bytes, max_attempts) + tls_options(tls_server_name) + list(options)
        if creds is None:
            self._channel = grpc.insecure_channel(self.target, options=opts)
        else:
            self._channel = grpc.secure_channel(self.target, creds, options=opts)
        # Raw bytes both ways: requests are serialised once (EncodedRequest), and responses
        # are parsed where their tensors are decoded.
        self._pool = self._channel.unary_unary(POOL)
        self._stream = self._channel.stream_stream(POOL_STREAM)
        self._describe = self._channel.unary_unary(DESCRIBE)
        self._health = self._channel.unary_unary(HEALTH_CHECK)

    # -- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RoIClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is UNSET else timeout

    # -- general calls ------------------------------------------------------------------------

    def pool_with_timings(self, request: EncodedRequest, *, timeout: float | None = UNSET) -> PoolResult:
        """Sends a prepared request; returns its output and the server's timings."""
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
        as_torch: dict[str, bool] = {}

        def payloads() -> Iterator[bytes]:
            for r in requests:
                as_torch[r.id] = r.as_torch
                yield r.payload

        call = self._stream(payloads(), timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            for raw in call:
                yield results.decode_stream_response(raw, as_torch)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    def describe(self, *, timeout: float | None = UNSET) -> ServerInfo:
        try:
            raw = self._describe(b"", timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        return results.decode_describe(raw)

    def health(self, service: str = "", *, timeout: float | None = UNSET) -> str:
        """The standard health check: "SERVING", "NOT_SERVING", ..."""
        try:
            raw = self._health(health_request(service), timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        return health_status(raw)
