"""TLS for the gRPC port: the server's certificate and key, and for mutual TLS the CA that
clients' certificates must be signed by. The metrics port stays plain HTTP (Prometheus
scrapes it inside the cluster)."""

from __future__ import annotations

import grpc

from .settings import Settings


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials; None listens in plaintext.

    With ``tls_client_ca`` the server requires a client certificate signed by that CA and
    refuses the handshake otherwise (the call then fails with UNAVAILABLE on the client).
    The files are read once, at start-up: replacing a certificate takes a restart.
    """
    if not settings.tls:
        return None
    client_ca = _read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key), _read(settings.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def describe(settings: Settings) -> str:
    """For the start-up log line."""
    if not settings.tls:
        return "plaintext"
    return "TLS, client certificates required" if settings.tls_client_ca else "TLS"
