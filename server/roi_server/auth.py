"""Bearer-token authentication, checked in a server interceptor before any handler runs.

Every call must carry the metadata ``authorization: Bearer <token>``, except the health
service's, which stays open so that load balancers and Kubernetes probes need no secret.
Reflection is not exempt: it describes the API, so it needs the token too (``grpcurl -H
'authorization: Bearer ...'``). Refused calls end in UNAUTHENTICATED with a message that says
what was wrong (missing, malformed, or not the right token) and nothing else.

Several tokens may be accepted, one per client: :func:`caller_of` tells the handlers which one a
call carried, so that what a caller registers (shared memory regions) is its own.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc

log = logging.getLogger(__name__)

OPEN_SERVICES = ("grpc.health.v1.Health",)
METADATA_KEY = "authorization"
SCHEME = "bearer"

MISSING = "missing credentials: send the metadata 'authorization: Bearer <token>'"
MALFORMED = "malformed credentials: the authorization metadata must be 'Bearer <token>'"
INVALID = "invalid token"


def _digest(value: bytes) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of the token's
    # length as well as its content.
    return hashlib.sha256(value).digest()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without one of the accepted bearer tokens (constant-time comparison)."""

    def __init__(
        self,
        token: str | Sequence[str],
        open_services: Sequence[str] = OPEN_SERVICES,
        on_refusal: Callable[[str, bytes | None], None] | None = None,
    ) -> None:
        """``on_refusal(method, request)`` is called for every refused call, with the request's
        bytes for a unary call whose handler takes bytes (else None), so that refusals are
        counted like every other answer."""
        tokens = (token,) if isinstance(token, str) else tuple(token)
        if not tokens or not all(tokens):
            raise ValueError("the token must not be empty")
        self._expected = tuple(_digest(t.encode("utf-8")) for t in tokens)
        self._open = tuple(f"/{s}/" for s in open_services)
        self._on_refusal = on_refusal

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None when ``metadata`` carries the token, else the reason to refuse."""
        values = [value for key, value in (metadata or ()) if key.lower() == METADATA_KEY]
        if not values:
            return MISSING
        token = _bearer(values[0])
        if token is None:
            return MALFORMED
        presented = _digest(token.encode("utf-8"))
        # Every accepted token is compared, so that the time says nothing of which matched.
        matched = False
        for expected in self._expected:
            matched |= hmac.compare_digest(presented, expected)
        return None if matched else INVALID

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method or ""
        if method.startswith(self._open):
            return await continuation(details)
        problem = self.check(details.invocation_metadata)
        if problem is None:
            return await continuation(details)
        log.debug("refused %s: %s", method, problem)
        return _refusal(await continuation(details), problem, method, self._on_refusal)


def _bearer(value: str | bytes) -> str | None:
    """The token of an ``authorization`` value ``Bearer <token>``, or None when malformed."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != SCHEME or not token:
        return None
    return token


def caller_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """Who made a call the interceptor let through: a digest of its token (hex), never the
    token itself; "" for a call without one (token authentication off)."""
    for key, value in metadata or ():
        if key.lower() == METADATA_KEY:
            token = _bearer(value)
            return _digest(token.encode("utf-8")).hex() if token is not None else ""
    return ""


def _refusal(
    handler: grpc.RpcMethodHandler | None,
    message: str,
    method: str = "",
    on_refusal: Callable[[str, bytes | None], None] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call in UNAUTHENTICATED without
    reading (nor parsing) its request."""
    code = grpc.StatusCode.UNAUTHENTICATED

    def note(request_or_iterator) -> None:
        if on_refusal is not None:
            on_refusal(method, request_or_iterator if isinstance(request_or_iterator, bytes) else None)

    async def unary_response(request_or_iterator, context: grpc.aio.ServicerContext):
        note(request_or_iterator)
        await context.abort(code, message)

    async def stream_response(request_or_iterator, context: grpc.aio.ServicerContext):
        note(request_or_iterator)
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator; abort raises first)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(unary_response)
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    behaviour = stream_response if handler.response_streaming else unary_response
    return make(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
