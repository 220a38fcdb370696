"""How glibc's malloc treats the large buffers a call passes through.

A request of tens of megabytes is held, in turn, by the encoded message, gRPC's send and
receive buffers, the parsed message and the response's bytes, on both sides of the call.
glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so each of those buffers is page-faulted in anew for every
call: about 0.27 ms a megabyte here, more than the kernels' own time for the standard
workloads. :func:`reuse_freed_memory` makes glibc take every buffer from its heap and keep
freed memory for the next call (``mallopt``: no mmap, no trimming below 1 GiB at the heap's
top). The price: the process's resident memory stays at its high-water mark instead of
shrinking between calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("roi_client")

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

KEEP_TOP_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20


def reuse_freed_memory() -> bool:
    """Sets this process's glibc malloc to keep and reuse large buffers (the server does this
    at start-up; ``roi-loadtest`` too). A client that sends or receives tens of megabytes per
    call halves its share of the round trip with it; it changes the whole process's
    allocator, so it is the caller's choice. Returns False (and changes nothing) where the C
    library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
    except (OSError, AttributeError):
        log.info("the C library is not glibc: large buffers are left to its allocator")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = all(
        mallopt(param, value) == 1
        for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_TOP_BYTES), (M_TOP_PAD, TOP_PAD_BYTES))
    )
    if not done:
        log.warning("glibc refused a malloc setting: large buffers may be mapped afresh per request")
    return done
