"""Same-host shared memory: tensors handed to a server on this host through POSIX shared memory
(files under /dev/shm) instead of inside messages.

:class:`SharedMemoryRegion` is one object this process created and mapped: tensors are written
into it and results read out of it as numpy views. :class:`SharedMemory` (blocking) and
:class:`AsyncSharedMemory` register regions with the server under a lease (the
``HoldSharedMemory`` call, open for as long as this client is: if the process dies, the
server releases its regions), and keep a pool of regions that requests borrow:
``RoIClient(..., shared_memory=True)`` uses them for its large tensors.

A region's name on the server is its key. The object is created with mode 0600: the server's
process must run as the same user (or give ``mode``).

Linux only (it needs /dev/shm); numpy only, no torch.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import secrets
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from ._proto.roi.v1 import roi_pb2
from .channel import SERVICE
from .errors import RoIError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
DEFAULT_PREFIX = "roi_"
# Tensors smaller than this travel in the message: a region costs a registration, and a small
# tensor's copy into a message costs less than the round trip it would save.
DEFAULT_MIN_BYTES = 64 << 10
# Free regions kept for later requests beyond those in use; more are unregistered and unlinked.
MAX_IDLE_REGIONS = 4
# Regions are made in multiples of this, so that requests of similar sizes share them.
REGION_GRANULE = 1 << 20

REGISTER = f"/{SERVICE}/RegisterSharedMemory"
STATUS = f"/{SERVICE}/SharedMemoryStatus"
UNREGISTER = f"/{SERVICE}/UnregisterSharedMemory"
HOLD = f"/{SERVICE}/HoldSharedMemory"


class SharedMemoryRegion:
    """A POSIX shared memory object (``/dev/shm/<key>``) of ``size`` bytes, mapped read-write.

    :meth:`create` makes a new one (unlinked by :meth:`close`); the constructor with
    ``create=False`` maps an existing one (left in place by :meth:`close`).
    """

    def __init__(self, key: str, size: int = 0, *, create: bool = False, mode: int = 0o600) -> None:
        if not key or "/" in key or "\0" in key or key.startswith("."):
            raise RoIError.invalid_argument(f"shared memory key must be a file name under {SHM_DIR}, got {key!r}")
        self.key = key
        path = os.path.join(SHM_DIR, key)
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, mode)
        except OSError as exc:
            raise _os_error(exc, f"cannot {'create' if create else 'open'} shared memory {key!r}") from None
        # Unlinked by close(), or at the latest when this object goes or the interpreter exits.
        self._unlink = weakref.finalize(self, _unlink, path) if create else lambda: None
        try:
            if create:
                if size <= 0:
                    raise RoIError.invalid_argument(f"shared memory size must be positive, got {size}")
                # Reserved now, so that a full /dev/shm is an error here and not a SIGBUS on
                # the first write of a page that tmpfs cannot back.
                os.posix_fallocate(fd, 0, size)
            else:
                size = os.fstat(fd).st_size
            self.size = size
            self._mmap = mmap.mmap(fd, size)
        except OSError as exc:
            self._unlink()
            raise _os_error(exc, f"cannot size shared memory {key!r} to {size} bytes") from None
        except BaseException:
            self._unlink()
            raise
        finally:
            os.close(fd)
        self._closed = False

    @classmethod
    def create(cls, size: int, prefix: str = DEFAULT_PREFIX, mode: int = 0o600) -> SharedMemoryRegion:
        """A new object named ``<prefix><pid>_<random>``; ``prefix`` must be the server's
        ``--shared-memory-prefix``."""
        return cls(f"{prefix}{os.getpid()}_{secrets.token_hex(6)}", size, create=True, mode=mode)

    @property
    def name(self) -> str:
        """The name the region is registered under (its key)."""
        return self.key

    @property
    def buffer(self) -> memoryview:
        return memoryview(self._mmap)

    def array(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        """A writable numpy view of the region: ``shape`` of ``dtype`` from byte ``offset``."""
        return np.ndarray(shape, dtype=np.dtype(dtype), buffer=self._mmap, offset=offset)

    def write(self, arr: np.ndarray, offset: int = 0) -> int:
        """Copies ``arr`` (in C order) into the region at ``offset``; returns its byte count."""
        arr = np.ascontiguousarray(arr)
        if offset + arr.nbytes > self.size:
            raise RoIError.invalid_argument(
                f"{arr.nbytes} bytes at offset {offset} do not fit shared memory {self.key!r} ({self.size} bytes)"
            )
        np.copyto(self.array(arr.dtype, arr.shape, offset), arr, casting="no")
        return arr.nbytes

    def ref(self, offset: int, byte_size: int) -> roi_pb2.SharedMemoryRef:
        return roi_pb2.SharedMemoryRef(region=self.name, offset=offset, byte_size=byte_size)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unlinks the object (when this process created it) and unmaps it; numpy views of it
        keep the memory until they are gone."""
        if self._closed:
            return
        self._closed = True
        self._unlink()
        try:
            self._mmap.close()
        except BufferError:
            pass  # views exist: the mapping goes with the last of them

    def __enter__(self) -> SharedMemoryRegion:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedMemoryRegion({self.key!r}, {self.size})"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _os_error(exc: OSError, what: str) -> RoIError:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.errno == errno.ENOSPC else grpc.StatusCode.FAILED_PRECONDITION
    hint = f" ({SHM_DIR} is full: a container's is 64 MB unless given shm_size)" if exc.errno == errno.ENOSPC else ""
    return RoIError(code, f"{what}: {exc.strerror or exc}{hint}")


