"""The deployment's moving parts, for real, on this machine: the ``roi-server`` command, a real
Prometheus server scraping it, and one client spreading calls over several servers.

(a) Prometheus (Debian's ``prometheus`` binary) scrapes a running ``roi-server`` every second;
    the request counter read back through Prometheus' HTTP query API equals the calls sent.
(b) Three ``roi-server`` processes and one ``RoIClient`` given all three addresses: every server
    gets calls (round robin), and when one is stopped with SIGTERM mid-run the client's calls
    keep succeeding on the others.

Servers run on the CPU, with the compiled kernels reused from ``ROI_KERNELS_BUILD_DIR`` (or
the default cache folder). Without the prometheus binary (a) is skipped, except under CI
(``CI=true``), which installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 120  # includes compiling the kernels when no earlier test has
LISTENING = re.compile(r"listening on (\S+):(\d+)\b")
METRICS = re.compile(r"metrics on \S*?:(\d+)\b")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def command(name: str) -> str:
    beside_python = Path(sys.executable).parent / name  # an unactivated venv's scripts
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (pip install -e '.[server]')")
    return found


class ServerProcess:
    """``roi-server --port 0 --metrics-port 0 --device cpu`` as a child process; the ports are
    read from its log line ``listening on <host>:<port> ... metrics on :<port>``."""

    def __init__(self, name: str, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.lines: list[str] = []
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._ready = threading.Event()
        env = {**os.environ, "ROI_LOG_FORMAT": "console", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [command("roi-server"), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
             "--device", "cpu", "--threads", "1", "--grace-s", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self.lines.append(line.rstrip())
                listening, metrics = LISTENING.search(line), METRICS.search(line)
                if listening:
                    self.port = int(listening.group(2))
                if metrics:
                    self.metrics_port = int(metrics.group(1))
                if self.port and self.metrics_port:
                    self._ready.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.lines[-30:])
                pytest.fail(f"{self.name} did not come up (exit code {self.proc.poll()}):\n{tail}")
        # The log line comes once the kernels are warm; health must agree.
        result = subprocess.run(
            [sys.executable, str(Path(__file__).resolve().parents[1] / "docker" / "healthcheck.py"),
             "--target", self.address], capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, f"{self.name}: {result.stdout}{result.stderr}"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def requests_counted(self, **labels: str) -> float:
        """Sum of the server's own ``roi_requests_total`` samples matching ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == "roi_requests_total" and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._reader.join(timeout=5)


@pytest.fixture(scope="module")
def kernels_built():
    """Compile (or find up to date) the kernels once, before servers start side by side."""
    result = subprocess.run([command("roi-kernels-build")], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "ROI_KERNELS_CUDA": "0"})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def servers(kernels_built, tmp_path):
    """start(n) -> n ready servers, killed at the end of the test if still running."""
    with ExitStack() as stack:

        def start(n: int) -> list[ServerProcess]:
            started = [ServerProcess(f"server{i}", tmp_path) for i in range(n)]
            for s in started:
                stack.callback(s.close)
            for s in started:
                s.wait_ready()
            return started

        yield start


def small_request():
    """One image's 8-channel map and a few boxes: cheap, so the tests measure routing."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, 8, 32, 32), dtype=np.float32)
    boxes = np.array([[0, 1, 2, 20, 24], [0, 8, 8, 30, 31], [0, 0, 0, 31, 31]], dtype=np.float32)
    return features, boxes


def pool(client, features, boxes):
    out = client.roi_align(features, boxes, output_size=(7, 7), spatial_scale=1.0, sampling_ratio=2)
    assert np.asarray(out).shape == (len(boxes), features.shape[1], 7, 7)
    return out


def roi_client(targets: list[str]):
    from roi_client import RoIClient

    return RoIClient(targets if len(targets) > 1 else targets[0])


# --------------------------------------------------------------------------------------------
# (a) Prometheus reads the request counter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, binary: str, targets: list[str], work: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = work / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: roi-server\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log = open(work / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {Path(self.log.name).read_text()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail("prometheus did not become ready")

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, want: float, timeout: float = 30) -> float | None:
        deadline, got = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got == want:
                return got
            time.sleep(0.25)
        return got

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        if in_ci():
            pytest.fail("the prometheus binary is missing; CI installs Debian's prometheus package")
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    return found


def test_prometheus_scrapes_the_request_counter(servers, tmp_path):
    binary = prometheus_binary()
    (server,) = servers(1)
    prometheus = Prometheus(binary, [f"127.0.0.1:{server.metrics_port}"], tmp_path)
    try:
        prometheus.wait_ready()
        assert prometheus.wait_for('up{job="roi-server"}', 1.0) == 1.0, "the target never came up"

        before = server.requests_counted()
        sent = 25
        features, boxes = small_request()
        with roi_client([server.address]) as client:
            for _ in range(sent):
                pool(client, features, boxes)
        assert server.requests_counted() == before + sent, "the server's own counter disagrees"

        expr = 'sum(roi_requests_total{job="roi-server"})'
        got = prometheus.wait_for(expr, before + sent)
        assert got == before + sent, f"Prometheus reports {got}, want {before + sent}"
        ok = prometheus.value('sum(roi_requests_total{job="roi-server", op="roi_align", code="OK"})')
        assert ok is not None and ok >= sent, f"roi_align OK requests through Prometheus: {ok}"
        # The latency histogram the dashboard's percentiles are built on is scraped too.
        count = prometheus.value('sum(roi_request_duration_seconds_count{job="roi-server"})')
        assert count is not None and count >= sent
    finally:
        prometheus.close()


# --------------------------------------------------------------------------------------------
# (b) One client, three servers, one of them stopped mid-run


def test_round_robin_spreads_calls_and_survives_a_server_stopping(servers):
    group = servers(3)
    features, boxes = small_request()
    before = [s.requests_counted() for s in group]
    failures: list[str] = []
    with roi_client([s.address for s in group]) as client:
        for _ in range(30):
            pool(client, features, boxes)
        spread = [s.requests_counted() - b for s, b in zip(group, before)]
        assert all(n > 0 for n in spread), f"calls per server: {spread} (round robin reaches all)"
        assert sum(spread) == 30

        stopped, survivors = group[1], [group[0], group[2]]
        mark = [s.requests_counted() for s in survivors]
        # Calls go on while the server drains and after it has gone, bounded in time. A
        # draining server answers its share of them UNAVAILABLE (the client retries them on
        # another) for up to LINGER_S after its last accepted request, then closes.
        calls, after_exit, deadline = 0, 0, time.monotonic() + 30
        while after_exit < 20 and time.monotonic() < deadline:
            if calls == 10:
                # SIGTERM drains: the server refuses new calls and the client must move on.
                stopped.proc.send_signal(signal.SIGTERM)
            if stopped.proc.poll() is not None:
                after_exit += 1
            try:
                pool(client, features, boxes)
            except Exception as exc:  # noqa: BLE001  (every failure is reported)
                failures.append(f"call {calls}: {exc!r}")
            calls += 1
        assert not failures, "calls failed while one server stopped:\n" + "\n".join(failures)
        assert after_exit == 20, f"the stopped server had not exited after {calls} calls in 30 s"
        assert stopped.proc.wait(timeout=60) == 0, "a drained server exits 0"
        after = [s.requests_counted() for s in survivors]
        assert all(a > m for a, m in zip(after, mark)), "both remaining servers keep getting calls"
