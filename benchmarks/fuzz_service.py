"""Fuzzes a roi-server with random and broken requests, and reports what it answered.

    python benchmarks/fuzz_service.py --cases 10000                 # starts a roi-server of its own
    python benchmarks/fuzz_service.py --cases 50000 --seed 7 --concurrency 16
    python benchmarks/fuzz_service.py --address 127.0.0.1:50051 --metrics-url http://127.0.0.1:9100/metrics

The cases come from tests/fuzz_requests.py (hypothesis, reproducible with --seed): valid
requests for every op, dtype and feature layout with extreme values, requests broken by one to
three mutations, and random bytes. They are sent --concurrency at a time, as unary Pool calls
and (--stream-share of them) in PoolStreams of up to 32, and every answer is judged by
``classify``: a result of the shape, dtype and id that follow from the request, or
INVALID_ARGUMENT / RESOURCE_EXHAUSTED with a short message that reveals no internals; a valid
request must get a result, equal bit for bit to the in-process roi_kernels call (unless
--no-verify). Alongside, --uploads feature uploads (UploadFeatures streams, valid and broken,
from the same module) are sent by two more threads and judged by ``classify_upload``; a third
of the handles stored are released at once, the rest left to eviction, and the store's bytes
(``roi_feature_store_bytes``) must stay within its budget at every check. The roi-server it starts has caps below its defaults (--server-args), so that
requests over them are frequent. Meanwhile the server must stay SERVING and its process alive; at the end its
queue must be empty and a probe request must get its exact result.

Prints counts by outcome and by mutation kind (Markdown tables) and writes them as JSON
(--json, default benchmarks/out/fuzz_service.json). Exits 1 on any violation, after printing
each offending case.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import re
import shlex
import sys
import threading
import time
import traceback
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fuzz_requests import (
    FUZZ_REGION,
    FUZZ_REGION_BYTES,
    GONE_REGION,
    POOL_METHOD,
    POOL_STREAM_METHOD,
    UPLOAD_METHOD,
    FuzzCase,
    UploadCase,
    Violation,
    classify,
    classify_upload,
    decoded_output,
    pool_requests,
    random_upload,
    reference_output,
    status_code,
)
from roi_client import EncodedRequest
from roi_client.shm import SharedMemoryRegion
from roi_client._proto.roi.v1 import roi_pb2
from server_process import Server, start_server

STREAM_GROUP = 32
# Caps below roi-server's defaults, so that the cases over them are frequent (many boxes,
# absurd output sizes, messages over 1 MiB); the valid cases stay far below them.
DEFAULT_SERVER_ARGS = (
    "--max-boxes 1024 --max-output-elements 2097152 --max-message-bytes 1048576 --allow-shared-memory"
    " --feature-store-bytes 1048576"
)
MAX_PRINTED = 20
OUTCOMES = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "violation")


# ---------------------------------------------------------------------------------------------
# The server


def metric(url: str, name: str) -> float | None:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def health_status(channel: grpc.Channel) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service="roi.v1.RoIService"), timeout=10)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---------------------------------------------------------------------------------------------
# Cases


def generate(
    count: int,
    first_seed: int,
    share: float,
    out: queue.Queue,
    stop: threading.Event,
    failed: Callable[[str], None],
) -> None:
    """Puts ``count`` cases on ``out`` (single cases, and lists of up to STREAM_GROUP for a
    stream), then None. Hypothesis draws them under ``first_seed`` (and the seeds after it if
    one run yields fewer examples than asked), so a seed gives the same cases every time. A
    failure to draw is passed to ``failed`` and ends the run."""
    picker = random.Random(first_seed)
    made = 0
    group: list[FuzzCase] = []

    def put(item) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                return
            except queue.Full:
                pass

    try:
        run_seed = first_seed
        while made < count and not stop.is_set():
            before = made

            @seed(run_seed)
            @settings(
                max_examples=count - made,
                database=None,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(pool_requests())
            def draw(case: FuzzCase) -> None:
                nonlocal made, group
                if made >= count or stop.is_set():
                    return
                made += 1
                # A message over the server's limit ends a whole stream (gRPC's status): unary only.
                if picker.random() < share and "oversized" not in case.kinds:
                    group.append(case)
                    if len(group) == STREAM_GROUP:
                        put(group)
                        group = []
                else:
                    put(case)

            draw()
            run_seed += 1
            if made == before:
                break
        if group:
            put(group)
    except Exception:  # noqa: BLE001  (a fault of the case generator: reported, and the run ends)
        failed(f"drawing case {made + 1} failed:\n{traceback.format_exc()}")
        stop.set()
    finally:
        out.put(None)


def register_regions(channel: grpc.Channel) -> list[SharedMemoryRegion]:
    """The regions the cases' shared memory references name: FUZZ_REGION, of random floats,
    and GONE_REGION, registered and unregistered again (requests naming it must be refused as
    unknown). A server with shared memory off refuses them: its cases are refused alike."""
    rng = np.random.default_rng(0)
    live = SharedMemoryRegion.create(FUZZ_REGION_BYTES)
    live.write(rng.standard_normal(FUZZ_REGION_BYTES // 4).astype(np.float32))
    gone = SharedMemoryRegion.create(4096)
    register = channel.unary_unary("/roi.v1.RoIService/RegisterSharedMemory")
    unregister = channel.unary_unary("/roi.v1.RoIService/UnregisterSharedMemory")
    try:
        for name, region in ((FUZZ_REGION, live), (GONE_REGION, gone)):
            register(roi_pb2.RegisterSharedMemoryRequest(region=name, key=region.key, byte_size=region.size)
                     .SerializeToString(), timeout=10)  # fmt: skip
        unregister(roi_pb2.UnregisterSharedMemoryRequest(region=GONE_REGION).SerializeToString(), timeout=10)
    except grpc.RpcError as exc:
        print(f"shared memory not registered ({exc.code().name}): its references are refused", file=sys.stderr)
    return [live, gone]


# ---------------------------------------------------------------------------------------------
# Sending and judging


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict = field(default_factory=lambda: defaultdict(Counter))
    extremes: dict = field(default_factory=lambda: defaultdict(Counter))
    verified: int = 0
    streamed: int = 0
    streams: int = 0
    violations: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> int:
        return sum(self.outcomes.values())

    def record(self, case: FuzzCase, outcome: str, problem: str | None = None, via: str = "Pool") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            for kind in case.kinds or ("(valid)",):
                self.by_kind[kind][outcome] += 1
            for name in case.extremes:
                self.extremes[name][outcome] += 1
            if problem is not None:
                self.violations.append({"via": via, "problem": problem, "case": case.describe()})
                if len(self.violations) <= MAX_PRINTED:
                    print(f"\nVIOLATION ({via}): {problem}\n{case.describe()}\n", file=sys.stderr)

    def record_upload(self, case: UploadCase, outcome: str, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            for kind in case.mutations or ("(valid)",):
                self.by_kind[f"upload: {kind}"][outcome] += 1
            if problem is not None:
                what = f"upload [{', '.join(case.mutations) or 'valid'}] of {len(case.messages)} message(s)"
                self.violations.append({"via": "UploadFeatures", "problem": problem, "case": what})
                if len(self.violations) <= MAX_PRINTED:
                    print(f"\nVIOLATION (UploadFeatures): {problem}\n{what}\n", file=sys.stderr)

    def problem(self, text: str) -> None:
        with self.lock:
            self.violations.append({"via": "server", "problem": text, "case": None})
            print(f"\nVIOLATION (server): {text}\n", file=sys.stderr)


def judge(
    tally: Tally, case: FuzzCase, code, message: str, response: bytes | None, verify: bool, via: str
) -> None:
    try:
        outcome = classify(case, code, message, response)
        if outcome == "OK" and case.valid and verify:
            try:
                got, want = decoded_output(response), reference_output(case.request)
            except Exception as exc:  # noqa: BLE001  (the service answered what the kernels refuse)
                raise Violation(
                    f"a result, but the in-process call raises {type(exc).__name__}: {exc}"
                ) from None
            same = (
                got.shape == want.shape
                and got.dtype == want.dtype
                and bool((got.contiguous().view(_bits(got)) == want.contiguous().view(_bits(want))).all())
            )
            if not same:
                raise Violation("the result differs from the in-process roi_kernels call")
            with tally.lock:
                tally.verified += 1
    except Violation as exc:
        tally.record(case, "violation", str(exc), via)
        return
    tally.record(case, outcome, via=via)


def _bits(t):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def send_one(channel: grpc.Channel, case: FuzzCase, timeout: float, tally: Tally, verify: bool) -> None:
    try:
        response = channel.unary_unary(POOL_METHOD)(case.payload, timeout=timeout)
        code, message = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        response, code, message = None, exc.code(), exc.details() or ""
    judge(tally, case, code, message, response, verify, "Pool")


def send_uploads(channel: grpc.Channel, count: int, run_seed: int, timeout: float, tally: Tally, stop) -> None:
    """``count`` uploads from :func:`random_upload` (seeded by ``run_seed``), one at a time."""
    rng = np.random.default_rng(run_seed)
    upload = channel.stream_unary(UPLOAD_METHOD)
    release = channel.unary_unary("/roi.v1.RoIService/ReleaseFeatures")
    for _ in range(count):
        if stop.is_set():
            return
        case = random_upload(rng, max_side=48)
        try:
            response = upload(iter(case.messages), timeout=timeout)
            code, message = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            response, code, message = None, exc.code(), exc.details() or ""
        try:
            outcome = classify_upload(case, code, message, response)
        except Violation as exc:
            tally.record_upload(case, "violation", str(exc))
            continue
        tally.record_upload(case, outcome)
        if response is not None and rng.random() < 1 / 3:
            handle = roi_pb2.UploadFeaturesResponse.FromString(response).handle
            release(roi_pb2.ReleaseFeaturesRequest(handle=handle).SerializeToString(), timeout=timeout)


def send_stream(
    channel: grpc.Channel, cases: list[FuzzCase], timeout: float, tally: Tally, verify: bool, tag: str
) -> None:
    """One PoolStream of ``cases``: every id answered once, the stream ending OK."""
    sent = [c.with_id(f"{tag}-{i}") for i, c in enumerate(cases)]
    by_id = {c.request.id: c for c in sent if c.request is not None}
    unparsed = [c for c in sent if c.request is None]
    unparsed_left = iter(unparsed)
    try:
        replies = list(
            channel.stream_stream(POOL_STREAM_METHOD)(iter([c.payload for c in sent]), timeout=timeout)
        )
    except grpc.RpcError as exc:
        for case in sent:
            tally.record(
                case, "violation", f"the stream failed: {exc.code().name}: {exc.details()}", "PoolStream"
            )
        return
    answers = [roi_pb2.PoolStreamResponse.FromString(r) for r in replies]
    ids = Counter(a.id for a in answers)
    want = Counter(list(by_id) + [""] * len(unparsed))
    answered: set[str] = set()
    for a in answers:
        case = by_id.get(a.id) if a.id else next(unparsed_left, None)
        if case is None or (a.id and a.id in answered):
            tally.problem(
                f"stream {tag}: an answer for id {a.id!r}, which was not sent or was answered twice"
            )
            continue
        answered.add(a.id)
        if a.WhichOneof("result") == "response":
            judge(tally, case, grpc.StatusCode.OK, "", a.response.SerializeToString(), verify, "PoolStream")
        elif a.WhichOneof("result") == "error":
            try:
                code = status_code(a.error.code)
            except Violation as exc:
                tally.record(case, "violation", str(exc), "PoolStream")
                continue
            judge(tally, case, code, a.error.message, None, verify, "PoolStream")
        else:
            tally.record(
                case, "violation", "a stream answer with neither a response nor an error", "PoolStream"
            )
    for rid, n in (want - ids).items():
        for _ in range(n):
            missing = by_id[rid] if rid else next(unparsed_left)
            tally.record(missing, "violation", "no answer in the stream", "PoolStream")
    with tally.lock:
        tally.streamed += len(cases)
        tally.streams += 1


def probe(channel: grpc.Channel, verify: bool) -> str | None:
    """A valid roi_align request; None when it gets its exact result."""
    gen = np.random.default_rng(0)
    x = gen.standard_normal((2, 8, 12, 16)).astype(np.float32)
    boxes = np.array([[0, 1.0, 2.0, 100.0, 80.0], [1, 30.0, 10.0, 60.0, 150.0]], np.float32)
    req = EncodedRequest.roi_align(x, boxes, (4, 3), 1 / 8, 2, True)
    try:
        raw = channel.unary_unary(POOL_METHOD)(req.payload, timeout=30)
    except grpc.RpcError as exc:
        return f"the probe failed: {exc.code().name}: {exc.details()}"
    got = decoded_output(raw)
    if tuple(got.shape) != (2, 8, 4, 3):
        return f"the probe's result has shape {list(got.shape)}"
    if verify:
        import torch

        import roi_kernels

        want = roi_kernels.roi_align(torch.from_numpy(x), torch.from_numpy(boxes), (4, 3), 1 / 8, 2, True)
        if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
            return "the probe's result differs from the in-process call"
    return None


# ---------------------------------------------------------------------------------------------
# Report


def table(title: str, rows: dict[str, Counter]) -> str:
    lines = [f"| {title} | cases | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
    for name in sorted(rows, key=lambda k: (-sum(rows[k].values()), k)):
        c = rows[name]
        lines.append(
            f"| {name} | {sum(c.values())} | " + " | ".join(str(c.get(o, 0)) for o in OUTCOMES) + " |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="requests to send (default 10,000)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a fresh one, printed)")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight at once")
    p.add_argument("--stream-share", type=float, default=0.2, help="share of the cases sent in PoolStreams")
    p.add_argument(
        "--uploads", type=int, default=None, help="feature uploads to send besides (default: a tenth of --cases)"
    )
    p.add_argument("--address", help="fuzz this server instead of starting one")
    p.add_argument("--metrics-url", help="its /metrics (for the queue depth at the end)")
    p.add_argument(
        "--server-args",
        default=DEFAULT_SERVER_ARGS,
        help=f"flags for the roi-server this script starts (default: {DEFAULT_SERVER_ARGS!r}; "
        "'' for the server's own defaults)",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a call may take before it counts as hung"
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip comparing valid requests' results with the in-process call (needs torch)",
    )
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "fuzz_service.json"))
    args = p.parse_args()
    run_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    verify = not args.no_verify
    command = "python benchmarks/fuzz_service.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(
        f"seed {run_seed}; replay: python benchmarks/fuzz_service.py --cases {args.cases} --seed {run_seed}",
        file=sys.stderr,
    )
    if verify:
        import roi_kernels  # noqa: F401  (compiles on first use: before the clock starts)

    out_dir = Path(args.json).parent
    if args.address:
        server = Server(args.address, args.metrics_url)
    else:
        server = start_server(shlex.split(args.server_args), out_dir / "fuzz_service_server.log")
        print(f"roi-server {server.address} (log {server.log_path})", file=sys.stderr)

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    channel = grpc.insecure_channel(server.address, options=options)
    tally = Tally()
    work: queue.Queue = queue.Queue(maxsize=4 * args.concurrency)
    stop = threading.Event()
    health_log: Counter = Counter()
    store_checks = 0
    uploads = 0
    start = time.perf_counter()
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        if health_status(channel) != "SERVING":
            raise RuntimeError(f"the server is not SERVING before the run: {health_status(channel)}")
        regions = register_regions(channel)
        producer = threading.Thread(
            target=generate,
            args=(args.cases, run_seed, args.stream_share, work, stop, tally.problem),
            daemon=True,
        )
        producer.start()
        streams = iter(range(1 << 62))

        def worker() -> None:
            while True:
                item = work.get()
                if item is None:
                    work.put(None)  # for the other workers
                    return
                try:
                    if isinstance(item, list):
                        send_stream(channel, item, args.timeout * 2, tally, verify, f"st{next(streams)}")
                    else:
                        send_one(channel, item, args.timeout, tally, verify)
                except Exception as exc:  # noqa: BLE001  (a fault of this script: reported, not hidden)
                    tally.problem(f"the fuzzer itself failed: {type(exc).__name__}: {exc}")

        workers = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
        uploads = args.cases // 10 if args.uploads is None else args.uploads
        workers += [
            threading.Thread(
                target=send_uploads,
                args=(channel, uploads // 2 + (uploads % 2) * (i == 0), run_seed + i, args.timeout, tally, stop),
                daemon=True,
            )
            for i in range(2 if uploads else 0)
        ]
        for w in workers:
            w.start()
        last_check = 0.0
        while any(w.is_alive() for w in workers):
            time.sleep(0.5)
            now = time.perf_counter()
            done = tally.done
            print(
                f"\r{done}/{args.cases + uploads} cases, {done / (now - start):.0f}/s, "
                + ", ".join(f"{o} {tally.outcomes[o]}" for o in OUTCOMES),
                end="",
                file=sys.stderr,
                flush=True,
            )
            if not server.alive():
                tally.problem(f"the roi-server process exited with {server.proc.returncode}")
                stop.set()
                break
            if now - last_check > 2.0:
                last_check = now
                status = health_status(channel)
                health_log[status] += 1
                if status != "SERVING":
                    tally.problem(f"health {status} during the run")
                if server.metrics_url:
                    held = metric(server.metrics_url, "roi_feature_store_bytes") or 0.0
                    budget = metric(server.metrics_url, "roi_feature_store_budget_bytes")
                    store_checks += 1
                    if budget is not None and held > budget:
                        tally.problem(f"the feature store holds {held:.0f} bytes, above its budget of {budget:.0f}")
        print(file=sys.stderr)
        wall = time.perf_counter() - start

        # After the run: alive, SERVING, nothing left queued, a probe answered exactly.
        final_health = health_status(channel)
        if final_health != "SERVING":
            tally.problem(f"health {final_health} after the run")
        queue_depth = None
        if server.metrics_url:
            deadline = time.monotonic() + 10
            while (
                queue_depth := metric(server.metrics_url, "roi_queue_depth")
            ) and time.monotonic() < deadline:
                time.sleep(0.05)
            if queue_depth:
                tally.problem(f"queue depth {queue_depth} after the run")
        probe_problem = probe(channel, verify)
        if probe_problem:
            tally.problem(probe_problem)
        alive = server.alive()
        if not alive:
            tally.problem("the roi-server process is gone")
    finally:
        stop.set()
        channel.close()
        server.stop()
        for region in locals().get("regions", []):
            region.close()
    server_errors = None
    if server.log_path is not None:
        server_errors = sum(
            1 for line in server.log_path.read_text(errors="replace").splitlines() if " ERROR " in line
        )

    kinds = {k: c for k, c in tally.by_kind.items()}
    doc = {
        "command": command,
        "seed": run_seed,
        "cases": tally.done,
        "server": args.address or f"roi-server {args.server_args}".strip(),
        "concurrency": args.concurrency,
        "stream_share": args.stream_share,
        "streamed_cases": tally.streamed,
        "streams": tally.streams,
        "wall_s": round(wall, 2),
        "cases_per_s": round(tally.done / wall, 1),
        "outcomes": dict(tally.outcomes),
        "valid_results_verified": tally.verified if verify else None,
        "by_mutation_kind": {k: dict(c) for k, c in sorted(kinds.items())},
        "by_extreme": {k: dict(c) for k, c in sorted(tally.extremes.items())},
        "uploads": uploads,
        "feature_store_checks_during_run": store_checks,
        "health_checks_during_run": dict(health_log),
        "health_after": final_health,
        "queue_depth_after": queue_depth,
        "server_alive_after": alive,
        "server_error_log_lines": server_errors,
        "violations": tally.violations,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")

    print(f"# Service fuzzing: {tally.done} cases in {wall:.1f} s ({tally.done / wall:.0f}/s)\n")
    print(
        f"`{command}`: seed {run_seed}, concurrency {args.concurrency}, {tally.streamed} cases in "
        f"{tally.streams} PoolStreams and the rest unary, against {doc['server']}\n"
    )
    print("| outcome | cases |\n|---|---:|")
    for o in OUTCOMES:
        print(f"| {o} | {tally.outcomes.get(o, 0)} |")
    if verify:
        print(f"\nValid requests whose result equals the in-process call bit for bit: {tally.verified}")
    print(
        f"\nAfter the run: health {final_health}, queue depth {queue_depth}, process "
        f"{'alive' if alive else 'gone'}, probe {'exact' if not probe_problem else probe_problem}; "
        f"health checks during the run: {dict(health_log)}; server log ERROR lines: {server_errors}\n"
    )
    print(table("mutation kind", kinds))
    print()
    print(table("extreme (valid) input", tally.extremes))
    print(f"\nJSON: {args.json}")
    if tally.violations:
        print(
            f"\n{len(tally.violations)} violation(s); the first:\n{tally.violations[0]['problem']}\n"
            f"{tally.violations[0]['case'] or ''}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
