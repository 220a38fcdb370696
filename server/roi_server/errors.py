"""The errors a request can end in, each with its gRPC status code.

Everything the service raises on purpose is a :class:`ServiceError`; :func:`status_of` turns any
exception into ``(code, message)`` for the client, and is the one place that decides what an
unexpected exception may reveal (nothing: the traceback stays in the server's log).
"""

from __future__ import annotations

import grpc

# A status message travels in the response's trailers, whose size gRPC clients cap (by
# default, past 8 KiB they may and past 16 KiB they do refuse them, and the caller sees
# RESOURCE_EXHAUSTED "received metadata size exceeds ..." instead of the server's words).
# Messages quote request values (shapes, scales), so they are cut to this length.
MAX_MESSAGE_CHARS = 1024


class ServiceError(Exception):
    """An error with the status code and the message the client receives."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


class QueueFull(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class KernelError(ServiceError):
    """The kernel refused one request's input (a check the service's own validation lacks)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


def kernel_message(exc: BaseException) -> str:
    """The first line of a torch/C++ error: c10 appends "Exception raised from ..." and a C++
    backtrace, which are for the server's log, not for clients."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:500]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """What a client is told about ``exc``."""
    if isinstance(exc, ServiceError):
        message = exc.message
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        return exc.code, message
    return grpc.StatusCode.INTERNAL, "internal error (logged by the server)"
