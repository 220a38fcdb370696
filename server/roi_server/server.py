"""The gRPC server: the RoI service, health, reflection, metrics, and an orderly stop.

Start-up order: the metrics endpoint and the gRPC port come up first, with health NOT_SERVING
(so that probes get an answer while the kernels compile); then the kernels are loaded and
warmed up on the device's worker thread; then health turns SERVING and the log says
``listening on <host>:<port>``. Stopping (SIGTERM/SIGINT, or :meth:`RoIServer.stop`) turns
health NOT_SERVING, refuses new calls, lets accepted requests finish (up to ``grace_s``), then
closes everything.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from roi_client._proto.roi.v1 import roi_pb2

from . import __version__
from .auth import TokenAuthInterceptor
from .batcher import BatchPolicy, DynamicBatcher
from .codec import Limits
from .features import FeatureStore
from .health import DrainingHealthServicer
from .metrics import MetricsHTTPServer, ServiceMetrics
from .oip import SERVICE_NAME as OIP_SERVICE_NAME
from .oip import OIPService
from .service import SERVICE_NAME, RoIService, ServerInfo
from .settings import Settings
from .shm import SharedMemoryRegistry
from .shm_service import SharedMemoryService
from .tls import describe as describe_transport
from .tls import server_credentials

# Stopping: how long the line must be quiet before the transport closes, and the most time
# spent waiting for that.
QUIET_S = 0.2
LINGER_S = 1.0
# Calls arrived but not yet taken by the event loop (see grpc_options).
MAX_PENDING_CALLS = 20_000

log = logging.getLogger("roi_server")

HEALTH_SERVICES = ("", SERVICE_NAME)


def build_interceptors(
    settings: Settings, service: RoIService | None = None, oip: OIPService | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors run on every call, health and reflection included. Calls of ``service``'s
    Pool and PoolStream (and of ``oip``'s ModelInfer and ModelStreamInfer) that the token check
    refuses are counted by it (UNAUTHENTICATED)."""
    tokens = settings.bearer_tokens()
    if not tokens:
        return []
    counters = [c.count_refusal for c in (service, oip) if c is not None]

    def on_refusal(method: str, raw: bytes | None, *rest) -> None:
        for count in counters:
            count(method, raw, *rest)

    return [TokenAuthInterceptor(tokens, on_refusal=on_refusal if counters else None)]


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Agrees with roi_client's keepalive (a ping every 30 s at most, also between calls);
        # a client that pings more often than this gets GOAWAY too_many_pings.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # A port held by another process is an error, not a silent second listener.
        ("grpc.so_reuseport", 0),
        # Calls the transport holds until the event loop takes them (a burst of small requests
        # outruns the loop). Past gRPC's default (1,000, with random early drops up to 3,000)
        # it cancels them: CANCELLED, which clients do not retry and which says nothing of
        # overload. Here they wait instead, bounded by their deadlines and by max_queue once
        # the loop reaches them.
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max(settings.grace_s, 1.0) * 1000)),
        ]
    return options


def _kernels_state() -> tuple[bool, Path]:
    """Whether importing roi_kernels would only load an existing build, and its folder. Runs on
    a thread (it imports torch).

    Importing anything of the ``roi_kernels`` package loads the extension (compiling it when
    needed), so its build module is read here from its file, on its own: it depends on nothing
    else of the package, and what is asked of it (is_built, build_dir) compiles nothing."""
    imported = sys.modules.get("roi_kernels._build")
    if imported is not None and imported.load_info() is not None:
        return True, imported.load_info().directory
    package = importlib.util.find_spec("roi_kernels")
    assert package is not None and package.submodule_search_locations, "roi_kernels is installed"
    name = "roi_server._roi_kernels_build"
    build = sys.modules.get(name)
    if build is None:
        spec = importlib.util.spec_from_file_location(name, Path(package.submodule_search_locations[0]) / "_build.py")
        assert spec is not None and spec.loader is not None
        build = importlib.util.module_from_spec(spec)
        sys.modules[name] = build  # dataclasses look their module up there
        try:
            spec.loader.exec_module(build)
        except BaseException:
            del sys.modules[name]
            raise
    return build.is_built(), build.build_dir(build.cuda_sources_wanted())


