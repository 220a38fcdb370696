"""The ``roi-loadtest`` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time

from ..errors import RoIError
from ..memory import reuse_freed_memory
from . import report, runner, verify, workload as wl
from .stats import summarize

EPILOG = """\
examples:
  roi-loadtest localhost:50051 --workload tiny --concurrency 32 --duration 10
  roi-loadtest localhost:50051 --workload fpn-det --dtype float16 --rate 5 --duration 30
  roi-loadtest localhost:50051 --workload single-level --sweep-concurrency 1,2,4,8,16,32 --plot curve.png
  roi-loadtest host-a:50051 host-b:50051 --op roi_pool --boxes 256 --map 256x50x68 --rate 200
  roi-loadtest localhost:50051 --workload tiny --requests 2000 --json out.json --verify
  roi-loadtest localhost:50051 --workload fpn-det --shared-memory --concurrency 4

Latency is measured from the moment a request was due: its send in closed loop, its scheduled
arrival in open loop (so a generator that falls behind cannot hide the server's queueing). The
warm-up is run but not recorded.
"""


def _int_list(text: str) -> list[float]:
    """"1,2,4,8" or "1:64" (powers of two from 1 to 64) or "10:100:10" (a range)."""
    if ":" in text:
        parts = [float(p) for p in text.split(":")]
        if len(parts) == 2:
            lo, hi = parts
            out, v = [], lo
            while v <= hi * (1 + 1e-9):
                out.append(v)
                v *= 2
            return out
        lo, hi, step = parts
        out, v = [], lo
        while v <= hi * (1 + 1e-9):
            out.append(v)
            v += step
        return out
    return [float(p) for p in text.split(",") if p]


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.lower().replace(",", "x").split("x"))


def _scale(text: str) -> float:
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="roi-loadtest",
        description="Drive a running roi-server with a standard or custom workload and report "
        "throughput, latency percentiles, errors and the server-side split.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("targets", nargs="*", default=["localhost:50051"],
                   help="server addresses host:port (default localhost:50051); requests go to them in turn")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="tiny", choices=wl.NAMES, help="standard workload (docs/WORKLOADS.md); default tiny")
    w.add_argument("--dtype", default="float32", choices=sorted(wl.DTYPES), help="feature dtype on the wire")
    w.add_argument("--op", choices=wl.OPS, help="replace the workload's op")
    w.add_argument("--boxes", type=int, help="replace the box count")
    w.add_argument("--map", type=_shape, metavar="CxHxW", help="one image's map (finest level for multiscale)")
    w.add_argument("--images", type=int, help="images per request")
    w.add_argument("--levels", type=int, help="FPN levels (multiscale_roi_align)")
    w.add_argument("--output", type=_shape, metavar="PHxPW", help="output size, e.g. 7 or 7x7")
    w.add_argument("--spatial-scale", type=_scale, help="e.g. 1/16")
    w.add_argument("--sampling-ratio", type=int)
    w.add_argument("--aligned", action=argparse.BooleanOptionalAction, default=None)
    w.add_argument("--pool-mode", choices=("avg", "max"))
    w.add_argument("--seed", type=int, default=0)

    load = p.add_argument_group("load (one of)")
    m = load.add_mutually_exclusive_group()
    m.add_argument("--concurrency", "-c", type=int, help="closed loop: this many requests always in flight (default 1)")
    m.add_argument("--rate", "-r", type=float, help="open loop: Poisson arrivals at this many requests/s")
    m.add_argument("--sweep-concurrency", type=_int_list, metavar="LIST",
                   help='closed-loop sweep: "1,2,4,8" or "1:64" (powers of two)')
    m.add_argument("--sweep-rate", type=_int_list, metavar="LIST", help='open-loop sweep: "50,100,200" or "50:400:50"')
    d = load.add_mutually_exclusive_group()
    d.add_argument("--duration", "-d", type=float, help="measured seconds per run (default 5)")
    d.add_argument("--requests", "-n", type=int, help="measured requests per run")
    load.add_argument("--warmup", type=float, default=1.0, help="seconds of unrecorded load before each run (default 1)")
    load.add_argument("--max-inflight", type=int, default=4096,
                      help="open loop: the most outstanding requests; past it sends wait (and the report says so)")
    load.add_argument("--latency-limit", type=float, metavar="MS", help="stop a sweep once p99 latency exceeds this")
    load.add_argument("--timeout", type=float, default=60.0, help="per-request deadline in seconds (default 60)")
    load.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                      help="reuse (default): glibc keeps large message buffers for the next call "
                           "(roi_client.reuse_freed_memory; halves this client's share of a call of tens "
                           "of MB); default: glibc as it is, as in a process that does not set it")
    load.add_argument("--protocol", choices=("roi_v1", "oip"), default="roi_v1",
                      help="roi_v1 (default) or oip: the Open Inference Protocol (KServe v2 / Triton gRPC ModelInfer), "
                           "the same workload as one model request")
    load.add_argument("--shared-memory", action="store_true",
                      help="send through shared memory (a server on this host with --allow-shared-memory): "
                           "each connection writes the request's tensors of 64 KiB or more into a region once, "
                           "and each call has its result written into a region of its own")

    sec = p.add_argument_group("security (as the server is set up)")
    sec.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root certificates")
    sec.add_argument("--tls-ca", metavar="PEM", help="TLS, trusting this CA for the server's certificate")
    sec.add_argument("--tls-cert", metavar="PEM", help="this client's certificate (mutual TLS; with --tls-key)")
    sec.add_argument("--tls-key", metavar="PEM", help="this client's private key")
    sec.add_argument("--tls-server-name", metavar="NAME", help="the name to verify in the server's certificate")
    sec.add_argument("--token-file", metavar="PATH",
                     help="file holding the bearer token to send (default: the ROI_AUTH_TOKEN variable, if set)")

    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write the figures as JSON ('-' for stdout)")
    o.add_argument("--plot", metavar="PATH", help="write a PNG: latency vs throughput for sweeps, latency histogram otherwise")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    o.add_argument("--verify", type=int, nargs="?", const=3, default=0, metavar="N",
                   help="check N sampled responses (default 3) against an in-process computation (needs torch)")
    o.add_argument("--quiet", "-q", action="store_true", help="only the table")
    return p


def _workload(args) -> wl.Workload:
    base = wl.make(args.workload, args.dtype, seed=args.seed)
    out = args.output
    if out is not None and len(out) == 1:
        out = (out[0], out[0])
    return wl.customize(
        base, op=args.op, boxes=args.boxes, map_shape=args.map, images=args.images, levels=args.levels,
        output_size=out, spatial_scale=args.spatial_scale, sampling_ratio=args.sampling_ratio,
        aligned=args.aligned, pool_mode=args.pool_mode, seed=args.seed,
    )


def _steps(args) -> tuple[str, list[tuple[str, float]]]:
    if args.sweep_concurrency:
        return "sweep-concurrency", [("closed", v) for v in args.sweep_concurrency]
    if args.sweep_rate:
        return "sweep-rate", [("open", v) for v in args.sweep_rate]
    if args.rate is not None:
        return "open", [("open", args.rate)]
    return "closed", [("closed", args.concurrency or 1)]


class _Bar:
    """A tqdm bar over one run's measured window (seconds or requests)."""

    def __init__(self, enabled: bool, total: float, unit: str, desc: str):
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.by_time = unit == "s"
        self.bar = tqdm(total=total, unit=unit, desc=desc, leave=False, file=sys.stderr,
                        bar_format="{desc} {bar} {n:.1f}/{total:.1f}{unit} {postfix}" if self.by_time else None)

    def __call__(self, elapsed: float, done: int, errors: int) -> None:
        if self.bar is None:
            return
        self.bar.n = min(elapsed, self.bar.total) if self.by_time else done
        self.bar.set_postfix_str(f"{done} done, {errors} errors, {done / elapsed if elapsed > 0 else 0:.1f}/s", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _client_options(args) -> dict:
    """The clients' TLS and token arguments from the flags."""
    token = None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    elif os.environ.get("ROI_AUTH_TOKEN"):
        token = os.environ["ROI_AUTH_TOKEN"]
    return {
        "tls": True if args.tls else None,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_server_name": args.tls_server_name,
        "token": token,
    }


async def _main_async(args, work: wl.Workload, mode: str, steps, say) -> dict:
    from .senders import open_senders

    if args.protocol == "oip":
        from .oip_senders import open_oip_senders

        senders, servers, close = await open_oip_senders(args.targets, work, timeout=args.timeout,
                                                         client_options=_client_options(args))
    else:
        senders, servers, close = await open_senders(args.targets, work, timeout=args.timeout,
                                                     client_options=_client_options(args),
                                                     shared_memory=args.shared_memory)
    plan = runner.Plan(
        warmup_s=args.warmup,
        duration_s=None if args.requests else (args.duration if args.duration is not None else 5.0),
        requests=args.requests,
        max_inflight=args.max_inflight,
    )
    summaries, latencies = [], None
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    try:
        for kind, value in steps:
            label = f"c={int(value)}" if kind == "closed" else f"{value:g}/s"
            total, unit = (plan.duration_s, "s") if plan.duration_s is not None else (plan.requests, "req")
            bar = _Bar(progress, total, unit, label)
            try:
                if kind == "closed":
                    res = await runner.closed_loop(senders, int(value), plan, verify=args.verify, tick=bar)
                else:
                    res = await runner.open_loop(senders, value, plan, verify=args.verify, tick=bar, seed=args.seed)
            finally:
                bar.close()
            s = summarize(res.records, window_start=res.window_start, window_end=res.window_end, mode=res.mode,
                          concurrency=res.concurrency, rate=res.rate, max_inflight_hits=res.max_inflight_hits)
            if args.verify:
                s["verify"] = verify.check(work, res.samples)
            summaries.append(s)
            latencies = [x * 1e3 for x, c in zip(res.records.latency, res.records.code) if c == "OK"]
            if len(steps) > 1:
                lat = s.get("latency_ms") or {}
                say(f"  {label}: {s['throughput_rps']:.1f} req/s, p50 {report.duration(lat.get('p50'))}, "
                    f"p99 {report.duration(lat.get('p99'))}, {s['error_count']} errors")
                if args.latency_limit and lat.get("p99", 0) > args.latency_limit:
                    say(f"  stopping the sweep: p99 {report.duration(lat['p99'])} > --latency-limit {args.latency_limit:g} ms")
                    break
    finally:
        await close()
    return {"servers": servers, "runs": summaries, "latencies_ms": latencies}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    to_stdout_json = args.json == "-"
    out = sys.stderr if to_stdout_json else sys.stdout

    def say(text: str = "") -> None:
        if not args.quiet:
            print(text, file=out, flush=True)

    try:
        work = _workload(args)
    except ValueError as exc:
        print(f"roi-loadtest: {exc}", file=sys.stderr)
        return 2
    mode, steps = _steps(args)
    if args.protocol == "oip" and work.op == "ragged_roi_align":
        print("roi-loadtest: --protocol oip: the Open Inference Protocol has no ragged maps; choose another op", file=sys.stderr)
        return 2
    if args.protocol == "oip" and args.shared_memory:
        print("roi-loadtest: --shared-memory is roi.v1's; with --protocol oip the tensors travel in the messages", file=sys.stderr)
        return 2
    if args.malloc == "reuse":
        reuse_freed_memory()
    cpus = os.cpu_count() or 0
    say(f"roi-loadtest: {cpus} CPU cores on this host ({platform.processor() or platform.machine()}); "
        "a server on the same host shares them with this client")
    say(f"targets: {', '.join(args.targets)}")
    say(f"workload: {work.describe()}")
    what = {"closed": "closed loop", "open": "open loop (Poisson arrivals)",
            "sweep-concurrency": "closed-loop sweep", "sweep-rate": "open-loop sweep"}[mode]
    window = f"{args.requests} requests" if args.requests else f"{args.duration or 5.0:g} s"
    via = ", through shared memory" if args.shared_memory else ""
    via += ", Open Inference Protocol (ModelInfer)" if args.protocol == "oip" else ""
    say(f"mode: {what}{via}, warm-up {args.warmup:g} s, window {window} per run")

    started = time.time()
    try:
        result = asyncio.run(_main_async(args, work, mode, steps, say))
    except KeyboardInterrupt:
        print("roi-loadtest: interrupted", file=sys.stderr)
        return 130
    except ConnectionError as exc:
        print(f"roi-loadtest: {exc}", file=sys.stderr)
        return 3
    except (OSError, RoIError) as exc:  # a TLS or token file that cannot be read
        print(f"roi-loadtest: {exc}", file=sys.stderr)
        return 2
    runs = result["runs"]
    for srv in result["servers"]:
        if srv:
            say(f"server {srv.get('target')}: {srv.get('version', '?')} on {srv.get('device', '?')} "
                f"({srv.get('device_name', '')}, {srv.get('threads', '?')} threads), "
                f"batching up to {srv.get('max_batch_requests', '?')} requests / {srv.get('max_wait_ms', '?')} ms")
    say()
    print(report.table(runs), file=out)
    if len(runs) == 1 and not args.quiet:
        print(report.details(runs[0]), file=out)
    elif not args.quiet:
        for r in runs:
            gen = r.get("generator")
            if gen and not gen["kept_up"]:
                print(f"rate {r['rate']:g}/s: the generator could not keep up ({gen['note']})", file=out)
            if r["errors"]:
                print(f"{report._load_label(r)}: errors " + ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())),
                      file=out)

    document = {
        "meta": {
            "tool": "roi-loadtest",
            "command": ["roi-loadtest", *(argv if argv is not None else sys.argv[1:])],
            "started": started,
            "host": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version()},
            "targets": args.targets,
            "servers": result["servers"],
            "workload": {
                "name": work.name, "op": work.op, "dtype": work.dtype, "boxes": work.num_boxes,
                "maps": [list(m.shape) for m in work.maps], "output_size": list(work.output_size),
                "spatial_scale": work.spatial_scale, "sampling_ratio": work.sampling_ratio,
                "aligned": work.aligned, "pool_mode": work.pool_mode,
                "request_payload_bytes": work.input_bytes(), "response_payload_bytes": work.output_bytes(),
            },
            "mode": mode,
            "shared_memory": args.shared_memory,
            "protocol": args.protocol,
            "warmup_s": args.warmup,
            "duration_s": None if args.requests else (args.duration or 5.0),
            "requests": args.requests,
        },
        "runs": runs,
    }
    if args.json:
        if to_stdout_json:
            import json

            json.dump(document, sys.stdout, indent=2, default=report._jsonable)
            print()
        else:
            report.write_json(args.json, document)
    if args.plot:
        report.plot(args.plot, document, result["latencies_ms"])
    bad_verify = any((r.get("verify") or {}).get("mismatches") for r in runs)
    return 1 if bad_verify else 0
