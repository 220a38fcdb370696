"""Same-host shared memory, against real servers on real ports: registration, its checks and
ownership, the lease that releases a dead client's regions, and the registry's checks of every
reference (the window, the file's size now, regions unregistered while in use)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_service_support import in_process_server, registry_value, server_settings

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
