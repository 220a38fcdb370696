"""The summary table, the JSON document and the PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def duration(ms) -> str:
    """A time given in milliseconds, written readably: ``0.42 ms``, ``35.9 ms``, ``35.9 s``,
    ``2.5 min``."""
    if ms is None or (isinstance(ms, float) and not math.isfinite(ms)):
        return "-"
    if abs(ms) >= 60_000:
        return f"{ms / 60_000:.3g} min"
    if abs(ms) >= 1000:
        return f"{ms / 1000:.3g} s"
    return f"{ms:.3g} ms"


def _get(d, *path):
    for p in path:
        if d is None:
            return None
        d = d.get(p)
    return d


COLUMNS = [
    # (header, getter)
    ("conc", lambda s: s["concurrency"] if s["mode"] == "closed" else None),
    ("rate/s", lambda s: s["rate"]),
    ("req", lambda s: s["requests"]),
    ("err", lambda s: s["error_count"]),
    ("req/s", lambda s: s["throughput_rps"]),
    ("boxes/s", lambda s: s["boxes_per_s"]),
    # Bytes on the wire, as the client counts them: sent (requests) and received (responses).
    ("sent MB/s", lambda s: s["sent_MBps"]),
    ("recv MB/s", lambda s: s["received_MBps"]),
    ("p50 ms", lambda s: _get(s, "latency_ms", "p50")),
    ("p90", lambda s: _get(s, "latency_ms", "p90")),
    ("p95", lambda s: _get(s, "latency_ms", "p95")),
    ("p99", lambda s: _get(s, "latency_ms", "p99")),
    ("max", lambda s: _get(s, "latency_ms", "max")),
    ("queue p50", lambda s: _get(s, "server", "queue_ms", "p50")),
    ("compute p50", lambda s: _get(s, "server", "compute_ms", "p50")),
    ("outside p50", lambda s: _get(s, "server", "outside_server_ms", "p50")),
    ("batch req", lambda s: _get(s, "server", "batch_requests", "mean")),
    ("batch boxes", lambda s: _get(s, "server", "batch_boxes", "mean")),
]


def table(summaries: list[dict]) -> str:
    """One row per run (per sweep step)."""
    open_mode = any(s["mode"] == "open" for s in summaries)
    cols = [c for c in COLUMNS if not (c[0] == "conc" and open_mode) and not (c[0] == "rate/s" and not open_mode)]
    rows = [[h for h, _ in cols]]
    for s in summaries:
        rows.append([_f(g(s)) if not isinstance(g(s), int) else str(g(s)) for _, g in cols])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def details(s: dict) -> str:
    """The lines under the table: errors by code, the server-side split, the generator."""
    out = []
    if s["errors"]:
        out.append(
            "errors (not in the figures above): "
            + ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items()))
            + f"; {s.get('error_sent_bytes', 0) / 1e6:,.1f} MB sent for them"
        )
    lat = s.get("latency_ms")
    if lat:
        out.append(
            "latency ms: "
            + " ".join(f"{k} {_f(lat[k])}" for k in ("min", "mean", "p50", "p90", "p95", "p99", "max"))
        )
    srv = s.get("server") or {}
    for key, label in (("queue_ms", "server queue ms"), ("compute_ms", "server compute ms"),
                       ("total_ms", "server total ms"), ("outside_server_ms", "outside server ms"),
                       ("batch_requests", "batch requests"), ("batch_boxes", "batch boxes")):
        v = srv.get(key)
        if v:
            out.append(f"{label}: mean {_f(v['mean'])} p50 {_f(v['p50'])} p99 {_f(v['p99'])} max {_f(v['max'])}")
    gen = s.get("generator")
    if gen:
        lag = gen.get("send_lag_ms") or {}
        state = "kept up" if gen["kept_up"] else f"COULD NOT KEEP UP ({gen['note']})"
        out.append(
            f"generator: asked {gen['asked_rate']:g}/s, sent {gen['sent_rate']:.1f}/s, "
            f"send lag p50 {_f(lag.get('p50'))} p99 {_f(lag.get('p99'))} ms: {state}"
        )
    ver = s.get("verify")
    if ver:
        out.append(
            f"verify: {ver['checked']} responses checked, {ver['mismatches']} mismatched, "
            f"max abs error {_f(ver['max_abs_error'])}"
        )
    return "\n".join(out)


def write_json(path: str | Path, document: dict) -> None:
    Path(path).write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def plot(path: str | Path, document: dict, latencies_ms=None) -> None:
    """A latency-throughput curve for a sweep; a latency histogram for a single run (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(document, latencies_ms)
    fig.savefig(path)
    plt.close(fig)


def figure(document: dict, latencies_ms=None):
    """The matplotlib Figure that :func:`plot` writes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("--plot needs matplotlib: pip install 'roi-service[loadtest]'") from exc

    meta = document["meta"]
    runs = document["runs"]
    title = f"{meta['workload']['name']} {meta['workload']['dtype']}"
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    if len(runs) > 1:
        xs = [r["throughput_rps"] for r in runs]
        for key, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^-")):
            ys = [_get(r, "latency_ms", key) for r in runs]
            ax.plot(xs, [math.nan if y is None else y for y in ys], style, label=key)
        for r in runs:
            label = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate']:g}/s"
            y = _get(r, "latency_ms", "p50")
            if y is not None:
                ax.annotate(label, (r["throughput_rps"], y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        kind = "closed-loop" if runs[0]["mode"] == "closed" else "open-loop"
        ax.set_title(f"{title}, {kind} sweep: latency vs throughput")
        ax.legend()
    else:
        import numpy as np

        lat = np.asarray(latencies_ms if latencies_ms is not None else [], dtype=float)
        lat = lat[np.isfinite(lat)]
        if lat.size:
            lo, hi = max(lat.min(), 1e-3), max(lat.max(), 1e-3)
            bins = np.geomspace(lo, hi * 1.0001, 60) if hi / lo > 20 else 60
            ax.hist(lat, bins=bins, color="#4878a8")
            if hi / lo > 20:
                ax.set_xscale("log")
            stats = runs[0].get("latency_ms") or {}
            for key, color in (("p50", "green"), ("p99", "red")):
                if key in stats:
                    ax.axvline(stats[key], color=color, linestyle="--", label=f"{key} {duration(stats[key])}")
            ax.legend()
        r = runs[0]
        load = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate']:g}/s"
        kind = "closed loop" if r["mode"] == "closed" else "open loop"
        errors = f", {r['error_count']} errors" if r["error_count"] else ""
        ax.set_title(f"{title}, {kind} {load}: {r['throughput_rps']:.1f} req/s{errors}")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _load_label(s: dict) -> str:
    return f"c={s['concurrency']}" if s["mode"] == "closed" else f"rate {s['rate']:g}/s"
