"""The server's configuration: one frozen object, read once from flags and ``ROI_*`` variables.

A flag wins over its environment variable, which wins over the default. Every field is listed
in :data:`FIELDS` with its flag, variable, type and help, so that the CLI, the README's table
and the checks come from one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
# gRPC fails messages of about 1 GiB and more outright; refuse such a limit at startup instead.
MESSAGE_BYTES_CEILING = 1024 * MiB - 1


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9100
    device: str = "auto"
    max_batch_boxes: int = 8192
    max_batch_bytes: int = 256 * MiB
    max_wait_ms: float = 0.0
    max_batch_requests: int = 64
    max_queue: int = 256
    inline_max_samples: int = 1 << 19
    max_message_bytes: int = 256 * MiB
    max_boxes: int = 65536
    max_output_elements: int = 1 << 25
    threads: int = 0
    malloc: str = "reuse"
    log_format: str = "console"
    log_level: str = "info"
    grace_s: float = 20.0
    max_connection_age_s: float = 0.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_token_file: str = ""
    # Never printed: kept out of repr, logs and error messages.
    auth_token: str = field(default="", repr=False)
    allow_shared_memory: bool = False
    shared_memory_prefix: str = "roi_"
    feature_store_bytes: int = 1024 * MiB
    feature_ttl: float = 300.0
    # 0: half of feature_store_bytes.
    feature_store_caller_bytes: int = 0

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def bind_address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def bearer_tokens(self) -> tuple[str, ...]:
        """The tokens clients may send (``authorization: Bearer <token>``), none when token
        authentication is off. Each token is its own caller: shared memory regions registered
        with one are invisible to the others."""
        if self.auth_token:
            return (self.auth_token,)
        if self.auth_token_file:
            return read_token_file(self.auth_token_file)
        return ()


@dataclass(frozen=True)
class Field:
    name: str
    # None: set by the environment variable only (a secret should not show in process lists).
    flag: str | None
    env: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    secret: bool = False
    # A flag without a value (given: on); its variable takes 1/0, true/false, yes/no, on/off.
    switch: bool = False


def _device(text: str) -> str:
    value = text.strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")


def _int(text: str) -> int:
    # Underscores allowed, as in Python literals: 268_435_456.
    return int(text.strip().replace("_", ""))


def _path(text: str) -> str:
    return os.path.expanduser(text.strip())


def _check_pem(path: str, name: str, kind: str) -> str | None:
    """None when ``path`` is a readable PEM file holding a ``kind`` ("CERTIFICATE",
    "PRIVATE KEY"), else the problem."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        return f"{name}: cannot read {path}: {exc.strerror or exc}"
    if b"-----BEGIN" not in text or kind.encode() not in text:
        return f"{name}: {path} holds no PEM {kind.lower()}"
    return None


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def read_token_file(path: str) -> tuple[str, ...]:
    """The tokens in ``path``, one a line (surrounding whitespace and empty lines dropped)."""
    with open(path, encoding="utf-8") as f:
        return tuple(line.strip() for line in f.read().splitlines() if line.strip())


def _token_problem(token: str, source: str) -> str | None:
    # gRPC metadata values must be printable ASCII; a space would split the header.
    if not token:
        return f"{source}: the token is empty"
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        return f"{source}: the token must be printable ASCII without spaces"
    return None