@dataclass(frozen=True)
class RegionStatus:
    """A region as the server sees it (``SharedMemoryStatus``)."""

    region: str
    key: str
    offset: int
    byte_size: int
    lease: str
    file_size: int


def _status(raw: bytes) -> list[RegionStatus]:
    resp = roi_pb2.SharedMemoryStatusResponse.FromString(raw)
    return [RegionStatus(r.region, r.key, r.offset, r.byte_size, r.lease, r.file_size) for r in resp.regions]


class _Pool:
    """The bookkeeping of borrowed regions, without I/O (shared by the blocking and the
    asyncio manager, which do the calls). Thread-safe: regions come back from any thread,
    when a result that views one is garbage-collected."""

    def __init__(self, prefix: str, mode: int) -> None:
        self.prefix = prefix
        self.mode = mode
        self._lock = threading.Lock()
        self._free: list[tuple[int, int, SharedMemoryRegion]] = []  # (size, sequence, region)
        self._in_use: set[SharedMemoryRegion] = set()
        self._registered: set[str] = set()
        self._sequence = 0

    def take(self, nbytes: int) -> tuple[SharedMemoryRegion, list[SharedMemoryRegion]]:
        """A free region of at least ``nbytes`` (a new one if none), and the idle regions to
        drop (beyond :data:`MAX_IDLE_REGIONS`)."""
        with self._lock:
            i = bisect.bisect_left(self._free, (nbytes, -1))
            region = self._free.pop(i)[2] if i < len(self._free) else None
            surplus = [r for _, _, r in self._free[:-MAX_IDLE_REGIONS]] if len(self._free) > MAX_IDLE_REGIONS else []
            if surplus:
                del self._free[: len(surplus)]
        if region is None:
            size = -(-max(nbytes, 1) // REGION_GRANULE) * REGION_GRANULE
            region = SharedMemoryRegion.create(size, self.prefix, self.mode)
        with self._lock:
            self._in_use.add(region)
        return region, surplus

    def give_back(self, region: SharedMemoryRegion) -> None:
        with self._lock:
            if region not in self._in_use:
                return
            self._in_use.discard(region)
            self._sequence += 1
            bisect.insort(self._free, (region.size, self._sequence, region))

    def discard(self, region: SharedMemoryRegion) -> None:
        """A region that must not be reused (a call that failed may still be written into it
        by the server): it is dropped rather than returned."""
        with self._lock:
            self._in_use.discard(region)

    def needs_registration(self, region: SharedMemoryRegion) -> bool:
        with self._lock:
            return region.name not in self._registered

    def mark_registered(self, region: SharedMemoryRegion) -> None:
        with self._lock:
            self._registered.add(region.name)

    def forget(self, region: SharedMemoryRegion) -> bool:
        """Drops ``region`` from the registered set; whether it was registered."""
        with self._lock:
            was = region.name in self._registered
            self._registered.discard(region.name)
            return was

    def forget_registrations(self) -> None:
        """The lease ended (the server restarted, say): every region is unregistered there."""
        with self._lock:
            self._registered.clear()

    def pin(self, result: np.ndarray, region: SharedMemoryRegion) -> np.ndarray:
        """``result`` (a view of ``region``) keeps the region out of the pool while it (or any
        view or tensor made from it) lives."""
        weakref.finalize(result, self.give_back, region)
        return result

    def settle(self, output: Any, region: SharedMemoryRegion) -> None:
        """The region of a call that succeeded: pinned to ``output`` when that is a numpy view
        of it, given back otherwise (a torch result, a widened bfloat16 one, an output that
        came in the message)."""
        views = isinstance(output, np.ndarray) and not region.closed
        if not (views and np.may_share_memory(output, region.array(np.uint8, (region.size,)))):
            self.give_back(region)
            return
        # Pinned to the first array over the region's memory: numpy makes every view of a
        # view refer to that one, so a slice of the result that outlives it keeps the region.
        while isinstance(output.base, np.ndarray):
            output = output.base
        self.pin(output, region)

    def all_regions(self) -> list[SharedMemoryRegion]:
        with self._lock:
            regions = [r for _, _, r in self._free] + list(self._in_use)
            self._free.clear()
            self._in_use.clear()
            return regions


class _Disabled(Exception):
    """The server (or this host) does not do shared memory: the client uses the wire."""


def _falls_back(err: RoIError) -> bool:
    """A refusal after which the wire is the answer, not an error: the feature is off, or the
    server is on another host (it has no such object)."""
    if err.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
        return True
    return err.code == grpc.StatusCode.INVALID_ARGUMENT and "on this host" in err.details


def _is_off(err: RoIError) -> bool:
    """A request refused because the server has shared memory off (it restarted without it
    since the lease was opened). Other FAILED_PRECONDITIONs of a request (a region truncated
    after registration) are the caller's errors."""
    return err.code == grpc.StatusCode.FAILED_PRECONDITION and "shared memory is off" in err.details


class _Session:
    """What the blocking and the asyncio manager share: the pool, the fallback, the messages."""

    def __init__(self, prefix: str, mode: int, min_bytes: int) -> None:
        self.pool = _Pool(prefix, mode)
        self.min_bytes = min_bytes
        self.lease = ""
        self.disabled_reason: str | None = None
        self._warned = False

    def disable(self, reason: str) -> None:
        self.disabled_reason = reason
        if not self._warned:
            self._warned = True
            log.warning("shared memory not used, tensors go in messages: %s", reason)

    def turned_off(self, err: RoIError) -> bool:
        if not _is_off(err):
            return False
        self.disable(err.details)
        return True

    def register_request(self, region: SharedMemoryRegion) -> bytes:
        return roi_pb2.RegisterSharedMemoryRequest(
            region=region.name, key=region.key, byte_size=region.size, lease=self.lease
        ).SerializeToString()

    @staticmethod
    def unregister_request(region: SharedMemoryRegion | None) -> bytes:
        return roi_pb2.UnregisterSharedMemoryRequest(region=region.name if region else "").SerializeToString()


class SharedMemory:
    """Regions registered with one server, for a blocking client: :meth:`borrow` a region for
    a request, :meth:`give_back` it after (or :meth:`pin` it to a result that views it).

    The first use opens the lease; a server that refuses (shared memory off, another host)
    turns the manager off (``available`` False, logged once) and callers use the wire.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: Any = None,
        timeout: float | None = 30.0,
        prefix: str = DEFAULT_PREFIX,
        mode: int = 0o600,
        min_bytes: int = DEFAULT_MIN_BYTES,
    ) -> None:
        self._session = _Session(prefix, mode, min_bytes)
        self._metadata = metadata
        self._timeout = timeout
        self._register = channel.unary_unary(REGISTER)
        self._status = channel.unary_unary(STATUS)
        self._unregister = channel.unary_unary(UNREGISTER)
        self._hold = channel.unary_stream(HOLD)
        self._lease_call: Any = None
        self._lock = threading.Lock()

    @property
    def min_bytes(self) -> int:
        return self._session.min_bytes

    @property
    def available(self) -> bool:
        """False once the server or this host has refused shared memory."""
        return self._session.disabled_reason is None

    @property
    def disabled_reason(self) -> str | None:
        """Why shared memory is not used (the server's or this host's refusal), or None."""
        return self._session.disabled_reason

    @property
    def lease(self) -> str:
        return self._session.lease

    def _ensure_lease(self) -> None:
        s = self._session
        with self._lock:
            if self._lease_call is not None and self._lease_call.is_active():
                return
            if self._lease_call is not None:
                # The lease ended (the server restarted or stopped): its regions are gone.
                s.pool.forget_registrations()
            # No deadline: the call lasts as long as this client.
            call = self._hold(b"", metadata=self._metadata, timeout=None)
            try:
                first = next(call)
            except grpc.RpcError as exc:
                call.cancel()
                err = RoIError.from_rpc_error(exc)
                if _falls_back(err):
                    s.disable(err.details)
                    raise _Disabled from None
                raise err from None
            except StopIteration:
                raise RoIError(grpc.StatusCode.UNAVAILABLE, "the server ended the shared memory lease at once") from None
            s.lease = roi_pb2.HoldSharedMemoryResponse.FromString(first).lease
            self._lease_call = call

    def borrow(self, nbytes: int) -> SharedMemoryRegion | None:
        """A registered region of at least ``nbytes``, or None when shared memory is not
        available (the caller sends its tensors in the message)."""
        s = self._session
        if s.disabled_reason is not None:
            return None
        try:
            self._ensure_lease()
            region, surplus = s.pool.take(nbytes)
        except _Disabled:
            return None
        except RoIError as err:
            if err.code == grpc.StatusCode.FAILED_PRECONDITION:  # no /dev/shm here
                s.disable(err.details)
                return None
            raise
        for r in surplus:
            self._drop(r)
        if s.pool.needs_registration(region):
            try:
                self._register(s.register_request(region), timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                s.pool.discard(region)
                region.close()
                err = RoIError.from_rpc_error(exc)
                if _falls_back(err):
                    s.disable(err.details)
                    return None
                raise err from None
            s.pool.mark_registered(region)
        return region

    def give_back(self, region: SharedMemoryRegion) -> None:
        self._session.pool.give_back(region)

    def discard(self, region: SharedMemoryRegion) -> None:
        """Drops a region a failed call used (the server may still write into it)."""
        self._session.pool.discard(region)
        self._drop(region)

    def pin(self, result: np.ndarray, region: SharedMemoryRegion) -> np.ndarray:
        return self._session.pool.pin(result, region)

    def settle(self, output: Any, region: SharedMemoryRegion) -> None:
        """After a call that succeeded: ``region`` is pinned to ``output`` when that views it,
        given back otherwise."""
        self._session.pool.settle(output, region)

    def turned_off(self, err: RoIError) -> bool:
        """Whether a request's ``err`` says the server has shared memory off (it restarted
        without it): the manager turns off too (logged once), and the caller resends on the
        wire."""
        return self._session.turned_off(err)

    def status(self) -> list[RegionStatus]:
        """This caller's regions as the server sees them."""
        try:
            raw = self._status(b"", timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        return _status(raw)

    def _drop(self, region: SharedMemoryRegion) -> None:
        if self._session.pool.forget(region):
            try:
                self._unregister(self._session.unregister_request(region), timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                log.debug("unregistering %s: %s", region.name, RoIError.from_rpc_error(exc))
        region.close()

    def close(self) -> None:
        """Unregisters and unlinks every region, and ends the lease."""
        for region in self._session.pool.all_regions():
            self._drop(region)
        if self._lease_call is not None:
            self._lease_call.cancel()
            self._lease_call = None


class AsyncSharedMemory:
    """:class:`SharedMemory` for an asyncio client (``await borrow(...)``)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: Any = None,
        timeout: float | None = 30.0,
        prefix: str = DEFAULT_PREFIX,
        mode: int = 0o600,
        min_bytes: int = DEFAULT_MIN_BYTES,
    ) -> None:
        self._session = _Session(prefix, mode, min_bytes)
        self._metadata = metadata
        self._timeout = timeout
        self._register = channel.unary_unary(REGISTER)
        self._status = channel.unary_unary(STATUS)
        self._unregister = channel.unary_unary(UNREGISTER)
        self._hold = channel.unary_stream(HOLD)
        self._lease_call: Any = None
        self._opening: Any = None

    min_bytes = SharedMemory.min_bytes
    available = SharedMemory.available
    disabled_reason = SharedMemory.disabled_reason
    lease = SharedMemory.lease

    async def _ensure_lease(self) -> None:
        import asyncio

        if self._lease_call is not None and not self._lease_call.done():
            return
        # One lease for concurrent first requests.
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open_lease())
        opening = self._opening
        try:
            await asyncio.shield(opening)
        finally:
            if self._opening is opening and opening.done():
                self._opening = None

    async def _open_lease(self) -> None:
        s = self._session
        if self._lease_call is not None:
            s.pool.forget_registrations()
        call = self._hold(b"", metadata=self._metadata, timeout=None)
        try:
            first = await call.read()
        except grpc.RpcError as exc:
            call.cancel()
            err = RoIError.from_rpc_error(exc)
            if _falls_back(err):
                s.disable(err.details)
                raise _Disabled from None
            raise err from None
        if first is grpc.aio.EOF:
            raise RoIError(grpc.StatusCode.UNAVAILABLE, "the server ended the shared memory lease at once")
        s.lease = roi_pb2.HoldSharedMemoryResponse.FromString(first).lease
        self._lease_call = call

    async def borrow(self, nbytes: int) -> SharedMemoryRegion | None:
        s = self._session
        if s.disabled_reason is not None:
            return None
        try:
            await self._ensure_lease()
            region, surplus = s.pool.take(nbytes)
        except _Disabled:
            return None
        except RoIError as err:
            if err.code == grpc.StatusCode.FAILED_PRECONDITION:
                s.disable(err.details)
                return None
            raise
        for r in surplus:
            await self._drop(r)
        if s.pool.needs_registration(region):
            try:
                await self._register(s.register_request(region), timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                s.pool.discard(region)
                region.close()
                err = RoIError.from_rpc_error(exc)
                if _falls_back(err):
                    s.disable(err.details)
                    return None
                raise err from None
            s.pool.mark_registered(region)
        return region

    def give_back(self, region: SharedMemoryRegion) -> None:
        self._session.pool.give_back(region)

    async def discard(self, region: SharedMemoryRegion) -> None:
        self._session.pool.discard(region)
        await self._drop(region)

    def pin(self, result: np.ndarray, region: SharedMemoryRegion) -> np.ndarray:
        return self._session.pool.pin(result, region)

    settle = SharedMemory.settle
    turned_off = SharedMemory.turned_off

    async def status(self) -> list[RegionStatus]:
        try:
            raw = await self._status(b"", timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        return _status(raw)

    async def _drop(self, region: SharedMemoryRegion) -> None:
        if self._session.pool.forget(region):
            try:
                await self._unregister(
                    self._session.unregister_request(region), timeout=self._timeout, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                log.debug("unregistering %s: %s", region.name, RoIError.from_rpc_error(exc))
        region.close()

    async def close(self) -> None:
        for region in self._session.pool.all_regions():
            await self._drop(region)
        if self._lease_call is not None:
            self._lease_call.cancel()
            self._lease_call = None