async def _compile_kernels(directory: Path) -> None:
    """Compiles the kernels in a child process (``python -m roi_kernels.build``), in a process
    group of its own: a stop (the task cancelled) ends it and the compilers it runs at once,
    where a compile on a thread of this process would hold the exit until it finished."""
    log.info("compiling the kernels into %s (first start only; a minute or more) ...", directory)
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roi_kernels.build",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = await proc.communicate()
    except asyncio.CancelledError:
        await _end_process_group(proc)
        log.info("stopped compiling the kernels after %.1f s", time.perf_counter() - started)
        raise
    text = output.decode(errors="replace").strip()
    for line in text.splitlines():
        log.debug("roi-kernels-build: %s", line)
    if proc.returncode != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        raise RuntimeError(f"compiling the kernels failed (exit status {proc.returncode}): {reason.strip()}")
    log.info("compiled the kernels in %.1f s (into %s)", time.perf_counter() - started, directory)


async def _end_process_group(proc: asyncio.subprocess.Process, patience_s: float = 2.0) -> None:
    """Ends the build: SIGTERM to every process of its session (ninja runs each compiler in a
    process group of its own, inside the session), then SIGKILL to what is left after
    ``patience_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in _session_members(proc.pid):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline:
            if proc.returncode is not None and not _session_members(proc.pid):
                return
            await asyncio.sleep(0.02)
    await proc.wait()


def _session_members(session: int) -> list[int]:
    """Live (not zombie) processes of the session ``session``, from /proc (Linux; elsewhere
    none are known, and the process group's signal is all the stop sends)."""
    members: list[int] = []
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return members
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After the command's name: state, ppid, pgrp, session.
        if int(fields[3]) == session and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


def _load_kernels(settings: Settings):
    """Imports roi_kernels (which loads the build) and opens the device; runs on a thread."""
    import torch

    from .logging_setup import adopt_library_logs

    adopt_library_logs()
    import roi_kernels  # noqa: F401  (registers torch.ops.roi_kernels)

    from .engine import KernelEngine, resolve_device

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    return KernelEngine(device, settings.threads)


def _check_port_free(host: str, port: int, what: str, flag: str, env: str) -> None:
    """Raises OSError naming the port, which one it is and its setting when another process
    listens there (the libraries' own errors name neither, and gRPC's core logs a raw line)."""
    if port <= 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # the library reports a bad host in its own words
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and http.server bind
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"the {what} port {port} is already in use on {host or '*'} "
                        f"(another process listens there): choose another with {flag} or {env}"
                    ) from None
                raise


class PortInUse(OSError):
    """The gRPC or the metrics port is taken; the message names it and its setting."""


