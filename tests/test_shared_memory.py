"""Same-host shared memory, against real servers on real ports: registration, its checks and
ownership, the lease that releases a dead client's regions, the registry's checks of every
reference (the window, the file's size now, regions unregistered while in use), and the
request path: every op with its tensors and result in regions, bit for bit the wire's and the
kernels', every bad reference refused naming its field, the clients' fallback to the wire,
and the load tester's --shared-memory."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import random_boxes
from test_service_support import (
    TORCH_DTYPES,
    assert_bitwise_equal,
    in_process_server,
    registry_value,
    rotated_rois,
    server_settings,
)

import roi_kernels

from roi_client import RoIError
from roi_client._proto.roi.v1 import roi_pb2
from roi_client.channel import call_metadata
from roi_client.shm import SHM_DIR, SharedMemory, SharedMemoryRegion
from roi_server.errors import InvalidArgument
from roi_server.server import BackgroundServer
from roi_server.shm import FailedPrecondition, SharedMemoryRegistry

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"no {SHM_DIR} (Linux only)")

ROOT = Path(__file__).resolve().parents[1]
TOKEN_A = "token-a-for-shared-memory-0123456789"
TOKEN_B = "token-b-for-shared-memory-9876543210"
SERVICE = "/roi.v1.RoIService"


def _rpc(channel: grpc.Channel, method: str, request, response_type, token: str | None = TOKEN_A):
    call = channel.unary_unary(f"{SERVICE}/{method}")
    try:
        raw = call(request.SerializeToString(), timeout=10, metadata=call_metadata(token))
    except grpc.RpcError as exc:
        raise RoIError.from_rpc_error(exc) from None
    return response_type.FromString(raw)


def register(channel, token=TOKEN_A, **fields) -> roi_pb2.RegisterSharedMemoryResponse:
    return _rpc(channel, "RegisterSharedMemory", roi_pb2.RegisterSharedMemoryRequest(**fields), roi_pb2.RegisterSharedMemoryResponse, token)


def status(channel, token=TOKEN_A, region="") -> list[roi_pb2.SharedMemoryRegionStatus]:
    resp = _rpc(channel, "SharedMemoryStatus", roi_pb2.SharedMemoryStatusRequest(region=region), roi_pb2.SharedMemoryStatusResponse, token)
    return list(resp.regions)


def unregister(channel, token=TOKEN_A, region="") -> int:
    resp = _rpc(
        channel, "UnregisterSharedMemory", roi_pb2.UnregisterSharedMemoryRequest(region=region), roi_pb2.UnregisterSharedMemoryResponse, token
    )
    return resp.unregistered


def refused(code: grpc.StatusCode, *words: str):
    """A context asserting a RoIError of ``code`` whose details hold every one of ``words``."""

    class Refused:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            assert isinstance(exc, RoIError), f"expected {code.name}, got {exc!r}"
            assert exc.code == code, exc
            for w in words:
                assert w in exc.details, (w, exc.details)
            self.error = exc
            return True

    return Refused()


@pytest.fixture
def region():
    with SharedMemoryRegion.create(1 << 16) as r:
        yield r


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    return path


@pytest.fixture(scope="module")
def shm_server(tokens_file):
    with in_process_server(allow_shared_memory=True, auth_token_file=str(tokens_file)) as srv:
        yield srv


@pytest.fixture
def channel(shm_server):
    with grpc.insecure_channel(shm_server.address) as ch:
        yield ch
    # Every test leaves the server as it found it.
    with grpc.insecure_channel(shm_server.address) as ch:
        for token in (TOKEN_A, TOKEN_B):
            unregister(ch, token)


# ---------------------------------------------------------------------------------------------
# Registration


def test_register_status_unregister(shm_server, channel, region):
    before = registry_value(shm_server, "roi_shared_memory_mapped_bytes")
    register(channel, region="maps", key=region.key, byte_size=4096, offset=8192)
    register(channel, region="all", key=region.key, byte_size=region.size)
    got = status(channel)
    assert [(r.region, r.key, r.offset, r.byte_size, r.lease, r.file_size) for r in got] == [
        ("all", region.key, 0, region.size, "", region.size),
        ("maps", region.key, 8192, 4096, "", region.size),
    ]
    assert [r.region for r in status(channel, region="maps")] == ["maps"]
    assert registry_value(shm_server, "roi_shared_memory_regions") == 2
    assert registry_value(shm_server, "roi_shared_memory_mapped_bytes") == before + 4096 + region.size

    with refused(grpc.StatusCode.ALREADY_EXISTS, "'maps'"):
        register(channel, region="maps", key=region.key, byte_size=16)
    assert unregister(channel, region="maps") == 1
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "region: no region 'maps' is registered"):
        unregister(channel, region="maps")
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "region: no region 'maps' is registered"):
        status(channel, region="maps")
    assert unregister(channel) == 1
    assert status(channel) == []
    assert registry_value(shm_server, "roi_shared_memory_regions") == 0
    assert registry_value(shm_server, "roi_shared_memory_mapped_bytes") == before


@pytest.mark.parametrize(
    "fields, code, words",
    [
        (dict(key="other_x"), grpc.StatusCode.INVALID_ARGUMENT, ["key:", "'roi_'", "'other_x'"]),
        (dict(key="roi_a/b"), grpc.StatusCode.INVALID_ARGUMENT, ["key:", "'/'"]),
        (dict(key="roi_..x"), grpc.StatusCode.INVALID_ARGUMENT, ["key:", "'..'"]),
        (dict(key="roi_a\0b"), grpc.StatusCode.INVALID_ARGUMENT, ["key:", "NUL"]),
        (dict(key=""), grpc.StatusCode.INVALID_ARGUMENT, ["key: must not be empty"]),
        (dict(key="roi_not_there_at_all"), grpc.StatusCode.INVALID_ARGUMENT, ["key:", "no shared memory object 'roi_not_there_at_all' on this host"]),
        (dict(region=""), grpc.StatusCode.INVALID_ARGUMENT, ["region: must not be empty"]),
        (dict(byte_size=0), grpc.StatusCode.INVALID_ARGUMENT, ["byte_size: must be positive"]),
        (dict(byte_size=(1 << 16) + 1), grpc.StatusCode.INVALID_ARGUMENT, ["byte_size:", "past the end", "65536 bytes"]),
        (dict(offset=4096, byte_size=(1 << 16) - 4095), grpc.StatusCode.INVALID_ARGUMENT, ["byte_size:", "past the end"]),
        (dict(lease="0123"), grpc.StatusCode.INVALID_ARGUMENT, ["lease:", "no lease '0123'"]),
    ],
)
def test_bad_registrations_name_the_field(shm_server, channel, region, fields, code, words):
    request = dict(region="r", key=region.key, byte_size=1024)
    request.update(fields)
    with refused(code, *words):
        register(channel, **request)
    assert status(channel) == []
    # The server keeps serving.
    register(channel, region="ok", key=region.key, byte_size=1024)
    assert [r.region for r in status(channel)] == ["ok"]


def test_a_symbolic_link_or_another_file_type_is_not_followed(shm_server, channel, tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 8192)
    link = Path(SHM_DIR) / f"roi_link_{os.getpid()}"
    link.symlink_to(target)
    folder = Path(SHM_DIR) / f"roi_dir_{os.getpid()}"
    folder.mkdir()
    try:
        with refused(grpc.StatusCode.INVALID_ARGUMENT, "key:", link.name, "symbolic link"):
            register(channel, region="r", key=link.name, byte_size=16)
        with refused(grpc.StatusCode.INVALID_ARGUMENT, "key:", folder.name, "not a shared memory object"):
            register(channel, region="r", key=folder.name, byte_size=16)
    finally:
        link.unlink()
        folder.rmdir()
    assert status(channel) == []


def test_regions_belong_to_their_token(shm_server, channel, region):
    register(channel, region="mine", key=region.key, byte_size=1024)
    # Another token sees none of them, cannot unregister them, and cannot map the same object.
    assert status(channel, TOKEN_B) == []
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "region: no region 'mine' is registered"):
        unregister(channel, TOKEN_B, region="mine")
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "no region 'mine'"):
        status(channel, TOKEN_B, region="mine")
    assert unregister(channel, TOKEN_B) == 0
    with refused(grpc.StatusCode.PERMISSION_DENIED, "key:", "another caller"):
        register(channel, TOKEN_B, region="theirs", key=region.key, byte_size=1024)
    # Its own name space: the same name is free for it.
    with SharedMemoryRegion.create(4096) as other:
        register(channel, TOKEN_B, region="mine", key=other.key, byte_size=4096)
        assert [r.key for r in status(channel, TOKEN_B)] == [other.key]
    assert [r.key for r in status(channel)] == [region.key]
    # A lease is its holder's only.
    manager = SharedMemory(channel, call_metadata(TOKEN_A))
    try:
        assert manager.borrow(10) is not None
        with refused(grpc.StatusCode.INVALID_ARGUMENT, "lease:", "no lease"):
            register(channel, TOKEN_B, region="x", key=region.key, byte_size=16, lease=manager.lease)
    finally:
        manager.close()
    # Without a token nothing at all.
    with refused(grpc.StatusCode.UNAUTHENTICATED):
        status(channel, None)


def test_shared_memory_off_by_default_says_how_to_turn_it_on(region, caplog):
    with in_process_server() as srv, grpc.insecure_channel(srv.address) as ch:
        for call in (
            lambda: register(ch, None, region="r", key=region.key, byte_size=16),
            lambda: status(ch, None),
            lambda: unregister(ch, None),
        ):
            with refused(grpc.StatusCode.FAILED_PRECONDITION, "shared memory is off", "--allow-shared-memory", "ROI_ALLOW_SHARED_MEMORY"):
                call()
        # The client's manager falls back (logging it once) instead of failing.
        manager = SharedMemory(ch)
        with caplog.at_level(logging.WARNING, logger="roi_client.shm"):
            assert manager.borrow(1 << 20) is None
            assert manager.borrow(1 << 20) is None
        assert not manager.available
        warnings = [r for r in caplog.records if r.name == "roi_client.shm"]
        assert len(warnings) == 1 and "--allow-shared-memory" in warnings[0].getMessage()
        manager.close()
        assert registry_value(srv, "roi_shared_memory_regions") == 0


# ---------------------------------------------------------------------------------------------
# Leases


def test_the_client_manager_registers_under_a_lease_and_releases_on_close(shm_server, channel):
    manager = SharedMemory(channel, call_metadata(TOKEN_A))
    small = manager.borrow(1000)
    large = manager.borrow(3 << 20)
    assert small is not None and large is not None and small.size == 1 << 20 and large.size == 3 << 20
    regions = {r.region: r for r in status(channel)}
    assert set(regions) == {small.name, large.name}
    assert {r.lease for r in regions.values()} == {manager.lease} and manager.lease
    # A region given back is reused, not registered again.
    manager.give_back(small)
    assert manager.borrow(500) is small
    assert len(status(channel)) == 2
    manager.close()
    assert status(channel) == []
    assert not (Path(SHM_DIR) / small.key).exists() and not (Path(SHM_DIR) / large.key).exists()


def test_the_asyncio_manager_shares_one_lease_among_concurrent_first_requests(shm_server, channel):
    import asyncio

    from roi_client.shm import AsyncSharedMemory

    async def main() -> tuple[set[str], list, list]:
        async with grpc.aio.insecure_channel(shm_server.address) as ch:
            manager = AsyncSharedMemory(ch, call_metadata(TOKEN_A))
            regions = await asyncio.gather(*(manager.borrow(n << 20) for n in (1, 2, 3)))
            seen = await manager.status()
            await manager.close()
            return {r.name for r in regions}, seen, await AsyncSharedMemory(ch, call_metadata(TOKEN_A)).status()

    names, seen, after = asyncio.run(main())
    assert {r.region for r in seen} == names and len(names) == 3
    assert len({r.lease for r in seen}) == 1
    assert after == [] and status(channel) == []


def test_ending_the_lease_call_releases_its_regions(shm_server, channel, region):
    hold = channel.unary_stream(f"{SERVICE}/HoldSharedMemory")
    call = hold(b"", metadata=call_metadata(TOKEN_A))
    lease = roi_pb2.HoldSharedMemoryResponse.FromString(next(call)).lease
    register(channel, region="leased", key=region.key, byte_size=1024, lease=lease)
    register(channel, region="kept", key=region.key, byte_size=1024)
    assert {r.region for r in status(channel)} == {"leased", "kept"}
    call.cancel()
    _wait_for(lambda: [r.region for r in status(channel)] == ["kept"], "the leased region to go")
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "lease:"):
        register(channel, region="late", key=region.key, byte_size=1024, lease=lease)


CLIENT = textwrap.dedent(
    """
    import sys, time
    import grpc
    from roi_client.channel import call_metadata
    from roi_client.shm import SharedMemory

    channel = grpc.insecure_channel(sys.argv[1])
    manager = SharedMemory(channel, call_metadata(sys.argv[2]))
    regions = [manager.borrow(n) for n in (1 << 20, 5 << 20)]
    print(" ".join(r.key for r in regions), flush=True)
    time.sleep(600)
    """
)


def test_a_killed_client_process_has_its_regions_released(shm_server, channel):
    before = registry_value(shm_server, "roi_shared_memory_mapped_bytes")
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, shm_server.address, TOKEN_A], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    keys = []
    try:
        keys = proc.stdout.readline().split()
        assert len(keys) == 2, "the client did not register its regions"
        assert {r.key for r in status(channel)} == set(keys)
        assert registry_value(shm_server, "roi_shared_memory_regions") == 2
        assert registry_value(shm_server, "roi_shared_memory_mapped_bytes") == before + (6 << 20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _wait_for(lambda: status(channel) == [], "the dead client's regions to be released")
        assert registry_value(shm_server, "roi_shared_memory_regions") == 0
        assert registry_value(shm_server, "roi_shared_memory_mapped_bytes") == before
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for key in keys:  # a killed process cannot unlink what it made
            (Path(SHM_DIR) / key).unlink(missing_ok=True)


def test_stopping_the_server_ends_leases_at_once():
    server = BackgroundServer(server_settings(allow_shared_memory=True, grace_s=20.0)).start()
    with grpc.insecure_channel(server.address) as ch:
        manager = SharedMemory(ch)
        try:
            assert manager.borrow(100) is not None
        except BaseException:
            server.stop()
            raise
        started = time.monotonic()
        server.stop()
        # Not the transport's 20 s grace, waiting for the lease's call.
        assert time.monotonic() - started < 10
        assert registry_value(server, "roi_shared_memory_regions") == 0
        manager.close()


def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The registry's checks of references (what the request path calls)


def ref(region: str, offset: int, byte_size: int) -> roi_pb2.SharedMemoryRef:
    return roi_pb2.SharedMemoryRef(region=region, offset=offset, byte_size=byte_size)


def test_views_read_and_write_the_client_region(region):
    registry = SharedMemoryRegistry(True, "roi_")
    registry.register("", "r", region.key, 4096, 8192)
    region.write(np.arange(16, dtype=np.float32), offset=4096 + 64)
    view = registry.view("", ref("r", 64, 64), "input.shared_memory")
    assert view.readonly and np.array_equal(np.frombuffer(view, np.float32), np.arange(16, dtype=np.float32))
    out = registry.output_view("", ref("r", 1024, 128), 64, "output_region")
    assert not out.readonly and len(out) == 64
    np.frombuffer(out, np.float32)[:] = 7
    assert np.all(region.array(np.float32, (16,), 4096 + 1024) == 7)
    registry.close()


def test_references_are_checked_against_the_window_and_the_file(region):
    registry = SharedMemoryRegistry(True, "roi_")
    registry.register("a", "r", region.key, 0, 8192)
    with pytest.raises(InvalidArgument, match=r"^input.shared_memory.region: no region 'x' is registered$"):
        registry.view("a", ref("x", 0, 4), "input.shared_memory")
    with pytest.raises(InvalidArgument, match=r"no region 'r' is registered"):
        registry.view("b", ref("r", 0, 4), "input.shared_memory")  # another owner's
    with pytest.raises(InvalidArgument, match=r"^pyramid.levels\[1\].map.shared_memory: offset 8000 \+ byte_size 400 is past the end of region 'r' \(8192 bytes\)$"):
        registry.view("a", ref("r", 8000, 400), "pyramid.levels[1].map.shared_memory")
    with pytest.raises(InvalidArgument, match=r"^output_region.byte_size: 16 bytes are too few for the output \(64 bytes\) in region 'r'$"):
        registry.output_view("a", ref("r", 0, 16), 64, "output_region")
    # The client shrinks its object after registration: refused, not a SIGBUS.
    os.truncate(Path(SHM_DIR) / region.key, 4096)
    with pytest.raises(FailedPrecondition, match=r"input.shared_memory.region: region 'r' needs 8192 bytes .* now holds 4096"):
        registry.view("a", ref("r", 0, 4), "input.shared_memory")
    registry.close()
    off = SharedMemoryRegistry(False, "roi_")
    with pytest.raises(FailedPrecondition, match=r"^input.shared_memory: shared memory is off on this server: start the server with --allow-shared-memory"):
        off.view("a", ref("r", 0, 4), "input.shared_memory")


def test_a_region_unregistered_while_in_use_stays_mapped_until_released(region):
    from roi_server.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    registry = SharedMemoryRegistry(True, "roi_", metrics)
    registry.register("", "r", region.key, 0, region.size)
    region.write(np.full(8, 3.0, np.float64))
    view = registry.view("", ref("r", 0, 64), "input.shared_memory")
    arr = np.frombuffer(view, np.float64)
    del view
    assert registry.unregister("", "r") == 1
    assert metrics.registry.get_sample_value("roi_shared_memory_regions") == 0
    # Still mapped, still counted, still readable: the request holding it finishes.
    assert metrics.registry.get_sample_value("roi_shared_memory_mapped_bytes") == region.size
    assert np.all(arr == 3.0)
    with pytest.raises(InvalidArgument, match="no region 'r'"):
        registry.view("", ref("r", 0, 64), "input.shared_memory")
    del arr
    assert metrics.registry.get_sample_value("roi_shared_memory_mapped_bytes") == 0


# ---------------------------------------------------------------------------------------------
# Settings


def test_the_switch_and_the_prefix_from_flags_and_variables():
    from roi_server.settings import Settings, build_parser, load_settings

    assert load_settings([], {}).allow_shared_memory is False
    assert load_settings(["--allow-shared-memory"], {}).allow_shared_memory is True
    for value, want in (("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False)):
        assert load_settings([], {"ROI_ALLOW_SHARED_MEMORY": value}).allow_shared_memory is want
    with pytest.raises(ValueError, match="ROI_ALLOW_SHARED_MEMORY: cannot read 'maybe'"):
        load_settings([], {"ROI_ALLOW_SHARED_MEMORY": "maybe"})
    assert load_settings(["--shared-memory-prefix", "det_"], {}).shared_memory_prefix == "det_"
    for bad in ("a/b", ".x"):
        with pytest.raises(ValueError, match="shared_memory_prefix: must be a plain file name start"):
            load_settings(["--shared-memory-prefix", bad], {})
    # An empty prefix would admit every object under /dev/shm.
    with pytest.raises(ValueError, match="shared_memory_prefix: must not be empty"):
        Settings(shared_memory_prefix="")
    help_text = build_parser().format_help()
    assert "--allow-shared-memory" in help_text and "default off" in help_text


def test_a_token_file_holds_one_token_a_line(tmp_path):
    from roi_server.settings import Settings

    path = tmp_path / "tokens"
    path.write_text(f"\n{TOKEN_A}\n  {TOKEN_B}  \n\n")
    assert Settings(auth_token_file=str(path)).bearer_tokens() == (TOKEN_A, TOKEN_B)
    path.write_text(f"{TOKEN_A}\nnot a token\n")
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        Settings(auth_token_file=str(path))
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="the token is empty"):
        Settings(auth_token_file=str(path))


# ---------------------------------------------------------------------------------------------
# Compose: what a co-located client container needs


def test_compose_lets_a_co_located_client_share_the_servers_dev_shm():
    from test_deploy_static import COMPOSE_BASE, compose_config

    services = compose_config(COMPOSE_BASE, profiles=("shared-memory",))["services"]
    server, client = services["roi-server"], services["backbone"]
    assert server["ipc"] == "shareable"
    assert client["ipc"] == "service:roi-server"
    # Room for an fpn-det request's tensors (Docker's default /dev/shm is 64 MB).
    size = server["shm_size"]
    assert (int(size) if isinstance(size, int) else int(str(size).rstrip("gb")) << 30) >= 1 << 30
    env = server["environment"]
    assert env["ROI_ALLOW_SHARED_MEMORY"] == "1"
    # The client makes its regions as the server's user, named with the server's prefix.
    assert client["user"].split(":")[0] == "10001"
    assert env["ROI_SHARED_MEMORY_PREFIX"] == "roi_" == SharedMemoryRegion.create.__defaults__[0]
    assert "shared_memory=True" in " ".join(client["command"])
    assert client["depends_on"]["roi-server"]["condition"] == "service_healthy"
    # A plain `up` does not start it.
    assert client["profiles"] == ["shared-memory"]


# ---------------------------------------------------------------------------------------------
# The request path: tensors and results in regions


def _op_arguments(op: str, gen: torch.Generator, dtype: str) -> tuple[tuple, dict]:
    """Random arguments of ``op`` (roi_kernels' positional ones, as torch tensors in ``dtype``;
    "ragged" is roi_align over per-image maps with per-image boxes), and what the op methods
    take on top."""
    td = TORCH_DTYPES[dtype]
    maps = lambda *shape: torch.randn(*shape, generator=gen).to(td)  # noqa: E731
    boxes = random_boxes(gen, 24, 256, 320, num_images=2, max_side=256)
    if op == "roi_align":
        return (maps(2, 12, 16, 20), boxes, (7, 5), 1 / 16, 2, True), {}
    if op == "roi_pool":
        return (maps(2, 12, 16, 20), boxes, 6, 1 / 16), {}
    if op in ("ps_roi_align", "ps_roi_pool"):
        extra = (2,) if op == "ps_roi_align" else ()
        return (maps(2, 27, 16, 20), boxes, 3, 1 / 16, *extra), {}
    if op == "roi_align_rotated":
        return (maps(2, 12, 16, 20), rotated_rois(gen, 24, 256, 320, 2), 5, 1 / 16, 2, True), {}
    if op == "multiscale_roi_align":
        levels = [maps(2, 8, 256 // s, 320 // s) for s in (4, 8, 16, 32)]
        return (levels, boxes, [(256, 320)] * 2, 7, 2, True), {}
    assert op == "ragged"
    sizes = [(9, 14), (16, 11), (12, 20)]
    per_image = [random_boxes(gen, 6, h * 16, w * 16)[:, 1:] for h, w in sizes]
    return ([maps(10, h, w) for h, w in sizes], per_image, 4, 1 / 16, 2, True), {}


def _as_numpy(args: tuple, dtype: str) -> tuple[tuple, dict]:
    """The arguments as numpy arrays (bfloat16: float32 arrays sent as bfloat16)."""

    def convert(x):
        if isinstance(x, torch.Tensor):
            return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            return [convert(t) for t in x]
        return x

    return tuple(convert(a) for a in args), {"wire_dtype": dtype}


def _method(op: str) -> str:
    return "roi_align" if op == "ragged" else op


class Spy:
    """Records the requests a client sends through ``pool_with_timings``."""

    def __init__(self, client) -> None:
        self.requests: list = []
        send = client.pool_with_timings

        def spied(request, **kwargs):
            self.requests.append(request)
            return send(request, **kwargs)

        client.pool_with_timings = spied

    def messages(self) -> list[roi_pb2.PoolRequest]:
        return [roi_pb2.PoolRequest.FromString(r.payload) for r in self.requests]


def _all_tensors(req: roi_pb2.PoolRequest) -> list[roi_pb2.Tensor]:
    from roi_server.codec import _tensors

    return list(_tensors(req))


@pytest.fixture
def shm_client(shm_server):
    from roi_client import RoIClient

    # Every tensor, boxes included, and every result in a region.
    with RoIClient(shm_server.address, token=TOKEN_A, shared_memory=True, shared_memory_min_bytes=0) as client:
        yield client


@pytest.fixture
def wire_client(shm_server):
    from roi_client import RoIClient

    with RoIClient(shm_server.address, token=TOKEN_A) as client:
        yield client


SHM_OPS = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated", "multiscale_roi_align", "ragged")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("op", SHM_OPS)
def test_every_op_through_shared_memory_equals_the_wire_and_the_kernels(shm_client, wire_client, channel, op, dtype):
    gen = torch.Generator().manual_seed(hash((op, dtype)) % 1000)
    args, _ = _op_arguments(op, gen, dtype)
    reference = getattr(roi_kernels, _method(op))(*args)
    want = (reference.float() if reference.dtype == torch.bfloat16 else reference).numpy()
    np_args, options = _as_numpy(args, dtype)
    spy = Spy(shm_client)
    got = getattr(shm_client, _method(op))(*np_args, **options)
    wire = getattr(wire_client, _method(op))(*np_args, **options)
    assert_bitwise_equal(got, want)
    assert_bitwise_equal(wire, want)
    # Every tensor went as a reference, and the result was asked into the same region.
    (request,) = spy.requests
    (message,) = spy.messages()
    assert all(t.WhichOneof("contents") == "shared_memory" for t in _all_tensors(message))
    assert message.output_region.region == request.output_region.name
    if dtype != "bfloat16":  # a bfloat16 result is widened to float32: a copy
        assert np.shares_memory(got, np.frombuffer(request.output_region.buffer, np.uint8))
        assert not got.flags.writeable
    # torch in, torch out: a copy the caller may write, bit for bit the same.
    out = getattr(shm_client, _method(op))(*args)
    assert isinstance(out, torch.Tensor) and out.dtype == reference.dtype
    assert_bitwise_equal(out, reference)
    out.add_(1)


def test_a_result_keeps_its_region_until_it_goes(shm_client, channel):
    gen = torch.Generator().manual_seed(1)
    args, options = _as_numpy(_op_arguments("roi_align", gen, "float32")[0], "float32")
    spy = Spy(shm_client)
    first = shm_client.roi_align(*args, **options)
    held = spy.requests[-1].output_region
    second = shm_client.roi_align(*args, **options)
    # The first result still views its region: the second call had another one.
    assert spy.requests[-1].output_region is not held
    assert_bitwise_equal(first, second)
    view = first[1:3]
    del first, second
    gc.collect()
    shm_client.roi_align(*args, **options)
    # A view of the first result still holds its region.
    assert spy.requests[-1].output_region is not held
    del view
    gc.collect()
    shm_client.roi_align(*args, **options)
    shm_client.roi_align(*args, **options)
    assert held in {r.output_region for r in spy.requests[-2:]}
    # The regions are the client's, under its lease; closing it releases them.
    assert {r.lease for r in status(channel)} == {shm_client.shared_memory.lease}
    shm_client.close()
    assert status(channel) == []


def test_small_tensors_travel_in_the_message(shm_server, channel):
    from roi_client import RoIClient

    x = np.random.default_rng(0).standard_normal((2, 64, 32, 32)).astype(np.float32)  # 512 KiB
    boxes = np.array([[0, 1, 2, 100, 120], [1, 10, 20, 200, 230]], np.float32)
    with RoIClient(shm_server.address, token=TOKEN_A, shared_memory=True) as client:
        spy = Spy(client)
        small_out = client.roi_align(x, boxes, 7, 1 / 16)
        big_out = client.roi_align(x, np.tile(boxes, (64, 1)), 7, 1 / 16)
        small, big = spy.messages()
        assert small.input.WhichOneof("contents") == "shared_memory"
        assert small.boxes.rois.WhichOneof("contents") == "data"
        assert not small.HasField("output_region")  # 2 x 64 x 7 x 7 floats: 25 KB
        assert big.HasField("output_region")  # 128 x 64 x 7 x 7 floats: 1.6 MB
        assert_bitwise_equal(big_out[:2], small_out)


def test_the_servers_maps_are_views_of_the_region(region):
    from roi_client import RequestDraft
    from roi_server.codec import Limits, decode_request

    registry = SharedMemoryRegistry(True, "roi_")
    registry.register("me", region.name, region.key, 0, region.size)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    boxes = np.array([[0, 1, 2, 60, 70], [1, 10, 20, 80, 90]], np.float32)
    draft = RequestDraft.roi_align(x, boxes, 2)
    request = draft.encode_into(region, 0)
    limits = Limits(100, 1 << 20, 1 << 26)
    decoded = decode_request(roi_pb2.PoolRequest.FromString(request.payload), limits, None, None, registry, "me")
    mapping = np.frombuffer(registry.view("me", ref(region.name, 0, region.size), "all"), np.uint8)
    assert np.shares_memory(decoded.maps[0].numpy(), mapping)
    assert np.array_equal(decoded.maps[0].numpy(), x)
    assert decoded.output_view is not None and np.shares_memory(np.frombuffer(decoded.output_view, np.uint8), mapping)
    decoded.release()
    assert decoded.output_view is None
    # Off an element boundary the map is copied once, to aligned memory.
    message = roi_pb2.PoolRequest.FromString(request.payload)
    region.write(np.frombuffer(x.tobytes(), np.uint8), offset=8192 + 2)
    message.input.shared_memory.offset = 8192 + 2
    decoded = decode_request(message, limits, None, None, registry, "me")
    assert not np.shares_memory(decoded.maps[0].numpy(), mapping) and np.array_equal(decoded.maps[0].numpy(), x)
    # Without a registry (or with shared memory off) a reference is refused.
    with pytest.raises(FailedPrecondition, match=r"^input.shared_memory: shared memory is off"):
        decode_request(message, limits, None, None)
    with pytest.raises(InvalidArgument, match=r"^input.shared_memory.region: no region"):
        decode_request(message, limits, None, None, registry, "someone else")
    del decoded, mapping
    registry.close()


def _raw_pool(channel, payload: bytes, token: str | None = TOKEN_A) -> roi_pb2.PoolResponse:
    call = channel.unary_unary(f"{SERVICE}/Pool")
    try:
        return roi_pb2.PoolResponse.FromString(call(payload, timeout=30, metadata=call_metadata(token)))
    except grpc.RpcError as exc:
        raise RoIError.from_rpc_error(exc) from None


def _good_request(region: SharedMemoryRegion):
    """A roi_align request with its maps, boxes and result in ``region`` (registered under its
    name) and its expected result."""
    from roi_client import RequestDraft

    x = np.random.default_rng(3).standard_normal((2, 8, 16, 16)).astype(np.float32)
    boxes = np.array([[0, 1, 2, 100, 120], [1, 10, 20, 200, 230], [1, 0, 0, 255, 255]], np.float32)
    want = roi_kernels.roi_align(torch.from_numpy(x), torch.from_numpy(boxes), 3, 1 / 16, 2).numpy()
    request = RequestDraft.roi_align(x, boxes, 3, 1 / 16, 2).encode_into(region, 0)
    return request, want


def _check_good(channel, region: SharedMemoryRegion, token: str = TOKEN_A) -> None:
    request, want = _good_request(region)
    resp = _raw_pool(channel, request.payload, token)
    out = resp.output.shared_memory
    assert out.region == region.name and out.offset == request.output_offset and out.byte_size == want.nbytes
    assert not resp.output.data
    assert_bitwise_equal(region.array(np.float32, want.shape, out.offset), want)


BAD_REFERENCES = {
    "unknown region": (
        lambda m: setattr(m.input.shared_memory, "region", "nope"),
        grpc.StatusCode.INVALID_ARGUMENT, "input.shared_memory.region: no region 'nope' is registered",
    ),
    "offset past the end": (
        lambda m: setattr(m.input.shared_memory, "offset", (1 << 16) - 64),
        grpc.StatusCode.INVALID_ARGUMENT, "input.shared_memory: offset 65472 + byte_size 16384 is past the end of region",
    ),
    "size past the end": (
        lambda m: setattr(m.boxes.rois.shared_memory, "byte_size", 1 << 16),
        grpc.StatusCode.INVALID_ARGUMENT, "boxes.rois.shared_memory: offset",
    ),
    "size not the tensor's": (
        lambda m: setattr(m.input.shared_memory, "byte_size", 1024),
        grpc.StatusCode.INVALID_ARGUMENT, "input.shared_memory.byte_size: 1024 bytes do not match shape [2, 8, 16, 16]",
    ),
    "output region too small": (
        lambda m: setattr(m.output_region, "byte_size", 16),
        grpc.StatusCode.INVALID_ARGUMENT, "output_region.byte_size: 16 bytes are too few for the output (864 bytes)",
    ),
    "output region unknown": (
        lambda m: setattr(m.output_region, "region", "elsewhere"),
        grpc.StatusCode.INVALID_ARGUMENT, "output_region.region: no region 'elsewhere' is registered",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REFERENCES))
def test_every_bad_reference_names_its_field_and_the_server_keeps_serving(shm_server, channel, region, case):
    spoil, code, words = BAD_REFERENCES[case]
    register(channel, region=region.name, key=region.key, byte_size=region.size)
    request, _ = _good_request(region)
    message = roi_pb2.PoolRequest.FromString(request.payload)
    spoil(message)
    with refused(code, words):
        _raw_pool(channel, message.SerializeToString())
    _check_good(channel, region)


def test_a_region_truncated_unregistered_or_another_tokens_is_refused(shm_server, channel, region):
    register(channel, region=region.name, key=region.key, byte_size=region.size)
    request, _ = _good_request(region)
    # Another token's region does not exist for it.
    with SharedMemoryRegion.create(1 << 16) as theirs:
        register(channel, TOKEN_B, region=theirs.name, key=theirs.key, byte_size=theirs.size)
        _check_good(channel, theirs, TOKEN_B)
    with refused(grpc.StatusCode.INVALID_ARGUMENT, f"input.shared_memory.region: no region {region.name!r} is registered"):
        _raw_pool(channel, request.payload, TOKEN_B)
    # Truncated after registration: refused, not a SIGBUS.
    os.truncate(Path(SHM_DIR) / region.key, 4096)
    with refused(grpc.StatusCode.FAILED_PRECONDITION, "input.shared_memory.region:", "truncated after registration"):
        _raw_pool(channel, request.payload)
    os.truncate(Path(SHM_DIR) / region.key, region.size)
    _check_good(channel, region)
    # Unregistered between its registration and the request.
    unregister(channel, region=region.name)
    with refused(grpc.StatusCode.INVALID_ARGUMENT, f"input.shared_memory.region: no region {region.name!r} is registered"):
        _raw_pool(channel, request.payload)
    register(channel, region=region.name, key=region.key, byte_size=region.size)
    _check_good(channel, region)


def test_a_reference_to_a_server_with_shared_memory_off_is_failed_precondition(region):
    request, want = _good_request(region)
    with in_process_server() as srv, grpc.insecure_channel(srv.address) as ch:
        with refused(grpc.StatusCode.FAILED_PRECONDITION, "input.shared_memory: shared memory is off", "--allow-shared-memory"):
            _raw_pool(ch, request.payload, None)
        message = roi_pb2.PoolRequest.FromString(request.payload)
        message.input.data = np.random.default_rng(3).standard_normal((2, 8, 16, 16)).astype(np.float32).tobytes()
        message.boxes.rois.data = region.array(np.float32, (3, 5), message.boxes.rois.shared_memory.offset).tobytes()
        with refused(grpc.StatusCode.FAILED_PRECONDITION, "output_region: shared memory is off"):
            _raw_pool(ch, message.SerializeToString(), None)
        message.ClearField("output_region")
        assert_bitwise_equal(np.frombuffer(_raw_pool(ch, message.SerializeToString(), None).output.data, np.float32).reshape(want.shape), want)


def test_one_bad_reference_in_a_batch_leaves_the_others_unaffected(shm_server, channel):
    from roi_client import RoIClient

    regions = [SharedMemoryRegion.create(1 << 16) for _ in range(6)]
    try:
        requests, wants = [], []
        for i, r in enumerate(regions):
            register(channel, region=r.name, key=r.key, byte_size=r.size)
            request, want = _good_request(r)
            requests.append(request.with_id(f"r{i}"))
            wants.append(want)
        bad = roi_pb2.PoolRequest.FromString(requests[2].payload)
        bad.input.shared_memory.region = "gone"
        requests[2] = replace(requests[2], payload=bad.SerializeToString())
        with RoIClient(shm_server.address, token=TOKEN_A) as client:
            answers = {r.id: r for r in client.pool_stream(requests)}
        assert set(answers) == {f"r{i}" for i in range(6)}
        assert answers["r2"].error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "input.shared_memory.region: no region 'gone'" in answers["r2"].error.details
        for i, (r, want) in enumerate(zip(regions, wants)):
            if i != 2:
                got = answers[f"r{i}"].output
                assert_bitwise_equal(got, want)
                assert np.shares_memory(got, np.frombuffer(r.buffer, np.uint8))
    finally:
        for r in regions:
            r.close()


def test_a_failed_call_does_not_reuse_its_region(shm_client, channel):
    gen = torch.Generator().manual_seed(2)
    (x, boxes, *rest), options = _as_numpy(_op_arguments("roi_align", gen, "float32")[0], "float32")
    boxes = boxes.copy()
    boxes[3, 0] = 7  # an image index past the batch
    spy = Spy(shm_client)
    with pytest.raises(RoIError, match="box 3 has image index 7"):
        shm_client.roi_align(x, boxes, *rest, **options)
    failed = spy.requests[-1].output_region
    # Dropped (unregistered and unlinked), not put back in the pool.
    assert status(channel) == [] and not (Path(SHM_DIR) / failed.key).exists()
    boxes[3, 0] = 1
    shm_client.roi_align(x, boxes, *rest, **options)
    assert spy.requests[-1].output_region is not failed


def test_the_client_falls_back_to_the_wire_when_the_server_refuses(caplog):
    from roi_client import RoIClient

    torch_args = _op_arguments("roi_align", torch.Generator().manual_seed(4), "float32")[0]
    args, options = _as_numpy(torch_args, "float32")
    want = roi_kernels.roi_align(*torch_args).numpy()
    with in_process_server() as srv, RoIClient(srv.address, shared_memory=True, shared_memory_min_bytes=0) as client:
        with caplog.at_level(logging.WARNING, logger="roi_client.shm"):
            for _ in range(3):
                assert_bitwise_equal(client.roi_align(*args, **options), want)
        assert not client.shared_memory.available
        warnings = [r for r in caplog.records if r.name == "roi_client.shm"]
        assert len(warnings) == 1 and "--allow-shared-memory" in warnings[0].getMessage()
    # A server that turns it off under a lease (it restarted without it): the request is
    # refused, and the client resends it on the wire.
    caplog.clear()
    with in_process_server(allow_shared_memory=True) as srv, RoIClient(
        srv.address, shared_memory=True, shared_memory_min_bytes=0
    ) as client:
        assert_bitwise_equal(client.roi_align(*args, **options), want)
        srv.server.shared_memory.enabled = False
        with caplog.at_level(logging.WARNING, logger="roi_client.shm"):
            for _ in range(2):
                assert_bitwise_equal(client.roi_align(*args, **options), want)
        assert not client.shared_memory.available
        assert len([r for r in caplog.records if r.name == "roi_client.shm"]) == 1
        srv.server.shared_memory.enabled = True


def test_shared_memory_is_for_one_server():
    from roi_client import AsyncRoIClient, RoIClient

    for cls in (RoIClient, AsyncRoIClient):
        with pytest.raises(RoIError, match="shared_memory: needs one server"):
            cls(["127.0.0.1:1", "127.0.0.1:2"], shared_memory=True)
    with RoIClient(["127.0.0.1:1"], shared_memory=True) as client:
        assert client.shared_memory is not None
    with RoIClient("127.0.0.1:1") as client:
        assert client.shared_memory is None


def test_the_asyncio_client_through_shared_memory(shm_server, channel, caplog):
    import asyncio

    from roi_client import AsyncRoIClient

    gen = torch.Generator().manual_seed(5)
    torch_args = _op_arguments("multiscale_roi_align", gen, "float16")[0]
    args, options = _as_numpy(torch_args, "float16")
    want = roi_kernels.multiscale_roi_align(*torch_args)

    async def main(address, token):
        async with AsyncRoIClient(address, token=token, shared_memory=True, shared_memory_min_bytes=0) as client:
            spy = Spy(client)
            outs = await asyncio.gather(*(client.multiscale_roi_align(*args, **options) for _ in range(3)))
            regions = [r.output_region for r in spy.requests]
            tensor = await client.multiscale_roi_align(*torch_args)
            seen = await client.shared_memory.status() if client.shared_memory.available else []
            return outs, regions, tensor, seen, client.shared_memory.available

    outs, regions, tensor, seen, available = asyncio.run(main(shm_server.address, TOKEN_A))
    assert available and len({r.name for r in regions}) == 3 and len(seen) >= 3
    for out, region in zip(outs, regions):
        assert_bitwise_equal(out, want.numpy())
        assert np.shares_memory(out, np.frombuffer(region.buffer, np.uint8))
    assert_bitwise_equal(tensor, want)
    assert status(channel) == []  # closed: every region unregistered
    with in_process_server() as srv, caplog.at_level(logging.WARNING, logger="roi_client.shm"):
        outs, regions, tensor, _, available = asyncio.run(main(srv.address, None))
    assert not available and regions == [None] * 3
    for out in outs:
        assert_bitwise_equal(out, want.numpy())
    assert len([r for r in caplog.records if r.name == "roi_client.shm"]) == 1


def test_the_load_tester_through_shared_memory(shm_server, channel, tmp_path, capsys):
    import json

    from roi_client.loadtest import cli

    token = tmp_path / "token"
    token.write_text(TOKEN_A)
    out = tmp_path / "run.json"
    argv = [shm_server.address, "--workload", "single-level", "--requests", "6", "--warmup", "0.2", "-c", "2",
            "--token-file", str(token), "--shared-memory", "--verify", "3", "--json", str(out), "-q"]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["shared_memory"] is True
    (run,) = doc["runs"]
    assert run["error_count"] == 0 and run["verify"]["mismatches"] == 0
    # The boxes (10 KB, below the 64 KiB that go in a region) and a few hundred bytes, not the
    # maps (7 MB); the answer a reference to the result (26 MB).
    assert run["sent_bytes_per_request"] < 16 << 10 and run["received_bytes_per_request"] < 1024
    assert status(channel) == []
    with in_process_server() as srv:
        assert cli.main([srv.address, "--requests", "2", "--workload", "single-level", "--shared-memory", "-q"]) == 3
    assert "--shared-memory: the server does not take it" in capsys.readouterr().err
