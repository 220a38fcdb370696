"""The ``server`` extra: ``roi-server`` and ``roi-kernels-build`` check for it before importing
anything of it, so that a client-only install (``pip install roi-service``) gets one line
naming what to install and exit code 2, not a traceback."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

# Module -> the distribution of the server extra that provides it.
SERVER_MODULES = {
    "torch": "torch",
    "ninja": "ninja",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "prometheus_client": "prometheus-client",
}
# What compiling the kernels needs.
BUILD_MODULES = ("torch", "ninja")


def missing(modules: Sequence[str]) -> list[str]:
    """The distributions providing ``modules`` that are not installed."""
    return [SERVER_MODULES[m] for m in modules if importlib.util.find_spec(m) is None]


def require(prog: str, modules: Sequence[str] = tuple(SERVER_MODULES)) -> bool:
    """True when every module is installed; otherwise prints one line to stderr naming the
    extra (and what of it is missing) and returns False."""
    absent = missing(modules)
    if not absent:
        return True
    print(
        f"{prog}: needs the 'server' extra ({', '.join(absent)} not installed): "
        f"pip install 'roi-service[server]' (see the README for torch's CPU-only build)",
        file=sys.stderr,
    )
    return False


def kernels_build_main(argv: Sequence[str] | None = None) -> int:
    """``roi-kernels-build``: :func:`roi_kernels.build.main` once torch and ninja are there."""
    if not require("roi-kernels-build", BUILD_MODULES):
        return 2
    from roi_kernels.build import main

    return main(None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(kernels_build_main())
