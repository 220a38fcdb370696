"""``roi-loadtest``: a load generator for roi-server (closed loop, open loop, sweeps)."""

from .cli import main

__all__ = ["main"]