FIELDS: tuple[Field, ...] = (
    Field("host", "--host", "ROI_HOST", str, "address to listen on (:: for all IPv6 and IPv4)"),
    Field("port", "--port", "ROI_PORT", _int, "gRPC port; 0 picks a free one (logged)"),
    Field(
        "metrics_port",
        "--metrics-port",
        "ROI_METRICS_PORT",
        _int,
        "Prometheus /metrics port; 0 picks a free one, -1 turns metrics off",
    ),
    Field("device", "--device", "ROI_DEVICE", _device, "auto (the GPU when present), cpu, cuda or cuda:N"),
    Field(
        "max_batch_boxes",
        "--max-batch-boxes",
        "ROI_MAX_BATCH_BOXES",
        _int,
        "a batch is launched once it holds this many boxes",
    ),
    Field(
        "max_batch_bytes",
        "--max-batch-bytes",
        "ROI_MAX_BATCH_BYTES",
        _int,
        "a batch is launched once its feature maps take this many bytes",
    ),
    Field(
        "max_wait_ms",
        "--max-wait-ms",
        "ROI_MAX_WAIT_MS",
        float,
        "how long a batch waits for more requests after its first one; 0: it starts as soon as "
        "the device is free, and batches form from requests that arrive while the device is busy",
    ),
    Field(
        "max_batch_requests",
        "--max-batch-requests",
        "ROI_MAX_BATCH_REQUESTS",
        _int,
        "most requests in one batch; 1 turns batching off",
    ),
    Field(
        "max_queue",
        "--max-queue",
        "ROI_MAX_QUEUE",
        _int,
        "requests waiting for the device beyond which new ones get RESOURCE_EXHAUSTED",
    ),
    Field(
        "inline_max_samples",
        "--inline-max-samples",
        "ROI_INLINE_MAX_SAMPLES",
        _int,
        "on the CPU, a batch that reads at most this many samples runs on the event loop instead "
        "of the worker thread (the hand-over costs more than such a kernel); 0: never",
    ),
    Field(
        "max_message_bytes",
        "--max-message-bytes",
        "ROI_MAX_MESSAGE_BYTES",
        _int,
        "largest request or response message (below 1 GiB)",
    ),
    Field("max_boxes", "--max-boxes", "ROI_MAX_BOXES", _int, "most boxes in one request"),
    Field(
        "max_output_elements",
        "--max-output-elements",
        "ROI_MAX_OUTPUT_ELEMENTS",
        _int,
        "most output elements (K * C * PH * PW) of one request",
    ),
    Field("threads", "--threads", "ROI_THREADS", _int, "torch intra-op threads; 0 keeps torch's default"),
    Field(
        "malloc",
        "--malloc",
        "ROI_MALLOC",
        lambda s: s.strip().lower(),
        "reuse: glibc keeps large buffers (messages, tensors) for the next request instead of "
        "mapping them afresh each time (2x faster for messages of tens of MB; memory stays at its "
        "high-water mark); default: glibc as configured by its MALLOC_* variables",
        choices=("reuse", "default"),
    ),
    Field(
        "log_format",
        "--log-format",
        "ROI_LOG_FORMAT",
        lambda s: s.strip().lower(),
        "console or json (one object per line)",
        choices=("console", "json"),
    ),
    Field(
        "log_level",
        "--log-level",
        "ROI_LOG_LEVEL",
        lambda s: s.strip().lower(),
        "debug, info, warning or error",
        choices=("debug", "info", "warning", "error"),
    ),
    Field(
        "grace_s",
        "--grace-s",
        "ROI_GRACE_S",
        float,
        "on SIGTERM/SIGINT, how long accepted requests may take to finish",
    ),
    Field(
        "max_connection_age_s",
        "--max-connection-age-s",
        "ROI_MAX_CONNECTION_AGE_S",
        float,
        "close connections after this long so that clients re-resolve (0: never)",
    ),
    Field(
        "tls_cert",
        "--tls-cert",
        "ROI_TLS_CERT",
        _path,
        "PEM certificate (chain) of the server; with --tls-key the gRPC port speaks TLS only",
    ),
    Field("tls_key", "--tls-key", "ROI_TLS_KEY", _path, "PEM private key of --tls-cert"),
    Field(
        "tls_client_ca",
        "--tls-client-ca",
        "ROI_TLS_CLIENT_CA",
        _path,
        "PEM CA certificate(s): clients must present a certificate signed by one (mutual TLS)",
    ),
    Field(
        "auth_token_file",
        "--auth-token-file",
        "ROI_AUTH_TOKEN_FILE",
        _path,
        "file holding the bearer token every call but health checks must carry (several: one a "
        "line, one per client)",
    ),
    Field(
        "auth_token",
        None,
        "ROI_AUTH_TOKEN",
        lambda s: s.strip(),
        "the bearer token itself (instead of a file); never logged",
        secret=True,
    ),
    Field(
        "allow_shared_memory",
        "--allow-shared-memory",
        "ROI_ALLOW_SHARED_MEMORY",
        _switch,
        "let clients on this host register POSIX shared memory regions (/dev/shm) for their "
        "tensors and results, instead of sending them in messages",
        switch=True,
    ),
    Field(
        "shared_memory_prefix",
        "--shared-memory-prefix",
        "ROI_SHARED_MEMORY_PREFIX",
        lambda s: s.strip(),
        "the only shared memory objects clients may register are those whose name under "
        "/dev/shm starts with this",
    ),
    Field(
        "feature_store_bytes",
        "--feature-store-bytes",
        "ROI_FEATURE_STORE_BYTES",
        _int,
        "bytes the feature handles (UploadFeatures) may take together; the least recently used "
        "are evicted to make room; 0 turns feature handles off",
    ),
    Field(
        "feature_ttl",
        "--feature-ttl",
        "ROI_FEATURE_TTL",
        float,
        "seconds a feature handle lives after its last use (an upload may ask for less)",
    ),
    Field(
        "feature_store_caller_bytes",
        "--feature-store-caller-bytes",
        "ROI_FEATURE_STORE_CALLER_BYTES",
        _int,
        "with token authentication on, the most bytes of feature handles one token may hold; "
        "0: half of --feature-store-bytes",
    ),
)


