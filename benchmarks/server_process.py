"""A ``roi-server`` process for the benchmark scripts (soak.py, fuzz_service.py): started on
free ports, or an address given by the user, and stopped the way an orchestrator stops it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LISTENING = re.compile(r"listening on (\S+):(\d+)")
METRICS_ON = re.compile(r"metrics on :(\d+)")


@dataclass
class Server:
    """A server to drive: ``proc`` is None for one this script did not start."""

    address: str
    metrics_url: str | None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait: the exit status (None for a server this script did not start)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def roi_server_command() -> list[str]:
    exe = Path(sys.executable).with_name("roi-server")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "roi_server.main"]


def start_server(extra: list[str], log_path: Path, timeout: float = 300.0) -> Server:
    """``roi-server`` on free ports (gRPC and metrics); returns once it logs that it listens.
    Its log goes to ``log_path``."""
    cmd = [*roi_server_command(), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *extra]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = LISTENING.search(text)
        if found:
            metrics = METRICS_ON.search(text)
            url = f"http://127.0.0.1:{metrics.group(1)}/metrics" if metrics else None
            return Server(f"127.0.0.1:{found.group(2)}", url, proc, log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"roi-server exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"roi-server did not start in {timeout:g} s; its log ({log_path}):\n{log_path.read_text()[-3000:]}")
