"""The service against the in-process kernel call, with and without dynamic batching, and
against the wire floor, side by side in one run on the same inputs.

    python benchmarks/bench_service.py                      # tiny, single-level, fpn-det; float32 + float16
    python benchmarks/bench_service.py --workloads tiny --dtypes float32 --concurrency tiny=1,32
    python benchmarks/bench_service.py --quick              # shorter windows, fewer repeats

For each workload, wire dtype and concurrency:
  (a) the in-process call: roi_kernels on the same tensors, median of --repeat timed calls;
  (b) roi-server with dynamic batching (its defaults), driven in closed loop by the load
      tester's engine (one asyncio client in this process);
  (c) the same server with batching off (--max-batch-requests 1);
  (d) the wire floor: the request's and the response's bytes through a plain loopback TCP socket
      to another process (benchmarks/wire_floor.py);
  (e) the contender: a plain server (benchmarks/plain_server.py), what a user would write
      instead of this project: generated stubs, protobuf parsing, torchvision's op, one request
      at a time. (--no-plain leaves it out.)
  (f) the batching server through shared memory (--allow-shared-memory; the client's tensors
      written once into a region, each call's result into one): a client on the same host;
  (g) with --variant NAME=FLAGS, more roi-servers with other flags, in the same windows;
  (h) the batching server through the Open Inference Protocol (KServe v2 / Triton gRPC
      ModelInfer, roi-loadtest --protocol oip), beside its roi.v1 figures (--no-oip leaves it out).
Each service figure is the median over --repeat measured windows, the servers taking turns
window by window so that drifts of a shared machine hit both alike. Prints a Markdown table
and the ratios; --json writes every figure.

Both servers and this client run on this host and share its cores: on a small machine the
client's own CPU time is part of what is measured (the header prints the core count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402
from wire_floor import WireFloor  # noqa: E402

import roi_kernels  # noqa: E402
from roi_client import reuse_freed_memory  # noqa: E402
from roi_client.loadtest import runner, stats  # noqa: E402
from roi_client.loadtest.oip_senders import open_oip_senders  # noqa: E402
from roi_client.loadtest.senders import open_senders  # noqa: E402
from roi_client.loadtest.workload import Workload  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_CONCURRENCY = {"tiny": [1, 32], "single-level": [1, 32], "fpn-det": [1, 4]}
LISTENING = re.compile(r"listening on \S*?:(\d+)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def start_server(extra: list[str], threads: int, timeout: float = 180.0, plain: bool = False) -> tuple[subprocess.Popen, str]:
    """Starts ``roi-server`` (or with ``plain`` the contender) on a free port and waits for its
    ``listening on`` line."""
    if plain:
        cmd = [sys.executable, str(Path(__file__).with_name("plain_server.py")), "--port", "0", "--threads", str(threads)]
    else:
        cmd = [sys.executable, "-m", "roi_server.main", "--port", "0", "--metrics-port", "-1", "--device", "cpu",
               "--host", "127.0.0.1", "--threads", str(threads), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = LISTENING.search(line)
        if m:
            # Keep draining its log so that a full pipe never blocks the server.
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, f"127.0.0.1:{m.group(1)}"
    proc.kill()
    raise RuntimeError("roi-server did not start:\n" + "".join(seen[-30:]))


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def in_process_fn(w: workloads.Workload):
    if w.op == "roi_pool":
        return lambda: roi_kernels.roi_pool(w.maps[0], w.boxes, w.output_size, w.spatial_scale)
    if w.op == "roi_align":
        return lambda: roi_kernels.roi_align(w.maps[0], w.boxes, w.output_size, w.spatial_scale, w.sampling_ratio,
                                             w.aligned)
    if w.op == "ragged_roi_align":
        return lambda: roi_kernels.roi_align(w.maps, w.boxes, w.output_size, w.spatial_scale, w.sampling_ratio,
                                             w.aligned)
    return lambda: roi_kernels.multiscale_roi_align(w.maps, w.boxes, w.image_sizes, w.output_size, w.sampling_ratio,
                                                    w.aligned)


def median_ms(fn, repeat: int, warmup: int = 3) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def as_loadtest(w: workloads.Workload) -> Workload:
    """The very tensors of the benchmark workload, as the load tester sends them."""
    params = dict(output_size=tuple(w.output_size), spatial_scale=w.spatial_scale, sampling_ratio=w.sampling_ratio,
                  aligned=w.aligned, image_sizes=[tuple(s) for s in w.image_sizes])
    return Workload.from_arrays(w.name, w.op, [m.numpy() for m in w.maps], w.boxes.numpy(), **params)


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_service(targets: dict[str, tuple[str, bool]], work: Workload, concurrency: int, plan: runner.Plan,
                          repeat: int, pids: dict[str, int]) -> dict[str, list[dict]]:
    """``repeat`` closed-loop windows per target (address, through shared memory), the targets
    taking turns. Each window also gets ``server_cpu_ms_per_request``: the server process's
    (``pids``) CPU time over the warm-up and the window, over the requests of both (counted at
    the window's rate: the warm-up's are not recorded)."""
    opened = {}
    for name, (target, shm) in targets.items():
        if name == "oip":
            opened[name] = await open_oip_senders([target], work, timeout=120.0)
        else:
            opened[name] = await open_senders([target], work, timeout=120.0, shared_memory=shm)
    out: dict[str, list[dict]] = {name: [] for name in targets}
    try:
        for _ in range(repeat):
            for name, (senders, _, _) in opened.items():
                cpu_before = cpu_seconds(pids[name])
                res = await runner.closed_loop(senders, concurrency, plan)
                cpu = cpu_seconds(pids[name]) - cpu_before
                summary = stats.summarize(res.records, window_start=res.window_start,
                                          window_end=res.window_end, mode="closed", concurrency=concurrency)
                sent = summary["throughput_rps"] * (plan.warmup_s + plan.duration_s)
                summary["server_cpu_ms_per_request"] = 1e3 * cpu / sent if sent else float("nan")
                out[name].append(summary)
    finally:
        for _, _, close in opened.values():
            await close()
    return out


def median_of(runs: list[dict], *path) -> float:
    vals = []
    for r in runs:
        v = r
        for p in path:
            v = None if v is None else v.get(p)
        if v is not None:
            vals.append(float(v))
    return statistics.median(vals) if vals else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["tiny", "single-level", "fpn-det"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=sorted(DTYPES))
    p.add_argument("--concurrency", nargs="*", default=[], metavar="NAME=C1,C2",
                   help="concurrencies per workload (default tiny=1,32 single-level=1,32 fpn-det=1,4)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measured window")
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds before each window")
    p.add_argument("--repeat", type=int, default=5, help="windows per server and timed in-process calls (>= 5)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the servers and of the in-process call")
    p.add_argument("--server-args", default="", help="extra flags for both servers, e.g. '--max-wait-ms 1'")
    p.add_argument("--quick", action="store_true", help="1 s windows, 3 repeats (for a smoke run, not for figures)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--no-plain", action="store_true", help="leave the plain-server contender out")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="leave out the batching server's client through shared memory")
    p.add_argument("--no-oip", action="store_true",
                   help="leave out the batching server driven through the Open Inference Protocol")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="one more roi-server, with these extra flags, measured in the same windows "
                        "(e.g. 'worker=--inline-max-samples 0'); repeatable")
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                   help="this client's and both servers' glibc malloc (roi_client.reuse_freed_memory); "
                        "'default' measures a client that leaves it alone")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup, args.repeat = 1.0, 0.5, 3

    conc = dict(DEFAULT_CONCURRENCY)
    for item in args.concurrency:
        name, _, values = item.partition("=")
        conc[name] = [int(v) for v in values.split(",")]
    torch.set_num_threads(args.threads)
    extra = ["--malloc", args.malloc, *args.server_args.split()]
    if args.malloc == "reuse":
        reuse_freed_memory()

    hardware = f"{cpu_name()}, {os.cpu_count()} cores, no GPU" if not torch.cuda.is_available() else cpu_name()
    print(f"# bench_service: {hardware}; torch {torch.__version__}, {args.threads} threads; "
          f"python {platform.python_version()}")
    print(f"# servers and this client share the host's {os.cpu_count()} cores; windows {args.duration:g} s "
          f"after {args.warmup:g} s warm-up, median of {args.repeat}; malloc {args.malloc}")
    shm = not args.no_shared_memory
    servers = {"batching": start_server([*extra, "--allow-shared-memory"] if shm else extra, args.threads),
               "no batching": start_server([*extra, "--max-batch-requests", "1"], args.threads)}
    if not args.no_plain:
        servers["plain"] = start_server([], args.threads, plain=True)
    variants = dict(v.partition("=")[::2] for v in args.variant)
    for vname, flags in variants.items():
        servers[vname] = start_server([*extra, *flags.split()], args.threads)
    targets = {name: (t, False) for name, (_, t) in servers.items()}
    pids = {name: proc.pid for name, (proc, _) in servers.items()}
    if shm:
        # The batching server again, its client sending through shared memory.
        targets["shared memory"] = (targets["batching"][0], True)
        pids["shared memory"] = pids["batching"]
    if not args.no_oip:
        # The batching server again, through inference.GRPCInferenceService/ModelInfer.
        targets["oip"] = (targets["batching"][0], False)
        pids["oip"] = pids["batching"]
    plan = runner.Plan(warmup_s=args.warmup, duration_s=args.duration)
    rows = []
    try:
        with WireFloor() as wire:
            for name in args.workloads:
                for dtype in args.dtypes:
                    w = workloads.make(name, DTYPES[dtype])
                    kernel_ms = median_ms(in_process_fn(w), max(args.repeat, 5))
                    work = as_loadtest(w)
                    for c in conc.get(name, [1]):
                        runs = asyncio.run(measure_service(targets, work, c, plan, args.repeat, pids))
                        sent = median_of(runs["batching"], "sent_bytes_per_request")
                        received = median_of(runs["batching"], "received_bytes_per_request")
                        wire_ms = wire.median_ms(int(sent), int(received), repeat=max(args.repeat, 5))
                        row = {"workload": name, "dtype": dtype, "concurrency": c, "kernel_ms": kernel_ms,
                               "wire_ms": wire_ms, "request_bytes": sent, "response_bytes": received}
                        for srv, key in (("batching", "b"), ("no batching", "nb"), ("plain", "pl"), ("shared memory", "shm"),
                                         ("oip", "oip")):
                            if srv not in runs:
                                continue
                            r = runs[srv]
                            row[f"{key}_rps"] = median_of(r, "throughput_rps")
                            row[f"{key}_p50"] = median_of(r, "latency_ms", "p50")
                            row[f"{key}_p99"] = median_of(r, "latency_ms", "p99")
                            row[f"{key}_queue_p50"] = median_of(r, "server", "queue_ms", "p50")
                            row[f"{key}_compute_p50"] = median_of(r, "server", "compute_ms", "p50")
                            row[f"{key}_batch"] = median_of(r, "server", "batch_requests", "mean")
                            row[f"{key}_cpu_ms"] = median_of(r, "server_cpu_ms_per_request")
                            row[f"{key}_errors"] = sum(x["error_count"] for x in r)
                        row["variants"] = {
                            v: {"rps": median_of(runs[v], "throughput_rps"), "p50": median_of(runs[v], "latency_ms", "p50"),
                                "p99": median_of(runs[v], "latency_ms", "p99")} for v in variants
                        }
                        row["runs"] = runs
                        row["batch_gain"] = row["b_rps"] / row["nb_rps"]
                        row["vs_plain"] = row["b_rps"] / row["pl_rps"] if "pl_rps" in row else float("nan")
                        row["shm_vs_in_process"] = row["shm_rps"] * kernel_ms / 1e3 if "shm_rps" in row else float("nan")
                        row["vs_in_process"] = row["b_rps"] * kernel_ms / 1e3
                        row["oip_vs_roi_v1"] = row["oip_rps"] / row["b_rps"] if "oip_rps" in row else float("nan")
                        # The service's time per request (1 / throughput) over what moving the bytes
                        # and running the kernel cost at the least.
                        row["per_request_ms"] = 1e3 / row["b_rps"]
                        row["over_floor"] = row["per_request_ms"] / (kernel_ms + wire_ms)
                        rows.append(row)
                        print_row(row)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    print()
    print(markdown(rows, hardware, args))
    if args.json:
        doc = {"hardware": hardware, "threads": args.threads, "cores": os.cpu_count(), "args": vars(args),
               "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


def print_row(r: dict) -> None:
    print(f"{r['workload']:>12} {r['dtype']:>7} c={r['concurrency']:<3} kernel {r['kernel_ms']:8.3f} ms  "
          f"wire {r['wire_ms']:7.3f} ms | batching {r['b_rps']:8.1f}/s p50 {r['b_p50']:8.2f} p99 {r['b_p99']:8.2f} "
          f"(batch {r['b_batch']:.1f}) | off {r['nb_rps']:8.1f}/s p50 {r['nb_p50']:8.2f} p99 {r['nb_p99']:8.2f} | "
          f"x{r['batch_gain']:.2f}, {100 * r['vs_in_process']:.0f}% of in-process, "
          f"{r['over_floor']:.2f}x floor | plain {r.get('pl_rps', float('nan')):8.1f}/s p50 "
          f"{r.get('pl_p50', float('nan')):8.2f}, ours x{r['vs_plain']:.2f} | shared memory "
          f"{r.get('shm_rps', float('nan')):8.1f}/s p50 {r.get('shm_p50', float('nan')):8.2f}, "
          f"{100 * r['shm_vs_in_process']:.0f}% of in-process"
          + (f" | oip {r['oip_rps']:8.1f}/s p50 {r['oip_p50']:8.2f} (roi.v1 x{1 / r['oip_vs_roi_v1']:.2f})"
             if "oip_rps" in r else "")
          + "".join(f" | {v} {x['rps']:8.1f}/s p50 {x['p50']:8.2f} (batching x{r['b_rps'] / x['rps']:.2f})"
                    for v, x in r["variants"].items()), flush=True)


def markdown(rows: list[dict], hardware: str, args) -> str:
    lines = [
        f"Hardware: {hardware}; torch threads {args.threads}; servers and client on the same host.",
        "",
        "| workload | dtype | conc | in-process ms | wire floor ms | batching req/s | p50 ms | p99 ms | batch | "
        "no batching req/s | p50 ms | p99 ms | batching gain | service / in-process | per request / (kernel + wire) | "
        "plain server req/s | p50 ms | ours / plain | shared memory req/s | p50 ms | shared memory / in-process |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['dtype']} | {r['concurrency']} | {r['kernel_ms']:.3f} | {r['wire_ms']:.3f} | "
            f"{r['b_rps']:.1f} | {r['b_p50']:.2f} | {r['b_p99']:.2f} | {r['b_batch']:.1f} | "
            f"{r['nb_rps']:.1f} | {r['nb_p50']:.2f} | {r['nb_p99']:.2f} | {r['batch_gain']:.2f}x | "
            f"{100 * r['vs_in_process']:.0f}% | {r['over_floor']:.2f}x | {r.get('pl_rps', float('nan')):.1f} | "
            f"{r.get('pl_p50', float('nan')):.2f} | {r['vs_plain']:.2f}x | {r.get('shm_rps', float('nan')):.1f} | "
            f"{r.get('shm_p50', float('nan')):.2f} | {100 * r['shm_vs_in_process']:.0f}% |"
        )
    cols = [("batching", "b"), ("no batching", "nb"), ("plain server", "pl"), ("shared memory", "shm")]
    lines += ["", "Server CPU time per request, ms (the server process's user + system time over its windows):", "",
              "| workload | dtype | conc | " + " | ".join(c for c, _ in cols) + " |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['concurrency']} | "
                     + " | ".join(f"{r.get(k + '_cpu_ms', float('nan')):.3f}" for _, k in cols) + " |")
    if any("oip_rps" in r for r in rows):
        lines += ["", "The batching server by protocol, side by side (roi.v1 Pool and the Open Inference Protocol's "
                  "ModelInfer, the same workload and server):", "",
                  "| workload | dtype | conc | roi.v1 req/s | p50 ms | p99 ms | OIP req/s | p50 ms | p99 ms | OIP / roi.v1 "
                  "| roi.v1 server CPU ms/req | OIP server CPU ms/req |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if "oip_rps" not in r:
                continue
            lines.append(f"| {r['workload']} | {r['dtype']} | {r['concurrency']} | {r['b_rps']:.1f} | {r['b_p50']:.2f} | "
                         f"{r['b_p99']:.2f} | {r['oip_rps']:.1f} | {r['oip_p50']:.2f} | {r['oip_p99']:.2f} | "
                         f"{r['oip_vs_roi_v1']:.2f}x | {r['b_cpu_ms']:.3f} | {r['oip_cpu_ms']:.3f} |")
    variants = sorted({v for r in rows for v in r["variants"]})
    if variants:
        lines += ["", "| workload | dtype | conc | batching req/s | p50 ms | variant | req/s | p50 ms | batching / variant |",
                  "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for r in rows:
            for v in variants:
                x = r["variants"][v]
                lines.append(f"| {r['workload']} | {r['dtype']} | {r['concurrency']} | {r['b_rps']:.1f} | {r['b_p50']:.2f} | "
                             f"{v} | {x['rps']:.1f} | {x['p50']:.2f} | {r['b_rps'] / x['rps']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
