"""Channel settings shared by the blocking and the asyncio client: target, options, and the
service config (round-robin balancing, retries of UNAVAILABLE)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Sequence
from typing import Union

import grpc

from .errors import RoIError

SERVICE = "roi.v1.RoIService"
POOL = f"/{SERVICE}/Pool"
POOL_STREAM = f"/{SERVICE}/PoolStream"
DESCRIBE = f"/{SERVICE}/Describe"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
DEFAULT_TARGET = "localhost:50051"

# A PEM file's path, or its contents as bytes.
PemSource = Union[str, "os.PathLike[str]", bytes]


def service_config(max_attempts: int = 5) -> str:
    """Round-robin over every address the target resolves to, and retries of UNAVAILABLE
    (a server that is starting, draining or gone) with exponential backoff. Only UNAVAILABLE is
    retried: the others are answers, and a retried RESOURCE_EXHAUSTED would add load to a
    server that has just said it has too much."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE}, {"service": "grpc.health.v1.Health"}],
                "retryPolicy": {
                    "maxAttempts": min(max_attempts, 5),  # gRPC caps attempts at 5
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def channel_options(max_message_bytes: int, max_attempts: int = 5) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A ping every 30 s on an idle connection keeps NATs and load balancers from dropping
        # it; the server accepts pings every 10 s (a faster rate earns GOAWAY too_many_pings).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
        # A retried call is replayed from a buffer, 256 KiB by default: requests bigger than
        # that would not be retried at all.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.retry_buffer_size", max_message_bytes),
        ("grpc.service_config", service_config(max_attempts)),
    ]


def _split_host_port(address: str) -> tuple[str, str]:
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest.lstrip(":")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RoIError.invalid_argument(f"address {address!r} must be host:port")
    return host, port


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one or several addresses.

    One address (or any gRPC target, such as ``dns:///roi.example:50051``) is used as it is.
    Several ``host:port`` addresses become an ``ipv4:``/``ipv6:`` list, balanced round-robin;
    host names among them are resolved once, here. (For a set of servers that changes, give
    one ``dns:///`` name that resolves to all of them.)
    """
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise RoIError.invalid_argument("target: give at least one address")
    if len(addresses) == 1:
        return addresses[0]
    v4, v6 = [], []
    for address in addresses:
        host, port = _split_host_port(address)
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise RoIError(grpc.StatusCode.UNAVAILABLE, f"cannot resolve {host!r}: {exc}") from None
            ips = [ipaddress.ip_address(info[4][0]) for info in infos[:1]]
        for ip in ips:
            (v4 if ip.version == 4 else v6).append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if v4 and v6:
        raise RoIError.invalid_argument("target: mix of IPv4 and IPv6 addresses; give one family or a dns:/// name")
    return ("ipv4:" + ",".join(v4)) if v4 else ("ipv6:" + ",".join(v6))


# grpc.health.v1's two messages, built here from their definition so that the client needs
# neither grpcio-health-checking (a server dependency) nor generated code. A pool of their
# own: grpc_health, where it is installed, registers the same names in the default pool.
_HEALTH_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
_health_messages = None


def _health_classes():
    global _health_messages
    if _health_messages is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        f = descriptor_pb2.FileDescriptorProto(name="roi_client/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3")
        req = f.message_type.add(name="HealthCheckRequest")
        req.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=1)
        resp = f.message_type.add(name="HealthCheckResponse")
        enum = resp.enum_type.add(name="ServingStatus")
        for number, name in enumerate(_HEALTH_STATUSES):
            enum.value.add(name=name, number=number)
        resp.field.add(
            name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM, label=1,
            type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        )  # fmt: skip
        pool = descriptor_pool.DescriptorPool()
        pool.Add(f)
        _health_messages = tuple(
            message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.health.v1.{name}"))
            for name in ("HealthCheckRequest", "HealthCheckResponse")
        )
    return _health_messages


def health_request(service: str) -> bytes:
    request_class, _ = _health_classes()
    return request_class(service=service).SerializeToString()


def health_status(raw: bytes) -> str:
    """The status's name ("SERVING", ...); a number this client does not know comes as its
    value."""
    _, response_class = _health_classes()
    status = response_class.FromString(raw).status
    return _HEALTH_STATUSES[status] if 0 <= status < len(_HEALTH_STATUSES) else str(status)


def _pem(source: PemSource | None, name: str) -> bytes | None:
    if source is None:
        return None
    if isinstance(source, bytes):
        return source
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise RoIError.invalid_argument(f"{name}: cannot read {path}: {exc.strerror or exc}") from None


def channel_credentials(
    tls: bool | None,
    tls_ca: PemSource | None,
    tls_cert: PemSource | None,
    tls_key: PemSource | None,
    credentials: grpc.ChannelCredentials | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files (or bytes), or None for plaintext.

    TLS is on when ``tls`` is true or any file is given (``tls=False`` with a file is an
    error). ``tls_ca`` is the CA that signed the server's certificate (default: the system's
    roots); ``tls_cert`` and ``tls_key`` are the client's certificate and key for mutual TLS.
    """
    files = (tls_ca, tls_cert, tls_key)
    if credentials is not None:
        if tls or any(f is not None for f in files):
            raise RoIError.invalid_argument("give credentials or the tls_* arguments, not both")
        return credentials
    if tls is False and any(f is not None for f in files):
        raise RoIError.invalid_argument("tls=False contradicts the tls_* files given")
    if not tls and all(f is None for f in files):
        return None
    if (tls_cert is None) != (tls_key is None):
        raise RoIError.invalid_argument("tls_cert and tls_key: give both (mutual TLS) or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca, "tls_ca"),
        private_key=_pem(tls_key, "tls_key"),
        certificate_chain=_pem(tls_cert, "tls_cert"),
    )


def tls_options(server_name: str | None) -> list[tuple[str, object]]:
    """Verifies the server's certificate against ``server_name`` instead of the target's
    host (for a target given as an IP address, or a proxy in between)."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The ``authorization: Bearer <token>`` metadata sent with every call."""
    if token is None:
        return None
    token = token.strip()
    if not token or not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise RoIError.invalid_argument("token must be non-empty printable ASCII without spaces")
    return (("authorization", f"Bearer {token}"),)
