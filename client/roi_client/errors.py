"""The client's one exception type."""

from __future__ import annotations

import grpc


class RoIError(Exception):
    """A call that did not succeed: ``code`` is its ``grpc.StatusCode``, ``details`` the
    server's message (or the client's, for an argument it refused before sending)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> RoIError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

    @classmethod
    def from_status(cls, code: int, details: str) -> RoIError:
        by_value = {c.value[0]: c for c in grpc.StatusCode}
        return cls(by_value.get(code, grpc.StatusCode.UNKNOWN), details)

    @classmethod
    def invalid_argument(cls, details: str) -> RoIError:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, details)

    def __reduce__(self):
        return (type(self), (self.code, self.details))
