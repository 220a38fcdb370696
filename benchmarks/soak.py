"""Soak: a roi-server under steady closed-loop load for minutes, watched for drift and growth.

    python benchmarks/soak.py --minutes 3                   # starts its own roi-server
    python benchmarks/soak.py --minutes 30 --workload single-level --concurrency 16 --verify 2
    python benchmarks/soak.py --address host:50051 --metrics-url http://host:9100/metrics

The load is the load tester's closed loop (roi_client.loadtest), run as back-to-back windows
of --interval seconds. Each window records its throughput, errors by status code and latency
p50/p99; a sampler records the server's resident memory (/proc for a server this script
started, else the server's process_resident_memory_bytes), CPU time and queue depth about
once a second.

At the end, after the warm-up (--warmup seconds, not judged):
  - throughput drift: the mean of the last windows against the mean of the first ones (a
    quarter of the windows each, at most 3), and the least-squares slope; the same drift of
    requests per server CPU-second, which the server's share of a shared machine moves less;
  - errors, by code;
  - RSS: the first and last samples, and the least-squares slope in MB/min with the growth it
    fits over the judged span.
Large requests take minutes to reach a steady RSS: the kernels' output cache
(ROI_KERNELS_OUTPUT_CACHE_MB, 512 MB by default) and the allocator's pools fill first. With
single-level (7 MB requests) the server's RSS rose for about two minutes, then stayed level;
give such runs a warm-up of that length.

A table goes to stdout, progress to stderr, the figures to --json and a plot (throughput,
latency, RSS over time) to --plot. The exit status is 1 when an error other than the
--allow-errors codes occurred, when the fitted RSS growth exceeds --max-rss-growth-mb, when a
--verify check failed, or when the server this script started exited early or uncleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shlex
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from roi_client.loadtest import runner, stats
from roi_client.loadtest import workload as wl
from roi_client.loadtest.senders import open_senders
from server_process import Server, start_server

OUT = Path(__file__).resolve().parent / "out"
MB = 1e6


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The server


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics: {sample name with its labels as Prometheus writes them: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def codes_counted(metrics: dict[str, float]) -> dict[str, float]:
    """roi_requests_total by status code, summed over ops."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        m = re.fullmatch(r'roi_requests_total\{(.*)\}', key)
        if m:
            code = re.search(r'code="([^"]*)"', m.group(1))
            if code:
                out[code.group(1)] = out.get(code.group(1), 0.0) + value
    return out


