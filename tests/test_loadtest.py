"""roi-loadtest end to end: a real roi-server subprocess, the load tester as a real command,
and its JSON and PNG outputs checked for consistency."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
LISTENING = re.compile(r"listening on \S*?:(\d+)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _command(name: str) -> list[str]:
    exe = BIN / name
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return [found]


@pytest.fixture(scope="module")
def server():
    """A CPU roi-server on a free port; yields its address. Startup may include the kernels'
    first build, so it gets a longer deadline than the load itself."""
    cmd = [*_command("roi-server"), "--port", "0", "--metrics-port", "-1", "--device", "cpu", "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = LISTENING.search(line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        proc.kill()
        pytest.fail("roi-server did not report its port:\n" + "".join(lines[-40:]))
    # Drain the log so that a full pipe never stalls the server.
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    yield f"127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _loadtest(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([*_command("roi-loadtest"), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"roi-loadtest failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _check_png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _check_run(run: dict) -> None:
    assert run["requests"] == run["ok"] + run["error_count"]
    assert run["error_count"] == sum(run["errors"].values())
    assert run["error_count"] == 0, run["errors"]
    assert run["ok"] > 0 and run["throughput_rps"] > 0 and run["boxes_per_s"] > 0
    assert run["sent_MBps"] > 0 and run["received_MBps"] > 0
    lat = run["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    srv = run["server"]
    for key in ("queue_ms", "compute_ms", "total_ms", "batch_requests", "batch_boxes"):
        assert srv[key] is not None, key
        assert srv[key]["p50"] <= srv[key]["max"]
    assert srv["batch_requests"]["min"] >= 1
    assert srv["compute_ms"]["p50"] > 0
    # The server's own time cannot exceed the round trip that contains it.
    assert srv["total_ms"]["p50"] <= lat["max"]


def test_closed_loop_json_and_histogram(server, tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    proc = _loadtest([server, "--workload", "tiny", "--concurrency", "4", "--duration", "2", "--warmup", "0.5",
                      "--json", str(out), "--plot", str(png), "--verify", "2"])
    assert "req/s" in proc.stdout and "p99" in proc.stdout and "CPU cores" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["meta"]["mode"] == "closed" and doc["meta"]["host"]["cpus"] >= 1
    assert doc["meta"]["workload"]["name"] == "tiny"
    (run,) = doc["runs"]
    _check_run(run)
    assert run["concurrency"] == 4
    # 8 boxes per tiny request
    assert run["boxes_per_s"] == pytest.approx(8 * run["throughput_rps"])
    assert run["verify"]["checked"] == 2 and run["verify"]["mismatches"] == 0
    _check_png(png)


def test_sweep_json_and_curve(server, tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    _loadtest([server, "--workload", "single-level", "--dtype", "float16", "--boxes", "64",
               "--sweep-concurrency", "1,4", "--duration", "1.5", "--warmup", "0.5",
               "--json", str(out), "--plot", str(png)])
    doc = json.loads(out.read_text())
    assert doc["meta"]["mode"] == "sweep-concurrency"
    assert [r["concurrency"] for r in doc["runs"]] == [1, 4]
    for run in doc["runs"]:
        _check_run(run)
    _check_png(png)


def test_open_loop_counts_from_schedule(server, tmp_path):
    out = tmp_path / "open.json"
    _loadtest([server, "--workload", "tiny", "--rate", "100", "--requests", "150", "--warmup", "0.3",
               "--json", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    _check_run(run)
    assert run["requests"] == 150
    gen = run["generator"]
    assert gen["asked_rate"] == 100 and gen["send_lag_ms"]["p50"] >= 0
    assert isinstance(gen["kept_up"], bool)


def test_refused_requests_are_counted_apart_not_as_throughput(server, tmp_path):
    """Every request is refused at once (70,000 boxes, past the server's limit of 65,536): the
    figures count successful requests only, so they are zero, and the errors stand apart."""
    out = tmp_path / "refused.json"
    proc = _loadtest([server, "--op", "roi_align", "--boxes", "70000", "--map", "4x8x8", "--concurrency", "2",
                      "--duration", "1", "--warmup", "0.2", "--json", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    assert run["ok"] == 0 and run["error_count"] == run["requests"] > 0
    assert set(run["errors"]) == {"INVALID_ARGUMENT"}
    assert run["throughput_rps"] == 0 and run["sent_MBps"] == 0 and run["received_MBps"] == 0
    assert run["error_sent_bytes"] > 0
    assert "errors (not in the figures above): INVALID_ARGUMENT" in proc.stdout
    # One vocabulary for the two directions: the workload line and the table both say sent and received.
    assert "MB sent /" in proc.stdout and "MB received per request" in proc.stdout
    assert "sent MB/s" in proc.stdout and "recv MB/s" in proc.stdout
