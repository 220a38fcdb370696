"""``roi-server``: the entry point. Reads the settings, configures logging, serves until
SIGTERM/SIGINT, drains, exits 0. Exit code 2: bad configuration; 1: the server failed to start."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from .settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValueError as exc:
        print(f"roi-server: configuration error: {exc}", file=sys.stderr)
        return 2

    from .extras import require

    if not require("roi-server"):
        return 2

    from .logging_setup import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    log = logging.getLogger("roi_server")
    if settings.malloc == "reuse":
        from roi_client.memory import reuse_freed_memory

        reuse_freed_memory()
    # Imported after logging is set up: importing torch and grpc takes a moment, and a failure
    # there should reach the configured log.
    from .server import serve

    try:
        asyncio.run(serve(settings))
    except Exception as exc:
        log.error("the server failed: %s", exc, exc_info=settings.log_level == "debug")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
