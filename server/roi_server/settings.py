"""The server's configuration: one frozen object, read once from flags and ``ROI_*`` variables.

A flag wins over its environment variable, which wins over the default. Every field is listed
in :data:`FIELDS` with its flag, variable, type and help, so that the CLI, the README's table
and the checks come from one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
    max_wait_ms: float = 2.0
    max_batch_requests: int = 64
    max_queue: int = 256
    max_message_bytes: int = 256 * MiB
    max_boxes: int = 65536
    max_output_elements: int = 1 << 25
    threads: int = 0
    log_format: str = "console"
    log_level: str = "info"
    grace_s: float = 20.0
    max_connection_age_s: float = 0.0

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


@dataclass(frozen=True)
class Field:
    name: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None


def _device(text: str) -> str:
    value = text.strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")


def _int(text: str) -> int:
    # Underscores allowed, as in Python literals: 268_435_456.
    return int(text.strip().replace("_", ""))


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
        "longest a batch waits for more requests after its first one (while the device is idle)",
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
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roi-server",
        description="RoI feature extraction over gRPC (roi.v1.RoIService).",
        epilog="Every flag can also be set by the environment variable named in its help.",
    )
    defaults = Settings()
    for f in FIELDS:
        parser.add_argument(
            f.flag,
            dest=f.name,
            default=None,
            metavar="{" + ",".join(f.choices) + "}" if f.choices else f.name.upper(),
            help=f"{f.help} [env {f.env}, default {getattr(defaults, f.name)}]",
        )
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags, then ``ROI_*`` variables, then defaults. Raises SystemExit (via argparse) on a
    malformed flag and ValueError naming the variable on a malformed variable."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in FIELDS:
        raw = getattr(args, f.name)
        source = f.flag
        if raw is None:
            raw = environ.get(f.env)
            source = f.env
        if raw is None or raw == "":
            continue
        try:
            value = f.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{source}: cannot read {raw!r}: {exc}") from None
        if f.choices and value not in f.choices:
            raise ValueError(f"{source} must be one of {', '.join(f.choices)}, got {raw!r}")
        values[f.name] = value
    return Settings(**values)