class RoIServer:
    """One server: ``await start()``, then ``await stop()`` (or :func:`serve` for both)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.health = DrainingHealthServicer()
        self.shared_memory = SharedMemoryRegistry(settings.allow_shared_memory, settings.shared_memory_prefix, self.metrics)
        self.shm_service = SharedMemoryService(
            self.shared_memory,
            tokens_required=bool(settings.auth_token or settings.auth_token_file),
            note_arrival=self._note_arrival,
        )
        self.features = FeatureStore(
            settings.feature_store_bytes,
            settings.feature_ttl,
            settings.feature_store_caller_bytes,
            per_caller=bool(settings.auth_token or settings.auth_token_file),
            metrics=self.metrics,
        )
        self._sweeper: asyncio.Task | None = None
        self.service = RoIService(
            Limits(settings.max_boxes, settings.max_output_elements, settings.max_message_bytes),
            self.metrics,
            # A stream keeps at most this many of its requests in the server; never more than
            # the queue holds, so that one busy stream alone is slowed down, not refused.
            stream_window=min(max(2 * settings.max_batch_requests, 16), settings.max_queue),
            # Requests name the regions their caller registered through these methods.
            shared_memory=self.shm_service,
            features=self.features,
        )
        # The Open Inference Protocol, over the same batcher, limits, metrics and regions.
        self.oip = OIPService(self.service, self.shm_service, self.metrics, stream_window=self.service.stream_window)
        self.engine = None
        self.batcher: DynamicBatcher | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: MetricsHTTPServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def _sweep_features(self) -> None:
        """Expired handles go within a second even when no call touches the store."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.feature_ttl / 4))
            self.features.sweep()

    def _note_arrival(self) -> None:
        self.service.last_arrival = time.monotonic()

    @property
    def address(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        s = self.settings
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if s.metrics_port >= 0:
            _check_port_free(s.host, s.metrics_port, "metrics", "--metrics-port (-1 turns metrics off)", "ROI_METRICS_PORT")
            self._metrics_http = MetricsHTTPServer(self.metrics.registry, s.host, s.metrics_port)
            self.metrics_port = self._metrics_http.port
        _check_port_free(s.host, s.port, "gRPC", "--port", "ROI_PORT")

        server = grpc.aio.server(interceptors=build_interceptors(s, self.service, self.oip), options=grpc_options(s))
        server.add_generic_rpc_handlers((self.service.handler(), self.shm_service.handler(), self.oip.handler()))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                roi_pb2.DESCRIPTOR.services_by_name["RoIService"].full_name,
                OIP_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        credentials = server_credentials(s)
        if credentials is None:
            self.port = server.add_insecure_port(s.bind_address)
        else:
            self.port = server.add_secure_port(s.bind_address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {s.bind_address}")
        await server.start()
        self._grpc = server
        log.info("port %d bound; loading and warming up the kernels", self.port)

        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            built, directory = await loop.run_in_executor(None, _kernels_state)
            if not built:
                await _compile_kernels(directory)
            self.engine = await loop.run_in_executor(None, _load_kernels, s)
            ops = await loop.run_in_executor(self.engine.worker, self.engine.load_and_warm_up)
        except BaseException:
            await self._close_transports(grace=0)
            raise
        if not ops:
            await self._close_transports(grace=0)
            raise RuntimeError("no op runs on this device")

        import torch

        from .engine import device_name

        device = str(self.engine.device)
        # Read before the batcher starts: it gives this thread a count of its own (see there).
        threads = self.engine.num_threads
        self.batcher = DynamicBatcher(
            self.engine,
            BatchPolicy(
                max_batch_requests=s.max_batch_requests,
                max_batch_boxes=s.max_batch_boxes,
                max_batch_bytes=s.max_batch_bytes,
                max_wait_s=s.max_wait_ms / 1000.0,
                max_queue=s.max_queue,
                inline_max_samples=s.inline_max_samples,
            ),
            self.metrics,
        )
        await self.batcher.start()
        limits = roi_pb2.Limits(
            max_message_bytes=s.max_message_bytes,
            max_boxes=s.max_boxes,
            max_output_elements=s.max_output_elements,
            max_batch_boxes=s.max_batch_boxes,
            max_batch_bytes=s.max_batch_bytes,
            max_batch_requests=s.max_batch_requests,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
        )
        info = ServerInfo(
            version=__version__,
            device=device,
            device_name=device_name(self.engine.device),
            ops=tuple(op for op in ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated", "multiscale_roi_align") if op in ops),
            torch_version=torch.__version__,
            threads=threads,
            limits=limits,
        )
        # Uploaded maps go to the device once, and stay there.
        self.features.device = self.engine.device
        if self.features.enabled:
            self._sweeper = asyncio.create_task(self._sweep_features(), name="roi-feature-sweeper")
        self.service.set_ready(self.batcher, info)
        self.metrics.set_server(
            __version__, device, self.engine.memory_allocated if self.engine.device.type == "cuda" else None
        )
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        metrics_text = f"metrics on :{self.metrics_port}" if self.metrics_port is not None else "metrics off"
        security = describe_transport(s) + (", token required" if s.auth_token or s.auth_token_file else "")
        if s.allow_shared_memory:
            security += f", shared memory on (keys {s.shared_memory_prefix}*)"
        log.info(
            "listening on %s:%d (%s; device %s, ops %s, warmed up in %.1f s), %s",
            s.host,
            self.port,
            security,
            device,
            ",".join(info.ops),
            time.perf_counter() - started,
            metrics_text,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, new calls refused, accepted requests finished (up to ``grace``
        seconds, default the settings'), then everything closed. Safe to call twice."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.grace_s if grace is None else grace
        log.info("stopping: draining accepted requests (grace %.1f s)", grace)
        await self.health.enter_graceful_shutdown()
        await self._close_transports(grace)
        if self.batcher is not None:
            await self.batcher.close()
        # After the batcher: every accepted request has run (each held its maps).
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.features.close()
        if self.engine is not None:
            self.engine.close()
        self.service.close()
        self.oip.close()
        self.shared_memory.close()
        if self._metrics_http is not None:
            self._metrics_http.close()
        log.info("stopped")
        self._stopped.set()

    async def _close_transports(self, grace: float) -> None:
        if self._grpc is None:
            return
        # First the service itself refuses new requests (UNAVAILABLE, which clients retry
        # elsewhere) while the accepted ones finish: gRPC's own stop would cancel calls that
        # had reached the server but not yet a handler. Open PoolStreams stop reading and
        # answer what they have read; health Watch streams end after sending NOT_SERVING.
        # Then the transport stops, letting responses still on their way out finish, and
        # cancelling whatever runs past ``grace``.
        started = time.monotonic()
        self.service.begin_shutdown()
        self.oip.begin_shutdown()
        try:
            await asyncio.wait_for(asyncio.gather(self.service.wait_idle(), self.oip.wait_idle()), timeout=grace)
        except TimeoutError:
            pass
        # Calls that were on their way keep arriving for a moment; they too get a clean
        # UNAVAILABLE, until the line has been quiet for QUIET_S (at most LINGER_S). Quiet
        # counts from the signal at the earliest: calls that reached the transport just
        # before it may not have been taken by the event loop yet, and gRPC's stop would
        # cancel them.
        linger_until = min(started + grace, time.monotonic() + LINGER_S)
        while time.monotonic() < linger_until and time.monotonic() - max(started, self.service.last_arrival) < QUIET_S:
            await asyncio.sleep(QUIET_S / 4)
        log.debug(
            "stopping the transport %.3f s after the signal, %.3f s after the last call arrived",
            time.monotonic() - started,
            time.monotonic() - self.service.last_arrival,
        )
        # Leases end now, with every request answered, not after the transport's grace.
        self.shm_service.end_leases()
        await self._grpc.stop(max(0.0, grace - (time.monotonic() - started)))
        if not (self.service.idle and self.oip.idle):
            log.warning("grace period over with requests still running; they were cancelled")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings, stop_signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Runs a server until one of ``stop_signals``, then drains and returns."""
    server = RoIServer(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in stop_signals:
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start())
    waiting = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done:
        starting.result()  # raises a start-up failure
        await waiting
    else:
        log.info("signal received while starting")
        starting.cancel()
        try:
            await starting
        except (asyncio.CancelledError, Exception):  # noqa: BLE001  (stopping anyway)
            pass
    for sig in stop_signals:
        loop.remove_signal_handler(sig)
    await server.stop()


class BackgroundServer:
    """A server on its own thread and event loop, for tests and benchmarks in one process::

        with BackgroundServer(Settings(port=0, metrics_port=0)) as srv:
            client = RoIClient(srv.address)
    """

    def __init__(self, settings: Settings, start_timeout: float = 600.0) -> None:
        self.settings = settings
        self.server = RoIServer(settings)
        self._start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._done: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_url(self) -> str | None:
        port = self.server.metrics_port
        return None if port is None else f"http://127.0.0.1:{port}/metrics"

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self._main, name="roi-server", daemon=True)
        self._thread.start()
        if not self._started.wait(self._start_timeout):
            raise TimeoutError("the server did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._done = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:  # noqa: BLE001  (handed to the starting thread)
                self._error = exc
                self._started.set()
                return
            self._started.set()
            await self._done.wait()
            await self.server.stop()

        asyncio.run(run())

    def stop(self, grace: float | None = None) -> None:
        loop, done = self._loop, self._done
        if loop is None or done is None or self._thread is None:
            return
        if grace is not None:
            fut = asyncio.run_coroutine_threadsafe(self.server.stop(grace), loop)
            fut.result()
        loop.call_soon_threadsafe(done.set)
        self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
