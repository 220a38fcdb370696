"""Same-host shared memory: the registry of the regions clients map their tensors into.

A client on the server's host creates a POSIX shared memory object (a file under /dev/shm),
registers it (``RegisterSharedMemory``: its name for it, the object's key, a window of it), and
then sends requests whose tensors are :class:`SharedMemoryRef` (region, offset, byte_size)
instead of bytes; an ``output_region`` has the result written into a region too. The server
maps each region once, read-write, at registration.

What is checked, and why:

* Keys are confined to a prefix (``--shared-memory-prefix``, default ``roi_``) and may not hold
  ``/``, ``..`` or NUL, and the file is opened without following a symbolic link and must be a
  regular file: a client must not make the server map (and write into) anything else under
  /dev/shm, nor anything outside it.
* Every use of a region checks the reference against the registered window, and the window
  against the file's size now (``fstat``): touching a page of a mapping beyond the end of its
  file raises SIGBUS, which would kill the server, and a client may shrink its file at any
  time. (A file shrunk *during* a request still can; the feature is for clients the server
  trusts, on its own host, and is off by default.)
* Regions belong to their owner (the caller's token when tokens are required, see
  :func:`roi_server.auth.caller_of`): another owner's regions are invisible to it, and a key
  registered by one owner cannot be registered by another (it would read and write the first
  one's tensors through the server).

Mappings are reference-counted by Python's buffer protocol: a view handed to a request keeps
the mapping alive (``mmap.close`` refuses while views exist), so a region unregistered while a
request reads or writes it is unmapped when the last view is released, never under the request.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import stat
import threading
import weakref
from dataclasses import dataclass, field

import grpc
from roi_client._proto.roi.v1 import roi_pb2

from .errors import InvalidArgument, ServiceError
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
# Each region holds a file descriptor (mmap keeps one); past this many the server refuses more
# rather than run out of descriptors for its connections.
MAX_REGIONS = 1024
MAX_NAME_CHARS = 255

ENABLE_HINT = "start the server with --allow-shared-memory (or ROI_ALLOW_SHARED_MEMORY=1)"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class TooManyRegions(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class Region:
    """One registered region: ``byte_size`` bytes from ``offset`` of the object ``key``."""

    owner: str
    name: str
    key: str
    offset: int
    byte_size: int
    lease: str
    # The mapping starts at the page boundary at or below ``offset``; the region is
    # ``mapping[skip : skip + byte_size]``.
    mapping: mmap.mmap = field(repr=False)
    skip: int = 0
    # Counts the mapping out of the metrics once it is unmapped (see _account).
    unmapped: weakref.finalize | None = field(default=None, repr=False)

    def file_size(self) -> int:
        # mmap's size() is fstat on the descriptor it keeps: the file's size now.
        return self.mapping.size()


class SharedMemoryRegistry:
    """The regions of every owner, and the leases that release them. Thread-safe: requests are
    decoded on threads, registrations come from the event loop."""

    def __init__(
        self,
        enabled: bool,
        prefix: str,
        metrics: ServiceMetrics | None = None,
        directory: str = SHM_DIR,
        max_regions: int = MAX_REGIONS,
    ) -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.directory = directory
        self.max_regions = max_regions
        self._metrics = metrics
        self._lock = threading.Lock()
        self._regions: dict[tuple[str, str], Region] = {}
        # lease id -> its owner
        self._leases: dict[str, str] = {}

    # -- registration -------------------------------------------------------------------------

    def check_enabled(self, field_name: str = "") -> None:
        if not self.enabled:
            where = f"{field_name}: " if field_name else ""
            raise FailedPrecondition(f"{where}shared memory is off on this server: {ENABLE_HINT}")

    def register(self, owner: str, name: str, key: str, offset: int, byte_size: int, lease: str = "") -> Region:
        """Maps ``byte_size`` bytes from ``offset`` of ``key`` as the owner's region ``name``."""
        self.check_enabled()
        _check_name(name, "region")
        self._check_key(key)
        if byte_size <= 0:
            raise InvalidArgument("byte_size", "must be positive")
        with self._lock:
            if lease and self._leases.get(lease) != owner:
                raise InvalidArgument("lease", f"no lease {lease!r} is held (HoldSharedMemory gives one)")
            if (owner, name) in self._regions:
                raise AlreadyExists(f"region: {name!r} is already registered (unregister it first)")
            if any(r.key == key and r.owner != owner for r in self._regions.values()):
                raise PermissionDenied(f"key: {key!r} is registered by another caller")
            if len(self._regions) >= self.max_regions:
                raise TooManyRegions(f"region: this server holds {self.max_regions} regions, its most")
        mapping, skip = self._map(key, offset, byte_size)
        region = Region(owner, name, key, offset, byte_size, lease, mapping, skip)
        with self._lock:
            # Checked again: the mapping was made without the lock (it can take a while).
            taken = (owner, name) in self._regions or (lease and self._leases.get(lease) != owner)
            if not taken:
                self._regions[(owner, name)] = region
        if taken:
            mapping.close()
            raise AlreadyExists(f"region: {name!r} was registered meanwhile, or its lease ended")
        self._account(region)
        log.info("shared memory region %r registered: key %r, %d bytes from offset %d", name, key, byte_size, offset)
        return region

    def unregister(self, owner: str, name: str = "") -> int:
        """Unregisters the owner's region ``name`` (all of them when empty); returns how many.
        Requests that hold a view of a region keep its mapping until they release it."""
        self.check_enabled()
        with self._lock:
            if name:
                region = self._regions.pop((owner, name), None)
                if region is None:
                    raise InvalidArgument("region", f"no region {name!r} is registered")
                gone = [region]
            else:
                gone = [r for r in self._regions.values() if r.owner == owner]
                for r in gone:
                    del self._regions[(owner, r.name)]
        self._drop(gone)
        return len(gone)

    def status(self, owner: str, name: str = "") -> list[Region]:
        self.check_enabled()
        with self._lock:
            if name:
                region = self._regions.get((owner, name))
                if region is None:
                    raise InvalidArgument("region", f"no region {name!r} is registered")
                return [region]
            return sorted((r for r in self._regions.values() if r.owner == owner), key=lambda r: r.name)

    def open_lease(self, owner: str) -> str:
        self.check_enabled()
        lease = secrets.token_hex(16)
        with self._lock:
            self._leases[lease] = owner
        return lease

    def close_lease(self, lease: str) -> int:
        """Ends a lease and unregisters its regions; returns how many."""
        with self._lock:
            self._leases.pop(lease, None)
            gone = [r for r in self._regions.values() if r.lease == lease]
            for r in gone:
                del self._regions[(r.owner, r.name)]
        self._drop(gone)
        if gone:
            log.info("lease ended: %d shared memory region(s) released", len(gone))
        return len(gone)

    def close(self) -> None:
        """Unregisters everything (the server is stopping)."""
        with self._lock:
            gone = list(self._regions.values())
            self._regions.clear()
            self._leases.clear()
        self._drop(gone)

    # -- the request path ---------------------------------------------------------------------

    def view(self, owner: str, ref: roi_pb2.SharedMemoryRef, field_name: str) -> memoryview:
        """The ``ref.byte_size`` bytes of ``ref`` (read-only). The view keeps the region mapped
        for as long as it (or anything made from it) lives."""
        return self._window(owner, ref, ref.byte_size, field_name).toreadonly()

    def output_view(self, owner: str, ref: roi_pb2.SharedMemoryRef, nbytes: int, field_name: str) -> memoryview:
        """The first ``nbytes`` of ``ref``, writable, for a result of that size; ``ref`` must
        hold at least that many."""
        if ref.byte_size < nbytes:
            raise InvalidArgument(
                f"{field_name}.byte_size",
                f"{ref.byte_size} bytes are too few for the output ({nbytes} bytes) in region {ref.region!r}",
            )
        return self._window(owner, ref, nbytes, field_name)

    def _window(self, owner: str, ref: roi_pb2.SharedMemoryRef, nbytes: int, field_name: str) -> memoryview:
        self.check_enabled(field_name)
        with self._lock:
            region = self._regions.get((owner, ref.region))
            # Taken under the lock: an unregister after this point cannot unmap it under us.
            whole = memoryview(region.mapping) if region is not None else None
        if region is None or whole is None:
            raise InvalidArgument(f"{field_name}.region", f"no region {ref.region!r} is registered")
        if ref.offset + ref.byte_size > region.byte_size:
            whole.release()
            raise InvalidArgument(
                field_name,
                f"offset {ref.offset} + byte_size {ref.byte_size} is past the end of region {ref.region!r} "
                f"({region.byte_size} bytes)",
            )
        size = region.file_size()
        if region.offset + region.byte_size > size:
            whole.release()
            raise FailedPrecondition(
                f"{field_name}.region: region {ref.region!r} needs {region.offset + region.byte_size} bytes of "
                f"its object {region.key!r}, which now holds {size} (it was truncated after registration)"
            )
        start = region.skip + ref.offset
        return whole[start : start + nbytes]

    # -- helpers ------------------------------------------------------------------------------

    def _check_key(self, key: str) -> None:
        _check_name(key, "key")
        if "/" in key or ".." in key:
            raise InvalidArgument("key", f"must be a name under {self.directory}, without '/' or '..': got {key!r}")
        if not key.startswith(self.prefix):
            raise InvalidArgument(
                "key", f"this server maps only objects whose names start with {self.prefix!r} (its --shared-memory-prefix), not {key!r}"
            )

    def _map(self, key: str, offset: int, byte_size: int) -> tuple[mmap.mmap, int]:
        path = os.path.join(self.directory, key)
        try:
            # O_NOFOLLOW: a symbolic link named like a region must not lead the server elsewhere.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument("key", f"no shared memory object {key!r} on this host") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidArgument("key", f"{key!r} is a symbolic link, which the server does not follow") from None
            if exc.errno == errno.EISDIR:
                raise InvalidArgument("key", f"{key!r} is not a shared memory object") from None
            raise PermissionDenied(f"key: cannot open {key!r} for reading and writing: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument("key", f"{key!r} is not a shared memory object")
            if offset + byte_size > info.st_size:
                raise InvalidArgument(
                    "byte_size", f"offset {offset} + byte_size {byte_size} is past the end of {key!r} ({info.st_size} bytes)"
                )
            skip = offset % mmap.ALLOCATIONGRANULARITY
            mapping = mmap.mmap(fd, skip + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - skip)
        finally:
            os.close(fd)  # mmap keeps a descriptor of its own
        return mapping, skip

    def _drop(self, regions: list[Region]) -> None:
        for r in regions:
            if self._metrics is not None:
                self._metrics.shm_regions.dec()
            try:
                r.mapping.close()
            except BufferError:
                # Requests hold views of it: CPython unmaps it with its last reference, when
                # the last of them lets go, and the finalizer counts it out then.
                continue
            if r.unmapped is not None:
                r.unmapped()

    def _account(self, region: Region) -> None:
        m = self._metrics
        if m is None:
            return
        m.shm_regions.inc()
        size = len(region.mapping)
        m.shm_mapped_bytes.inc(size)
        region.unmapped = weakref.finalize(region.mapping, m.shm_mapped_bytes.dec, size)


def _check_name(name: str, field_name: str) -> None:
    if not name:
        raise InvalidArgument(field_name, "must not be empty")
    if "\0" in name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidArgument(field_name, f"must be printable, without NUL, at most {MAX_NAME_CHARS} characters")

