"""roi_client.reuse_freed_memory: glibc serves large buffers from its heap and keeps them
for the next call, instead of mapping each one afresh (and faulting its pages in) and
unmapping it on free. Checked through glibc's own accounting (mallinfo2), in a fresh
process each time, since the setting is process-wide."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

PROBE = r"""
import ctypes, json, sys
import numpy as np

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = None
if sys.argv[1] == "reuse":
    from roi_client import reuse_freed_memory
    applied = reuse_freed_memory()
n = 48 << 20  # above glibc's largest mmap threshold (32 MiB)
buf = np.ones(n, np.uint8)
held = libc.mallinfo2()
address = buf.ctypes.data
del buf
freed = libc.mallinfo2()
again = np.ones(n, np.uint8)
print(json.dumps({"applied": applied, "held_mmapped": held.hblkhd, "held_heap": held.arena,
                  "freed_heap": freed.arena, "freed_free": freed.fordblks,
                  "same_buffer": again.ctypes.data == address}))
"""

MiB = 1 << 20


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_glibc_maps_a_large_buffer_afresh_by_default():
    got = probe("default")
    # The control: without the setting, the buffer is its own mapping, gone when freed.
    assert got["held_mmapped"] >= 48 * MiB, got
    assert got["freed_heap"] < 48 * MiB, got


def test_reuse_keeps_large_buffers_in_the_heap_for_the_next_call():
    got = probe("reuse")
    assert got["applied"] is True
    assert got["held_mmapped"] < 48 * MiB, f"the buffer was still mapped on its own: {got}"
    assert got["held_heap"] >= 48 * MiB, got
    # Freed, it stays with the process, free for the next buffer, which reuses it.
    assert got["freed_heap"] >= 48 * MiB and got["freed_free"] >= 48 * MiB, got
    assert got["same_buffer"], got


def test_the_server_and_the_load_tester_take_the_setting(tmp_path):
    from roi_server.settings import load_settings

    assert load_settings([]).malloc == "reuse"
    assert load_settings(["--malloc", "default"]).malloc == "default"
    with pytest.raises(ValueError):
        load_settings(["--malloc", "jemalloc"])
    from roi_client.loadtest.cli import build_parser

    assert build_parser().parse_args(["127.0.0.1:1"]).malloc == "reuse"