def proc_rss(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Sampler:
    """The server's RSS, CPU seconds, queue depth and in-flight requests, every ``period`` s,
    on a thread (a blocking scrape does not stall the load's event loop)."""

    server: Server
    t0: float
    period: float = 1.0
    samples: list = field(default_factory=list)
    rss_source: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def take(self) -> dict:
        s = {"t": time.perf_counter() - self.t0, "rss_bytes": None, "cpu_seconds": None, "queue_depth": None,
             "in_flight": None}
        metrics = {}
        if self.server.metrics_url:
            try:
                metrics = scrape(self.server.metrics_url)
            except OSError:
                metrics = {}
        if self.server.pid is not None:
            s["rss_bytes"] = proc_rss(self.server.pid)
            self.rss_source = self.rss_source or "/proc/<pid>/status VmRSS"
        if s["rss_bytes"] is None and "process_resident_memory_bytes" in metrics:
            s["rss_bytes"] = metrics["process_resident_memory_bytes"]
            self.rss_source = self.rss_source or "process_resident_memory_bytes"
        s["cpu_seconds"] = metrics.get("process_cpu_seconds_total")
        s["queue_depth"] = metrics.get("roi_queue_depth")
        s["in_flight"] = metrics.get("roi_requests_in_flight")
        self.samples.append(s)
        return s

    def start(self) -> Sampler:
        self.take()
        self._thread = threading.Thread(target=self._run, daemon=True, name="soak-sampler")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.take()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.take()


# ---------------------------------------------------------------------------------------------
# The load


def workload(args) -> wl.Workload:
    base = wl.make(args.workload, args.dtype, seed=args.seed)
    return wl.customize(base, boxes=args.boxes, seed=args.seed) if args.boxes else base


async def soak(args, server: Server, work: wl.Workload, windows: list, sampler: Sampler) -> dict:
    """Back-to-back closed-loop windows until --minutes have passed; appends each window's
    figures to ``windows`` (so that an interrupted run keeps what it measured)."""
    senders, servers, close = await open_senders([server.address], work, timeout=args.timeout)
    total = args.minutes * 60.0
    want = None
    if args.verify:
        from roi_client.loadtest import verify

        want = verify.expected(work)
    try:
        while True:
            start = time.perf_counter() - sampler.t0
            if start >= total - 1e-6:
                break
            if not server.alive():
                say(f"soak: the server exited with {server.proc.returncode}")
                break
            duration = min(args.interval, total - start)
            plan = runner.Plan(warmup_s=0.0, duration_s=duration)
            res = await runner.closed_loop(senders, args.concurrency, plan, verify=args.verify)
            s = stats.summarize(res.records, window_start=res.window_start, window_end=res.window_end,
                                mode="closed", concurrency=args.concurrency)
            lat = s["latency_ms"] or {}
            w = {
                "index": len(windows),
                "t_start": res.window_start - sampler.t0,
                "t_end": res.window_end - sampler.t0,
                "requests": s["requests"],
                "ok": s["ok"],
                "errors": s["errors"],
                "throughput_rps": s["throughput_rps"],
                "latency_ms": {k: lat.get(k) for k in ("p50", "p99", "max")},
                "warmup": start < args.warmup,
            }
            if want is not None:
                w["verify"] = _check(want, res.samples)
            last = sampler.samples[-1] if sampler.samples else {}
            w["rss_bytes"] = last.get("rss_bytes")
            windows.append(w)
            rss = f"{w['rss_bytes'] / MB:.1f} MB" if w["rss_bytes"] else "-"
            errs = sum(w["errors"].values())
            say(f"[{w['t_end']:6.0f}/{total:.0f} s] {w['throughput_rps']:8.1f} req/s  {errs} errors  "
                f"p50 {_ms(lat.get('p50'))}  p99 {_ms(lat.get('p99'))} ms  RSS {rss}"
                + ("  (warm-up)" if w["warmup"] else ""))
    finally:
        await close()
    return servers[0] if servers else {}


def _check(want: np.ndarray, samples: list) -> dict:
    """Sampled outputs against the in-process result, bit for bit."""
    bad = 0
    for _, got in samples:
        got = np.ascontiguousarray(got)
        if got.shape != want.shape or got.dtype != want.dtype or got.tobytes() != want.tobytes():
            bad += 1
    return {"checked": len(samples), "mismatches": bad}


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3g}"


# ---------------------------------------------------------------------------------------------
# Figures


def fit_line(t_s: list[float], y: list[float]) -> tuple[float, float] | None:
    """Least-squares line through (t, y): (slope per minute, value at the first t)."""
    if len(t_s) < 2 or max(t_s) - min(t_s) <= 0:
        return None
    t_min = (np.asarray(t_s, dtype=np.float64) - t_s[0]) / 60.0
    slope, intercept = np.polyfit(t_min, np.asarray(y, dtype=np.float64), 1)
    return float(slope), float(intercept)


