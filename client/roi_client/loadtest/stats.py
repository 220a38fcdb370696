"""Per-request records of a load run and their summary (the figures of the table and the JSON)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)
# A send later than this after its scheduled time means the generator, not the server, set the pace.
LAG_LIMIT_MS = 10.0


@dataclass
class Records:
    """One entry per measured request, in completion order. Times in seconds.

    ``start`` is when the request was due: the send time in closed loop, the scheduled
    arrival in open loop (latency counts from there, so a late sender cannot hide queueing).
    ``lag`` is how late the generator actually sent it (0 in closed loop).
    """

    start: list = field(default_factory=list)
    latency: list = field(default_factory=list)
    lag: list = field(default_factory=list)
    code: list = field(default_factory=list)  # "OK" or a grpc status name
    target: list = field(default_factory=list)
    sent_bytes: list = field(default_factory=list)
    received_bytes: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    # Server-side split, NaN where the response carried none (errors).
    queue: list = field(default_factory=list)
    compute: list = field(default_factory=list)
    server_total: list = field(default_factory=list)
    batch_requests: list = field(default_factory=list)
    batch_boxes: list = field(default_factory=list)

    def add(self, *, start, latency, lag, code, target, sent, received, boxes, timings=None) -> None:
        self.start.append(start)
        self.latency.append(latency)
        self.lag.append(lag)
        self.code.append(code)
        self.target.append(target)
        self.sent_bytes.append(sent)
        self.received_bytes.append(received)
        self.boxes.append(boxes)
        t = timings or {}
        nan = math.nan
        self.queue.append(t.get("queue_seconds", nan))
        self.compute.append(t.get("compute_seconds", nan))
        self.server_total.append(t.get("total_seconds", nan))
        self.batch_requests.append(t.get("batch_requests", nan))
        self.batch_boxes.append(t.get("batch_boxes", nan))

    def extend(self, other: Records) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def __len__(self) -> int:
        return len(self.latency)

    def to_dict(self) -> dict:
        return {name: list(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> Records:
        return cls(**{name: list(d[name]) for name in cls.__dataclass_fields__})


def percentile_stats(values, scale: float = 1.0, with_mean: bool = True) -> dict | None:
    """min, mean, p50/p90/p95/p99, max of the finite values (nearest rank: each figure is an
    observed value, so they are ordered and never interpolated past the data)."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return None
    a = np.sort(a) * scale
    out = {"min": float(a[0])}
    if with_mean:
        out["mean"] = float(a.mean())
    for p in PERCENTILES:
        # nearest rank: the smallest value with at least p% of the values at or below it
        out[f"p{p}"] = float(a[max(math.ceil(p / 100 * a.size), 1) - 1])
    out["max"] = float(a[-1])
    return out


def summarize(
    records: Records,
    *,
    window_start: float,
    window_end: float,
    mode: str,
    concurrency: int | None = None,
    rate: float | None = None,
    max_inflight_hits: int = 0,
) -> dict:
    """The figures of one run (one step of a sweep).

    Throughput divides the measured requests by the measurement span: from the start of the
    window (warm-up excluded) to the last measured response, so every counted request's whole
    latency lies inside the span. Requests/s, boxes/s and MB/s count the successful requests
    only: a refusal costs the server little and sends back nothing, and counting it would
    show a server that refuses everything at once as a fast one (a draining server's
    UNAVAILABLE answers read as 7,918 MB/s). Failed requests are apart: their count by status
    code, and the bytes they sent (``error_sent_bytes``).
    """
    n = len(records)
    codes = np.asarray(records.code, dtype=object)
    ok_mask = codes == "OK"
    ok = int(ok_mask.sum())
    errors: dict[str, int] = {}
    for c in codes[~ok_mask]:
        errors[str(c)] = errors.get(str(c), 0) + 1
    span = max(window_end - window_start, 1e-9)
    lat = np.asarray(records.latency, dtype=np.float64)
    sent_all = np.asarray(records.sent_bytes, dtype=np.float64)
    received_all = np.asarray(records.received_bytes, dtype=np.float64)
    sent = float(np.sum(sent_all[ok_mask])) if n else 0.0
    received = float(np.sum(received_all[ok_mask])) if n else 0.0
    error_sent = float(np.sum(sent_all[~ok_mask])) if n else 0.0
    boxes_ok = float(np.sum(np.asarray(records.boxes, dtype=np.float64)[ok_mask])) if n else 0.0

    queue = np.asarray(records.queue, dtype=np.float64)
    compute = np.asarray(records.compute, dtype=np.float64)
    server_total = np.asarray(records.server_total, dtype=np.float64)
    # What neither the batcher nor the kernel accounts for: (de)serialisation, the wire, gRPC
    # and the client's own event loop.
    outside = lat - server_total if n else lat

    summary = {
        "mode": mode,
        "concurrency": concurrency,
        "rate": rate,
        "span_s": span,
        "requests": n,
        "ok": ok,
        "errors": errors,
        "error_count": n - ok,
        "throughput_rps": ok / span,
        "boxes_per_s": boxes_ok / span,
        "sent_MBps": sent / span / 1e6,
        "received_MBps": received / span / 1e6,
        "error_sent_bytes": error_sent,
        "sent_bytes_per_request": sent / ok if ok else 0.0,
        "received_bytes_per_request": received / ok if ok else 0.0,
        "latency_ms": percentile_stats(lat[ok_mask], 1e3) if ok else None,
        "server": {
            "queue_ms": percentile_stats(queue[ok_mask], 1e3) if ok else None,
            "compute_ms": percentile_stats(compute[ok_mask], 1e3) if ok else None,
            "total_ms": percentile_stats(server_total[ok_mask], 1e3) if ok else None,
            "outside_server_ms": percentile_stats(outside[ok_mask], 1e3) if ok else None,
            "batch_requests": percentile_stats(np.asarray(records.batch_requests, np.float64)[ok_mask]) if ok else None,
            "batch_boxes": percentile_stats(np.asarray(records.batch_boxes, np.float64)[ok_mask]) if ok else None,
        },
    }
    if mode == "open":
        lag = np.asarray(records.lag, dtype=np.float64)
        sends = np.asarray(records.start, dtype=np.float64) + lag
        send_span = float(sends.max() - sends.min()) if n > 1 else 0.0
        sent_rate = (n - 1) / send_span if send_span > 0 else float(n)
        lag_stats = percentile_stats(lag, 1e3)
        # The generator kept up when it sent at the asked rate and on time; otherwise the
        # figures describe the client's limits as much as the server's. (Below a few hundred
        # arrivals a Poisson count is too noisy to judge the rate by.)
        behind = []
        if rate and n >= 200 and sent_rate < 0.9 * rate:
            behind.append(f"sent {sent_rate:.1f}/s of the asked {rate:g}/s")
        if lag_stats and lag_stats["p99"] > LAG_LIMIT_MS:
            behind.append(f"p99 send lag {lag_stats['p99']:.1f} ms")
        if max_inflight_hits:
            behind.append(f"{max_inflight_hits} sends waited for the in-flight cap")
        summary["generator"] = {
            "asked_rate": rate,
            "sent_rate": sent_rate,
            "send_lag_ms": lag_stats,
            "max_inflight_hits": max_inflight_hits,
            "kept_up": not behind,
            "note": "; ".join(behind),
        }
    return summary
