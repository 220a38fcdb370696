"""benchmarks/soak.py as a real command: a short soak against the roi-server it starts (JSON,
table and plot checked for consistency), and one against a server given by address whose
small queue refuses some of the load (the run must fail unless those refusals are allowed)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_support import ROOT, start_server_process

pytestmark = pytest.mark.slow

SOAK = ROOT / "benchmarks" / "soak.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_soak(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "soak.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--json", str(out), "--plot", str(tmp_path / "soak.png"), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path, check=False,
    )
    assert out.exists(), f"no JSON ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def test_short_soak_reports_windows_memory_and_plot(tmp_path):
    proc, doc = run_soak(tmp_path, "--minutes", "0.2", "--interval", "1", "--warmup", "3",
                         "--concurrency", "4", "--workload", "tiny", "--verify", "1",
                         "--sample-period", "0.25", "--server-args", "--device cpu --max-queue 16")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    windows, samples, summary, meta = doc["windows"], doc["samples"], doc["summary"], doc["meta"]
    assert meta["server_started_here"] and meta["concurrency"] == 4 and meta["workload"]["name"] == "tiny"
    assert meta["server"]["max_queue"] == 16
    assert meta["rss_source"].startswith("/proc/")

    # 12 s of 1 s windows, back to back, the first 3 s marked as warm-up.
    assert 9 <= len(windows) <= 13, len(windows)
    assert [w["index"] for w in windows] == list(range(len(windows)))
    for a, b in itertools.pairwise(windows):
        assert a["t_end"] <= b["t_start"] + 1e-6
    assert windows[0]["warmup"] and not windows[-1]["warmup"]
    assert all(w["t_start"] >= 3 for w in windows if not w["warmup"])
    for w in windows:
        assert w["errors"] == {} and w["ok"] == w["requests"] > 0
        assert w["throughput_rps"] > 0
        assert 0 < w["latency_ms"]["p50"] <= w["latency_ms"]["p99"] <= w["latency_ms"]["max"]
        assert w["verify"] == {"checked": 1, "mismatches": 0}
        # The server's CPU use inside the window (it has at most this host's cores).
        assert 0 < w["server_cores"] <= os.cpu_count() * 1.2
        assert w["requests_per_cpu_s"] == pytest.approx(w["throughput_rps"] / w["server_cores"])

    # The server's resident memory, about four times a second, and its own counts.
    assert len(samples) >= 30
    assert all(s["rss_bytes"] > 50e6 for s in samples)
    assert all(s["queue_depth"] is not None and 0 <= s["queue_depth"] <= 16 for s in samples)
    cpu = [s["cpu_seconds"] for s in samples]
    assert cpu == sorted(cpu) and cpu[-1] > cpu[0]
    assert summary["server_counted"] == {"OK": sum(w["ok"] for w in windows)}

    # The summary follows from the windows and samples.
    judged = [w for w in windows if not w["warmup"]]
    t = summary["throughput"]
    k = t["windows_averaged"]
    assert t["windows_judged"] == len(judged) and 1 <= k <= 3
    assert t["first_rps"] == pytest.approx(sum(w["throughput_rps"] for w in judged[:k]) / k)
    assert t["last_rps"] == pytest.approx(sum(w["throughput_rps"] for w in judged[-k:]) / k)
    assert t["drift_pct"] == pytest.approx(100 * (t["last_rps"] - t["first_rps"]) / t["first_rps"])
    first_eff = sum(w["requests_per_cpu_s"] for w in judged[:k]) / k
    assert t["first_per_cpu_s"] == pytest.approx(first_eff)
    assert t["drift_per_cpu_s_pct"] == pytest.approx(100 * (t["last_per_cpu_s"] - first_eff) / first_eff)
    rss = summary["rss"]
    judged_rss = [s["rss_bytes"] for s in samples if s["t"] >= judged[0]["t_start"]]
    assert rss["first_mb"] == pytest.approx(judged_rss[0] / 1e6)
    assert rss["last_mb"] == pytest.approx(judged_rss[-1] / 1e6)
    assert rss["max_mb"] == pytest.approx(max(judged_rss) / 1e6)
    assert rss["fitted_growth_mb"] == pytest.approx(rss["slope_mb_per_min"] * rss["span_min"])
    # A steady server: no growth anywhere near the limit in a few seconds.
    assert abs(rss["fitted_growth_mb"]) < 50
    assert summary["errors"] == {} and summary["problems"] == []

    # The table and the verdict on stdout, progress on stderr.
    assert "drift" in proc.stdout and "MB/min" in proc.stdout and "per server CPU-second" in proc.stdout
    assert "result: PASS" in proc.stdout
    assert proc.stdout.count("\n") >= len(windows) + 4
    assert "req/s" in proc.stderr and "(warm-up)" in proc.stderr

    png = tmp_path / "soak.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 400


def test_refusals_fail_the_soak_unless_allowed(tmp_path):
    # One request at a time, none waiting: eight in flight means refusals.
    srv = start_server_process(tmp_path, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                               "--device", "cpu", "--max-queue", "1", "--max-batch-requests", "1")
    try:
        common = ["--address", srv.address, "--metrics-url", srv.metrics_url, "--minutes", "0.05",
                  "--interval", "1", "--warmup", "1", "--concurrency", "8", "--sample-period", "0.25"]
        proc, doc = run_soak(tmp_path, *common)
        assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
        refused = doc["summary"]["errors"].get("RESOURCE_EXHAUSTED", 0)
        assert refused > 0 and set(doc["summary"]["errors"]) == {"RESOURCE_EXHAUSTED"}
        assert doc["summary"]["unexpected_errors"] == {"RESOURCE_EXHAUSTED": refused}
        assert f"errors: RESOURCE_EXHAUSTED {refused}" in proc.stdout and "result: FAIL" in proc.stdout
        # Not started here: the memory comes from the server's own metrics.
        assert not doc["meta"]["server_started_here"]
        assert doc["meta"]["rss_source"] == "process_resident_memory_bytes"
        assert all(s["rss_bytes"] > 50e6 for s in doc["samples"])
        # The server's counts cover the client's (it counts its own refusals).
        assert doc["summary"]["server_counted"]["RESOURCE_EXHAUSTED"] == refused

        proc, doc = run_soak(tmp_path, *common, "--allow-errors", "RESOURCE_EXHAUSTED")
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        assert doc["summary"]["errors"].get("RESOURCE_EXHAUSTED", 0) > 0
        assert doc["summary"]["problems"] == [] and "result: PASS" in proc.stdout
        assert srv.proc.poll() is None, "the soak stopped a server it did not start"
    finally:
        assert srv.stop() == 0