def validate(s: Settings) -> list[str]:
    problems = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    need(0 <= s.port <= 65535, f"port must be in [0, 65535], got {s.port}")
    need(s.metrics_port == -1 or 0 <= s.metrics_port <= 65535, f"metrics_port must be -1 or a port, got {s.metrics_port}")
    need(s.max_batch_boxes >= 1, f"max_batch_boxes must be >= 1, got {s.max_batch_boxes}")
    need(s.max_batch_bytes >= 1, f"max_batch_bytes must be >= 1, got {s.max_batch_bytes}")
    need(s.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {s.max_wait_ms}")
    need(s.max_batch_requests >= 1, f"max_batch_requests must be >= 1, got {s.max_batch_requests}")
    need(s.max_queue >= 1, f"max_queue must be >= 1, got {s.max_queue}")
    need(s.inline_max_samples >= 0, f"inline_max_samples must be >= 0, got {s.inline_max_samples}")
    need(
        1024 <= s.max_message_bytes <= MESSAGE_BYTES_CEILING,
        f"max_message_bytes must be in [1024, {MESSAGE_BYTES_CEILING}] (gRPC fails messages of 1 GiB), "
        f"got {s.max_message_bytes}",
    )
    need(s.max_boxes >= 1, f"max_boxes must be >= 1, got {s.max_boxes}")
    need(s.max_output_elements >= 1, f"max_output_elements must be >= 1, got {s.max_output_elements}")
    need(s.threads >= 0, f"threads must be >= 0, got {s.threads}")
    need(s.log_format in ("console", "json"), f"log_format must be console or json, got {s.log_format!r}")
    need(
        s.log_level in ("debug", "info", "warning", "error"),
        f"log_level must be debug, info, warning or error, got {s.log_level!r}",
    )
    need(s.grace_s >= 0, f"grace_s must be >= 0, got {s.grace_s}")
    need(s.max_connection_age_s >= 0, f"max_connection_age_s must be >= 0, got {s.max_connection_age_s}")
    try:
        _device(s.device)
    except ValueError as exc:
        problems.append(str(exc))

    need(bool(s.tls_cert) == bool(s.tls_key), "tls_cert and tls_key: give both (TLS) or neither (plaintext)")
    need(not s.tls_client_ca or bool(s.tls_cert), "tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS)")
    for name, path, kind in (
        ("tls_cert", s.tls_cert, "CERTIFICATE"),
        ("tls_key", s.tls_key, "PRIVATE KEY"),
        ("tls_client_ca", s.tls_client_ca, "CERTIFICATE"),
    ):
        if path:
            problem = _check_pem(path, name, kind)
            if problem:
                problems.append(problem)

    need(not (s.auth_token and s.auth_token_file), "auth_token (ROI_AUTH_TOKEN) and auth_token_file: give one")
    if s.auth_token:
        problem = _token_problem(s.auth_token, "auth_token (ROI_AUTH_TOKEN)")
        if problem:
            problems.append(problem)
    elif s.auth_token_file:
        try:
            tokens = read_token_file(s.auth_token_file)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"auth_token_file: cannot read {s.auth_token_file}: {getattr(exc, 'strerror', None) or exc}")
        else:
            for token in tokens or ("",):
                problem = _token_problem(token, f"auth_token_file {s.auth_token_file}")
                if problem:
                    problems.append(problem)
                    break
    need(s.feature_store_bytes >= 0, f"feature_store_bytes must be >= 0 (0: off), got {s.feature_store_bytes}")
    need(
        math.isfinite(s.feature_ttl) and s.feature_ttl > 0, f"feature_ttl must be a positive number of seconds, got {s.feature_ttl}"
    )
    need(
        0 <= s.feature_store_caller_bytes <= s.feature_store_bytes,
        f"feature_store_caller_bytes must be in [0, feature_store_bytes = {s.feature_store_bytes}] (0: half of it), "
        f"got {s.feature_store_caller_bytes}",
    )
    problem = shared_memory_prefix_problem(s.shared_memory_prefix)
    if problem:
        problems.append(f"shared_memory_prefix: {problem}")
    return problems


