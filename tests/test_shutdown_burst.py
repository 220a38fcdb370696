"""SIGTERM while a burst of calls is in flight, sent all at once by a Node.js ``@grpc/grpc-js``
client (``tests/node/burst.js``): every call that reached the server ends OK or UNAVAILABLE
(which clients retry elsewhere), never CANCELLED.

A client that fires its whole burst in one go leaves most of its calls inside gRPC, not yet
taken by the server's event loop, when the signal comes; a stop that shuts the transport down
then has gRPC cancel them. The project's own asyncio client sends more slowly and does not
show it, hence the Node.js client. Its packages are installed by ``.ci/run`` (``npm ci
--prefix tests/node``), or here when they are missing; without Node.js the test is skipped.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_service_support import start_server_process

from roi_client import EncodedRequest

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js (node) is not installed: the burst client is a Node.js program")


@pytest.fixture(scope="module")
def node_client() -> Path:
    """tests/node/burst.js with its packages installed (npm ci, from package-lock.json)."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not: cannot install tests/node's packages"
        run = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR)], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, f"npm ci in {NODE_DIR} failed:\n{run.stdout}\n{run.stderr}"
    return NODE_DIR / "burst.js"


def _request_file(tmp_path: Path, seed: int) -> Path:
    # A 61 KB map (float32 1 x 16 x 31 x 31) with 8 boxes: small enough to send 300 at once.
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((1, 16, 31, 31)).astype(np.float32)
    boxes = np.array([[0, 1, 1, 20, 20]] * 8, np.float32)
    path = tmp_path / "request.bin"
    path.write_bytes(EncodedRequest.roi_align(maps, boxes, 7, 1.0, 2, True).payload)
    return path


@pytest.mark.parametrize("signal_after_ms", [40, 40, 250])
def test_sigterm_during_a_burst_ends_every_call_ok_or_unavailable(node_client, tmp_path, seed, signal_after_ms):
    request = _request_file(tmp_path, seed)
    srv = start_server_process(
        tmp_path, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--device", "cpu", "--grace-s", "20"
    )
    try:
        count = 300
        run = subprocess.run(
            [NODE, str(node_client), "--address", srv.address, "--request", str(request), "--count", str(count),
             "--server-pid", str(srv.proc.pid), "--signal-after-ms", str(signal_after_ms), "--deadline-s", "60"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, f"the Node.js client failed:\n{run.stdout}\n{run.stderr}"
        result = json.loads(run.stdout.strip().splitlines()[-1])
        codes = collections.Counter(result["codes"])
        assert sum(codes.values()) == count
        assert set(codes) <= {"OK", "UNAVAILABLE"}, f"{dict(codes)}; messages {result['messages']}\n{srv.log()}"
        assert result["answered"] == codes["OK"], "an OK answer carried another request's id"
        assert srv.proc.wait(timeout=30) == 0, srv.log()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