def add_server_cpu(windows: list, samples: list) -> None:
    """Each window's server CPU use (cores) and requests per server CPU-second, from the CPU
    time sampled inside it. On a shared machine the server's share of the CPU moves the raw
    throughput; requests per CPU-second move far less."""
    valid = [s for s in samples if s["cpu_seconds"] is not None]
    for w in windows:
        # The samples inside the window and the nearest one on either side of it: a scrape
        # can take longer than the sampling period on a busy machine, and a short window
        # may then hold fewer than two samples of its own.
        before = [s for s in valid if s["t"] < w["t_start"]][-1:]
        inside = [s for s in valid if w["t_start"] <= s["t"] <= w["t_end"]]
        after = [s for s in valid if s["t"] > w["t_end"]][:1]
        span = before + inside + after
        w["server_cores"] = w["requests_per_cpu_s"] = None
        if len(span) >= 2 and span[-1]["t"] > span[0]["t"]:
            a, b = span[0], span[-1]
            cores = (b["cpu_seconds"] - a["cpu_seconds"]) / (b["t"] - a["t"])
            w["server_cores"] = cores
            w["requests_per_cpu_s"] = w["throughput_rps"] / cores if cores > 0 else None


def _first_last(values: list, k: int) -> tuple[float | None, float | None, float | None]:
    """Means of the first and last ``k`` values, and the drift between them in percent."""
    if not values or any(v is None for v in values[:k] + values[-k:]):
        return None, None, None
    first, last = float(np.mean(values[:k])), float(np.mean(values[-k:]))
    return first, last, (100.0 * (last - first) / first if first else None)


