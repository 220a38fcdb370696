"""The load tester's figures and labels, and the kernel benchmark's plot, on made-up records
(quick: no server). tests/test_loadtest.py runs the commands end to end."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from roi_client.loadtest import report
from roi_client.loadtest.stats import Records, summarize
from roi_client.loadtest.workload import make

from test_service_support import ROOT


def _records(ok: int, failed: int) -> Records:
    r = Records()
    for i in range(ok):
        r.add(start=i * 0.01, latency=0.02 + i * 1e-4, lag=0.0, code="OK", target="t", sent=1_000_000, received=500_000,
              boxes=8, timings={"queue_seconds": 1e-3, "compute_seconds": 2e-3, "total_seconds": 4e-3,
                                "batch_requests": 1, "batch_boxes": 8})  # fmt: skip
    for _ in range(failed):
        r.add(start=0.5, latency=1e-4, lag=0.0, code="UNAVAILABLE", target="t", sent=1_000_000, received=0, boxes=8)
    return r


def test_throughput_counts_successful_requests_only():
    s = summarize(_records(ok=10, failed=990), window_start=0.0, window_end=1.0, mode="closed", concurrency=4)
    assert s["ok"] == 10 and s["error_count"] == 990 and s["errors"] == {"UNAVAILABLE": 990}
    assert s["throughput_rps"] == pytest.approx(10.0)
    assert s["boxes_per_s"] == pytest.approx(80.0)
    # 10 requests of 1 MB sent and 0.5 MB received in 1 s; the 990 refusals are apart.
    assert s["sent_MBps"] == pytest.approx(10.0)
    assert s["received_MBps"] == pytest.approx(5.0)
    assert s["sent_bytes_per_request"] == pytest.approx(1e6)
    assert s["error_sent_bytes"] == pytest.approx(990e6)
    text = report.details(s)
    assert "errors (not in the figures above): UNAVAILABLE 990" in text


def test_labels_say_sent_and_received_alike():
    header = report.table([summarize(_records(5, 0), window_start=0, window_end=1, mode="closed", concurrency=1)])
    assert "sent MB/s" in header and "recv MB/s" in header
    assert "MB/s in" not in header and "MB/s out" not in header
    line = make("tiny").describe()
    assert "MB sent /" in line and "MB received per request" in line
    assert " MB in " not in line and " MB out" not in line


@pytest.mark.parametrize(
    "ms, text",
    [(0.4213, "0.421 ms"), (35.9, "35.9 ms"), (999.0, "999 ms"), (35_912.0, "35.9 s"), (150_000.0, "2.5 min"), (None, "-")],
)
def test_durations_are_written_readably(ms, text):
    assert report.duration(ms) == text


def test_histogram_legend_and_title_are_readable():
    s = summarize(_records(40, 3), window_start=0, window_end=1, mode="closed", concurrency=2)
    s["latency_ms"]["p50"], s["latency_ms"]["p99"] = 35_912.0, 61_000.0
    doc = {"meta": {"workload": {"name": "tiny", "dtype": "float32"}}, "runs": [s]}
    fig = report.figure(doc, [35_000.0 + i for i in range(40)])
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["p50 35.9 s", "p99 1.02 min"], legend
    assert "3 errors" in ax.get_title()


def test_kernel_benchmark_plot_has_a_title_and_value_labels():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [
        dict(workload="tiny", dtype="float32", speedup=12.5, ours_ms=0.02, torchvision_ms=0.25),
        dict(workload="fpn-det", dtype="float16", speedup=3.1, ours_ms=10.0, torchvision_ms=31.0),
        dict(workload="extra-rotated", dtype="float32", speedup=None, ours_ms=1.0, torchvision_ms=None),
    ]
    fig = module.speedup_figure(rows, "cpu", 2)
    ax = fig.axes[0]
    assert "torchvision" in ax.get_title() and "cpu" in ax.get_title() and "2 threads" in ax.get_title()
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["12.5x (0.02 vs 0.25 ms)", "3.1x (10.00 vs 31.00 ms)"], labels