def shared_memory_prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot confine the names clients register, or None. An empty prefix
    would admit every object under /dev/shm, other programs' included."""
    if not prefix:
        return "must not be empty (it keeps clients to the objects meant for this server)"
    if "/" in prefix or "\0" in prefix or prefix.startswith("."):
        return f"must be a plain file name start, without '/', NUL or a leading '.', got {prefix!r}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roi-server",
        description="RoI feature extraction over gRPC (roi.v1.RoIService).",
        epilog="Every flag can also be set by the environment variable named in its help.",
    )
    defaults = Settings()
    for f in FIELDS:
        if f.flag is None:
            continue
        default = getattr(defaults, f.name)
        shown = ("on" if default else "off") if f.switch else (default if default != "" else "none")
        help_text = f"{f.help} [env {f.env}, default {shown}]"
        if f.switch:
            parser.add_argument(f.flag, dest=f.name, default=None, action="store_const", const="1", help=help_text)
            continue
        parser.add_argument(
            f.flag,
            dest=f.name,
            default=None,
            metavar="{" + ",".join(f.choices) + "}" if f.choices else f.name.upper(),
            help=help_text,
        )
    secrets = [f for f in FIELDS if f.flag is None]
    if secrets:
        parser.epilog = (parser.epilog or "") + " Set by environment only: " + "; ".join(
            f"{f.env}: {f.help}" for f in secrets
        ) + "."
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags, then ``ROI_*`` variables, then defaults. Raises SystemExit (via argparse) on a
    malformed flag and ValueError naming the variable on a malformed variable."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in FIELDS:
        raw = getattr(args, f.name) if f.flag is not None else None
        source = f.flag or f.env
        if raw is None:
            raw = environ.get(f.env)
            source = f.env
        if raw is None or raw == "":
            continue
        try:
            value = f.parse(raw)
        except ValueError as exc:
            shown = "the given value" if f.secret else repr(raw)
            raise ValueError(f"{source}: cannot read {shown}: {exc}") from None
        if f.choices and value not in f.choices:
            raise ValueError(f"{source} must be one of {', '.join(f.choices)}, got {raw!r}")
        values[f.name] = value
    return Settings(**values)