def summarize_soak(args, windows: list, samples: list) -> dict:
    add_server_cpu(windows, samples)
    judged = [w for w in windows if not w["warmup"]]
    if not judged:  # a run shorter than its warm-up: judge what there is
        judged = list(windows)
    k = min(3, max(1, len(judged) // 4))
    first = [w["throughput_rps"] for w in judged[:k]]
    last = [w["throughput_rps"] for w in judged[-k:]]
    tput = {
        "windows_judged": len(judged),
        "windows_averaged": k,
        "first_rps": float(np.mean(first)) if first else None,
        "last_rps": float(np.mean(last)) if last else None,
        "mean_rps": float(np.mean([w["throughput_rps"] for w in judged])) if judged else None,
        "min_rps": min((w["throughput_rps"] for w in judged), default=None),
        "max_rps": max((w["throughput_rps"] for w in judged), default=None),
    }
    tput["drift_pct"] = (100.0 * (tput["last_rps"] - tput["first_rps"]) / tput["first_rps"]
                         if first and tput["first_rps"] else None)
    mids = [(w["t_start"] + w["t_end"]) / 2 for w in judged]
    fit = fit_line(mids, [w["throughput_rps"] for w in judged])
    mean = tput["mean_rps"]
    tput["slope_pct_per_min"] = 100.0 * fit[0] / mean if fit is not None and mean else None
    first_eff, last_eff, drift_eff = _first_last([w["requests_per_cpu_s"] for w in judged], k)
    tput.update(first_per_cpu_s=first_eff, last_per_cpu_s=last_eff, drift_per_cpu_s_pct=drift_eff)

    errors: dict[str, int] = {}
    for w in windows:
        for code, n in w["errors"].items():
            errors[code] = errors.get(code, 0) + n
    allowed = {c.strip().upper() for c in args.allow_errors.split(",") if c.strip()}
    unexpected = {c: n for c, n in errors.items() if c not in allowed}

    start = judged[0]["t_start"] if judged else 0.0
    rss_pts = [(s["t"], s["rss_bytes"]) for s in samples if s["rss_bytes"] is not None and s["t"] >= start]
    rss = {"samples": len(rss_pts)}
    if rss_pts:
        t, y = zip(*rss_pts)
        fit = fit_line(list(t), [v / MB for v in y])
        span_min = (t[-1] - t[0]) / 60.0
        rss.update(first_mb=y[0] / MB, last_mb=y[-1] / MB, max_mb=max(y) / MB, growth_mb=(y[-1] - y[0]) / MB,
                   t_first_s=t[0], span_min=span_min, slope_mb_per_min=None if fit is None else fit[0],
                   fit_first_mb=None if fit is None else fit[1],
                   fitted_growth_mb=None if fit is None else fit[0] * span_min)
    verified = [w["verify"] for w in windows if "verify" in w]
    ver = {"checked": sum(v["checked"] for v in verified),
           "mismatches": sum(v["mismatches"] for v in verified)}

    problems = []
    if unexpected:
        problems.append("errors: " + ", ".join(f"{c} {n}" for c, n in sorted(unexpected.items())))
    fitted = rss.get("fitted_growth_mb")
    if fitted is not None and fitted > args.max_rss_growth_mb:
        problems.append(f"RSS grew {fitted:.1f} MB (fitted) > --max-rss-growth-mb {args.max_rss_growth_mb:g}")
    if ver["mismatches"]:
        problems.append(f"{ver['mismatches']} of {ver['checked']} verified responses differ")
    return {"throughput": tput, "errors": errors, "unexpected_errors": unexpected, "rss": rss,
            "verify": ver if args.verify else None, "problems": problems}


def table(windows: list) -> str:
    header = ["window", "t s", "req/s", "ok", "errors", "p50 ms", "p99 ms", "server cores", "req/CPU-s",
              "RSS MB"]
    rows = [header]
    for w in windows:
        errs = sum(w["errors"].values())
        rows.append([
            f"{w['index']}{'*' if w['warmup'] else ''}", f"{w['t_end']:.0f}", f"{w['throughput_rps']:.1f}",
            str(w["ok"]), str(errs), _ms(w["latency_ms"]["p50"]), _ms(w["latency_ms"]["p99"]),
            _ms(w.get("server_cores")),
            "-" if w.get("requests_per_cpu_s") is None else f"{w['requests_per_cpu_s']:.0f}",
            "-" if w["rss_bytes"] is None else f"{w['rss_bytes'] / MB:.1f}",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(n) for c, n in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * n for n in widths))
    return "\n".join(lines)


def report_lines(args, summary: dict, rss_source: str | None) -> list[str]:
    t = summary["throughput"]
    out = []
    if t["first_rps"] is not None:
        slope = t["slope_pct_per_min"]
        out.append(
            f"throughput: first {t['first_rps']:.1f} req/s, last {t['last_rps']:.1f} req/s (means of "
            f"{t['windows_averaged']} of {t['windows_judged']} windows after the {args.warmup:g} s warm-up): "
            f"drift {t['drift_pct']:+.1f} %; slope {'-' if slope is None else f'{slope:+.2f}'} %/min; "
            f"range {t['min_rps']:.1f}-{t['max_rps']:.1f}")
    if t.get("drift_per_cpu_s_pct") is not None:
        out.append(
            f"requests per server CPU-second: first {t['first_per_cpu_s']:.0f}, "
            f"last {t['last_per_cpu_s']:.0f}: "
            f"drift {t['drift_per_cpu_s_pct']:+.1f} % (the server's share of a shared CPU left out)")
    errs = summary["errors"]
    out.append("errors: " + (", ".join(f"{c} {n}" for c, n in sorted(errs.items())) if errs else "none"))
    r = summary["rss"]
    if r.get("samples"):
        slope = r["slope_mb_per_min"]
        fitted = r["fitted_growth_mb"]
        out.append(
            f"server RSS ({rss_source}): first {r['first_mb']:.1f} MB, last {r['last_mb']:.1f} MB, max "
            f"{r['max_mb']:.1f} MB after the warm-up; slope {'-' if slope is None else f'{slope:+.3f}'} "
            f"MB/min "
            f"(fitted growth {'-' if fitted is None else f'{fitted:+.1f}'} MB over {r['span_min']:.2f} min; "
            f"limit {args.max_rss_growth_mb:g} MB)")
    else:
        out.append("server RSS: not available (no pid and no process_resident_memory_bytes in its metrics)")
    if summary.get("server_counted") is not None:
        counted = summary["server_counted"]
        listed = ", ".join(f"{c} {n}" for c, n in sorted(counted.items()))
        out.append("server counted: " + (listed or "nothing"))
    if summary["verify"] is not None:
        v = summary["verify"]
        out.append(f"verify: {v['checked']} sampled responses checked bit for bit, {v['mismatches']} differ")
    problems = summary["problems"]
    out.append("result: " + ("FAIL (" + "; ".join(problems) + ")" if problems else "PASS"))
    return out


def plot(path: Path, doc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows, samples, meta = doc["windows"], doc["samples"], doc["meta"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), dpi=110, sharex=True)
    mid = [(w["t_start"] + w["t_end"]) / 120 for w in windows]
    ax = axes[0]
    ax.plot(mid, [w["throughput_rps"] for w in windows], "o-", ms=3, label="throughput")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    cores = [w.get("server_cores") for w in windows]
    if any(c is not None for c in cores):
        twin = ax.twinx()
        twin.plot(mid, [math.nan if c is None else c for c in cores], "s--", ms=2, lw=1, color="grey",
                  label="server CPU (cores)")
        twin.set_ylabel("server CPU (cores)")
        twin.set_ylim(bottom=0)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [x.get_label() for x in lines], loc="lower right", fontsize=8)
    ax = axes[1]
    for key, style in (("p50", "o-"), ("p99", "^-")):
        values = [w["latency_ms"][key] for w in windows]
        ax.plot(mid, [math.nan if v is None else v for v in values], style, ms=3, label=key)
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    pts = [(s["t"] / 60, s["rss_bytes"] / MB) for s in samples if s["rss_bytes"] is not None]
    if pts:
        t, y = zip(*pts)
        ax.plot(t, y, "-", lw=1, label="server RSS")
        r = doc["summary"]["rss"]
        if r.get("slope_mb_per_min") is not None:
            t0 = r["t_first_s"] / 60
            ax.plot([t0, t0 + r["span_min"]], [r["fit_first_mb"], r["fit_first_mb"] + r["fitted_growth_mb"]],
                    "--", lw=1, label=f"least squares {r['slope_mb_per_min']:+.2f} MB/min")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylabel("RSS (MB)")
    ax.set_xlabel("minutes")
    warm = [w for w in windows if w["warmup"]]
    for a in axes:
        a.grid(True, alpha=0.3)
        if warm:
            a.axvspan(0, warm[-1]["t_end"] / 60, color="grey", alpha=0.15, lw=0)
    w = meta["workload"]
    fig.suptitle(f"soak: {w['name']} {w['dtype']}, closed loop c={meta['concurrency']}, "
                 f"{meta['minutes']:g} min (grey: warm-up)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--minutes", type=float, default=3.0, help="length of the load (default 3)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds per recorded window (default 10)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds at the start left out of the drift and growth figures "
                        "(default: a sixth of the run, at most 60)")
    p.add_argument("--concurrency", "-c", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--workload", default="tiny", choices=wl.NAMES, help="standard workload (default tiny)")
    p.add_argument("--dtype", default="float32", choices=sorted(wl.DTYPES))
    p.add_argument("--boxes", type=int, help="replace the workload's box count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline in seconds (default 60)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="check N sampled responses per window bit for bit against the in-process kernels "
                        "(needs torch)")
    p.add_argument("--allow-errors", default="", metavar="CODES",
                   help="status codes that do not fail the run, e.g. RESOURCE_EXHAUSTED (default: none)")
    p.add_argument("--max-rss-growth-mb", type=float, default=50.0,
                   help="fail when the server's RSS grows more than this over the judged span (least-squares "
                        "fit; default 50)")
    target = p.add_argument_group("server (default: start one)")
    target.add_argument("--address", help="an existing server's host:port instead of starting one")
    target.add_argument("--metrics-url", help="its /metrics URL (RSS, CPU and queue depth come from there)")
    target.add_argument("--server-args", default="",
                        help="extra roi-server flags for the started server, "
                             "e.g. '--device cpu --max-queue 64'")
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, default=OUT / "soak.json", help="default benchmarks/out/soak.json")
    out.add_argument("--plot", type=Path, default=OUT / "soak.png", help="default benchmarks/out/soak.png")
    out.add_argument("--sample-period", type=float, default=1.0,
                     help="seconds between server samples (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.concurrency < 1:
        print("soak: --minutes, --interval and --concurrency must be positive", file=sys.stderr)
        return 2
    if args.warmup is None:
        args.warmup = min(60.0, args.minutes * 60 / 6)
    try:
        work = workload(args)
    except ValueError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2

    if args.address:
        server = Server(args.address, args.metrics_url)
    else:
        log_path = args.json.with_name(args.json.stem + "-server.log")
        server = start_server(shlex.split(args.server_args), log_path)
        say(f"soak: roi-server pid {server.pid} on {server.address}, log {log_path}")
    say(f"soak: {work.describe()}; closed loop c={args.concurrency} for {args.minutes:g} min, "
        f"windows of {args.interval:g} s, warm-up {args.warmup:g} s")

    started = time.time()
    sampler = Sampler(server, time.perf_counter(), args.sample_period)
    before = scrape(server.metrics_url) if server.metrics_url else {}
    sampler.start()
    windows: list = []
    info: dict = {}
    interrupted = False
    try:
        info = asyncio.run(soak(args, server, work, windows, sampler))
    except KeyboardInterrupt:
        interrupted = True
        say("soak: interrupted; reporting the windows so far")
    finally:
        sampler.stop()
        after = scrape(server.metrics_url) if server.metrics_url and server.alive() else {}
        died = not server.alive()
        exit_code = server.stop()

    summary = summarize_soak(args, windows, sampler.samples)
    if after:
        b = codes_counted(before)
        counted = {c: int(v - b.get(c, 0.0)) for c, v in codes_counted(after).items() if v - b.get(c, 0.0)}
        summary["server_counted"] = counted
        sent = {"OK": sum(w["ok"] for w in windows), **summary["errors"]}
        # A server of its own saw only this client: its counts must be the client's.
        if server.proc is not None and counted.get("OK", 0) != sent["OK"]:
            summary["problems"].append(
                f"the server counted {counted.get('OK', 0)} OK answers, the client {sent['OK']}")
    if died:
        summary["problems"].append(f"the server exited during the run ({server.proc.returncode})")
    elif exit_code not in (None, 0):
        summary["problems"].append(f"the server exited with {exit_code} after SIGTERM")
    if not windows:
        summary["problems"].append("no window was measured")

    doc = {
        "meta": {
            "tool": "benchmarks/soak.py",
            "command": ["python", "benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])],
            "started": started,
            "host": {"cpus": os.cpu_count(), "platform": platform.platform(),
                     "python": platform.python_version()},
            "server": info,
            "server_started_here": server.proc is not None,
            "server_args": args.server_args,
            "workload": {"name": work.name, "op": work.op, "dtype": work.dtype, "boxes": work.num_boxes,
                         "request_payload_bytes": work.input_bytes(),
                         "response_payload_bytes": work.output_bytes()},
            "concurrency": args.concurrency,
            "minutes": args.minutes,
            "interval_s": args.interval,
            "warmup_s": args.warmup,
            "rss_source": sampler.rss_source,
            "interrupted": interrupted,
        },
        "windows": windows,
        "samples": sampler.samples,
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if windows:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(args.plot, doc)

    print(f"soak: {work.describe()}")
    print(f"closed loop c={args.concurrency}, {args.minutes:g} min in {args.interval:g} s windows "
          f"(* = warm-up, {args.warmup:g} s); {os.cpu_count()} CPU cores on this host")
    print(table(windows))
    for line in report_lines(args, summary, sampler.rss_source):
        print(line)
    print(f"json: {args.json}" + (f"; plot: {args.plot}" if windows else ""))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
