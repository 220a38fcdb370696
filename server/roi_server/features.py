"""Feature handles: maps uploaded once (``UploadFeatures``) and pooled by many requests that
name them (``PoolRequest.handle``), within a byte budget and a time-to-live.

A detector pools one FPN pyramid several times per forward pass (the box head over a
thousand boxes, the mask head over a hundred, every stage of a cascade); without handles
every one of those requests carries the whole pyramid. The store keeps each upload's maps
on the device the kernels run on (see :func:`_own`: on the CPU the received messages' bytes
themselves, on a GPU a copy moved there once, at upload), in the form an inline request's
maps take after decoding: one ``Tensor[N, C, H, W]``, a list of
per-image ``Tensor[C, H_i, W_i]``, or one ``Tensor[N, C, H_l, W_l]`` per level. A request
naming a handle therefore decodes to the same :class:`~roi_server.codec.DecodedRequest` as
an inline one, with the same batch key: requests on different handles and inline requests
share one launch through the ragged ops.

Accounting and its guarantees:

* Bytes are reserved as an upload's messages arrive, before they are copied, so that the
  store's bytes (held handles plus uploads in progress) never pass ``budget_bytes``, however
  many clients upload at once. Room is made by evicting the least recently used handles; an
  upload that cannot get room (the rest is reserved by other uploads in progress) is refused
  with RESOURCE_EXHAUSTED, as is one larger than the budget or the caller's bound.
* With token authentication on, a caller (token) holds at most ``caller_bytes``: its own
  least recently used handles make room for its next upload, never another caller's.
* A handle is usable only by its owner; to anyone else it is unknown (the same answer as a
  handle that never existed, so that no one learns another caller's handles exist).
* A request holds references to the tensors it decoded: a handle evicted, expired or
  released while a request that named it waits or runs is dropped from the store (and its
  bytes from the accounting) at once, and its memory is freed when the last such request
  finishes.
* Each use refreshes a handle's time-to-live; expired handles are swept by every store call
  and by :meth:`FeatureStore.sweep`, which the server runs every second.

The store is thread-safe (requests are decoded on codec threads, uploads on the event loop).
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from roi_client import codec as wire
from roi_client import framing
from roi_client._proto.roi.v1 import roi_pb2

from .codec import MAP_SHAPES, WIRE_OF_TORCH, _check_map, _Contents, _infer_scales, _positive_scale, _tensor
from .errors import InvalidArgument, ServiceError
from .metrics import ServiceMetrics
from .shm import SharedMemoryRegistry

log = logging.getLogger(__name__)

GiB = 1 << 30
# A message whose bytes besides its maps (headers, shapes, alignment padding: a few hundred
# bytes from roi_client) pass this, or 1/256 of its maps, has its maps copied instead of kept
# as views of it (which would hold the rest too, uncounted).
VIEW_SLACK_BYTES = 4096
# Handles that went (expired, evicted, released) are remembered this long, so that a request
# naming one is told which; older ones are just unknown.
GONE_MEMORY = 4096
# What the client matches to tell "upload again" from other FAILED_PRECONDITIONs.
GONE_WORDS = "feature handle"
ENABLE_HINT = "start the server with --feature-store-bytes above 0 (or ROI_FEATURE_STORE_BYTES)"

KINDS = {"input": "map", "ragged": "ragged", "pyramid": "pyramid"}
# The decoded layout of each kind (codec.DecodedRequest.layout).
LAYOUTS = {"map": "dense", "ragged": "ragged", "pyramid": "pyramid"}
_ONE_MAP_OPS = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated")


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class StoreFull(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class StoredFeatures:
    """One handle's maps (``maps`` as codec.DecodedRequest holds them for its ``layout``)."""

    handle: str
    owner: str
    kind: str
    maps: list[torch.Tensor]
    scales: tuple[float, ...]
    num_images: int
    channels: int
    dtype: torch.dtype
    nbytes: int
    ttl_s: float
    expires: float = 0.0

    @property
    def layout(self) -> str:
        return LAYOUTS[self.kind]


@dataclass(eq=False)
class _Reservation:
    """Bytes an upload in progress holds against the budget."""

    owner: str
    nbytes: int = 0
    done: bool = False


@dataclass
class _Upload:
    """An upload being received: its kind, and each message's maps (copied, owned)."""

    kind: str = ""
    ttl_s: float = 0.0
    chunks: list[list[torch.Tensor]] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    scales: tuple[float, ...] | None = None
    num_images: int = 0
    channels: int = 0
    dtype: torch.dtype | None = None
    levels: int = 0


class FeatureStore:
    def __init__(
        self,
        budget_bytes: int,
        ttl_s: float,
        caller_bytes: int = 0,
        per_caller: bool = False,
        metrics: ServiceMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``caller_bytes`` (0: half the budget) bounds each caller when ``per_caller`` (token
        authentication on); otherwise every caller is one, bounded by the budget."""
        self.budget = int(budget_bytes)
        self.ttl_s = float(ttl_s)
        self.per_caller = per_caller
        self.caller_budget = (int(caller_bytes) or self.budget // 2) if per_caller else self.budget
        self.device = torch.device("cpu")
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        # Least recently used first.
        self._entries: OrderedDict[str, StoredFeatures] = OrderedDict()
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # handle -> (owner, why)
        self._reservations: set[_Reservation] = set()
        self._held = 0
        self._by_owner: dict[str, int] = {}
        self._ids = itertools.count()
        if metrics is not None:
            metrics.feature_budget.set(self.budget)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def check_enabled(self, field_name: str = "") -> None:
        if not self.enabled:
            where = f"{field_name}: " if field_name else ""
            raise FailedPrecondition(f"{where}feature handles are off on this server: {ENABLE_HINT}")

    def describe(self) -> roi_pb2.FeatureStore:
        return roi_pb2.FeatureStore(
            enabled=self.enabled,
            budget_bytes=self.budget,
            caller_bytes=self.caller_budget,
            ttl_seconds=self.ttl_s,
        )

    # -- accounting (every method below that changes it holds the lock) -------------------------

    @property
    def held_bytes(self) -> int:
        """Bytes of stored handles and of uploads in progress."""
        with self._lock:
            return self._held

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _owner_bytes(self, owner: str) -> int:
        return self._by_owner.get(owner, 0)

    def _add_bytes(self, owner: str, n: int) -> None:
        self._held += n
        self._by_owner[owner] = self._by_owner.get(owner, 0) + n
        if self._by_owner[owner] == 0:
            del self._by_owner[owner]

    def _publish(self) -> None:
        m = self._metrics
        if m is not None:
            m.feature_bytes.set(self._held)
            m.feature_handles.set(len(self._entries))

    def _drop(self, entry: StoredFeatures, why: str) -> None:
        del self._entries[entry.handle]
        self._add_bytes(entry.owner, -entry.nbytes)
        self._gone[entry.handle] = (entry.owner, why)
        while len(self._gone) > GONE_MEMORY:
            self._gone.popitem(last=False)
        if why == "evicted" and self._metrics is not None:
            self._metrics.feature_evictions.inc()

    def _sweep_locked(self, now: float) -> None:
        expired = [e for e in self._entries.values() if e.expires <= now]
        for e in expired:
            self._drop(e, "expired")
        if expired:
            self._publish()

    def sweep(self) -> None:
        """Drops the handles whose time-to-live has passed."""
        with self._lock:
            self._sweep_locked(self._clock())

    def _reserve(self, res: _Reservation, n: int) -> None:
        """Adds ``n`` bytes to ``res``, evicting least recently used handles (the caller's own
        first when it is past its bound) to make room; raises StoreFull when none is left."""
        with self._lock:
            if res.done:
                raise ServiceError("the upload ended", code=grpc.StatusCode.CANCELLED)
            self._sweep_locked(self._clock())
            want = res.nbytes + n
            if want > self.budget:
                raise StoreFull(
                    f"the upload takes {want} bytes or more, above the feature store's budget of {self.budget} bytes"
                )
            if want > self.caller_budget:
                raise StoreFull(
                    f"the upload takes {want} bytes or more, above the {self.caller_budget} bytes one caller may hold "
                    "(--feature-store-caller-bytes)"
                )
            owner = res.owner
            while self._owner_bytes(owner) + n > self.caller_budget:
                mine = next((e for e in self._entries.values() if e.owner == owner), None)
                if mine is None:
                    raise StoreFull(
                        f"this caller's uploads in progress hold {self._owner_bytes(owner)} bytes; {n} more pass its "
                        f"bound of {self.caller_budget} bytes"
                    )
                self._drop(mine, "evicted")
            while self._held + n > self.budget:
                if not self._entries:
                    raise StoreFull(
                        f"the feature store's budget of {self.budget} bytes is taken by uploads in progress; retry later"
                    )
                self._drop(next(iter(self._entries.values())), "evicted")
            res.nbytes += n
            self._add_bytes(owner, n)
            self._publish()

    def _unreserve(self, res: _Reservation) -> None:
        with self._lock:
            if res.done:
                return
            res.done = True
            self._add_bytes(res.owner, -res.nbytes)
            self._reservations.discard(res)
            self._publish()

    # -- uploads ------------------------------------------------------------------------------

    async def upload(
        self,
        messages: Any,
        owner: str,
        max_message_bytes: int,
        registry: SharedMemoryRegistry | None,
        off_loop: Callable[..., Any],
    ) -> roi_pb2.UploadFeaturesResponse:
        """Receives the upload's messages (an async iterator of their bytes), stores the maps
        and returns the handle. ``off_loop(nbytes, fn, *args)`` runs the copies (on a codec
        thread when large)."""
        self.check_enabled()
        res = _Reservation(owner)
        with self._lock:
            self._reservations.add(res)
        up = _Upload()
        try:
            index = 0
            async for raw in messages:
                await off_loop(len(raw), self._receive, raw, index, up, res, registry, owner)
                index += 1
            if index == 0:
                raise InvalidArgument("features", "the upload sent no message")
            entry = await off_loop(res.nbytes, self._assemble, up, owner)
            return self._commit(entry, res)
        finally:
            self._unreserve(res)

    def _receive(
        self,
        raw: bytes,
        index: int,
        up: _Upload,
        res: _Reservation,
        registry: SharedMemoryRegistry | None,
        owner: str,
    ) -> None:
        """One message: validated as an inline request's maps are, its bytes reserved, and its
        maps kept (see :func:`_own`)."""
        from google.protobuf.message import DecodeError

        try:
            msg, frame = framing.parse(roi_pb2.UploadFeaturesRequest, raw)
        except DecodeError as exc:
            raise InvalidArgument(
                "", f"message {index} is not a roi.v1.UploadFeaturesRequest: {exc}"
            ) from None
        contents = _Contents(frame, registry if registry is not None else _no_shared_memory(), owner)
        which = msg.WhichOneof("features")
        if which is None:
            raise InvalidArgument("features", f"message {index} gives no input, pyramid or ragged")
        kind = KINDS[which]
        if index == 0:
            up.kind = kind
            ttl = msg.ttl_seconds
            if not (math.isfinite(ttl) and ttl >= 0):
                raise InvalidArgument("ttl_seconds", f"must be >= 0 (0: the server's), got {ttl}")
            up.ttl_s = min(ttl, self.ttl_s) if ttl > 0 else self.ttl_s
        elif kind != up.kind:
            raise InvalidArgument(
                which, f"message {index} gives {kind} features; the upload's first message gave {up.kind}"
            )
        tensors = _message_maps(msg, which, contents, up)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self._reserve(res, nbytes)
        in_region = any(t.WhichOneof("contents") == "shared_memory" for t in _upload_tensors(msg, which))
        # Views of the message keep all of its bytes alive: only where those are (nearly) all
        # maps, so that what the store holds is what it counts.
        slack = len(raw) - nbytes
        copy = in_region or (bool(frame.spans) and slack > max(VIEW_SLACK_BYTES, nbytes >> 8))
        up.chunks.append([_own(t, self.device, copy) for t in tensors])
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _assemble(self, up: _Upload, owner: str) -> StoredFeatures:
        assert up.dtype is not None
        if up.kind == "ragged":
            maps = [t for chunk in up.chunks for t in chunk]
        elif len(up.chunks) == 1:
            maps = up.chunks[0]
        else:
            # One tensor per level (or the one map) over all images, as an inline request's.
            maps = [torch.cat([chunk[i] for chunk in up.chunks]) for i in range(len(up.chunks[0]))]
            up.chunks.clear()
        scales: tuple[float, ...] = ()
        if up.kind == "pyramid":
            scales = (
                up.scales
                if up.scales is not None
                else tuple(_infer_scales(maps, [_Size(h, w) for h, w in up.image_sizes]))
            )
            _check_scales(scales)
        nbytes = sum(t.numel() * t.element_size() for t in maps)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        handle = secrets.token_urlsafe(24)
        return StoredFeatures(
            handle, owner, up.kind, maps, scales, up.num_images, up.channels, up.dtype, nbytes, up.ttl_s
        )

    def _commit(self, entry: StoredFeatures, res: _Reservation) -> roi_pb2.UploadFeaturesResponse:
        with self._lock:
            # The reservation becomes the handle's bytes (the same amount: the maps copied).
            self._add_bytes(res.owner, -res.nbytes)
            res.done = True
            self._reservations.discard(res)
            self._add_bytes(entry.owner, entry.nbytes)
            now = self._clock()
            entry.expires = now + entry.ttl_s
            self._entries[entry.handle] = entry
            self._publish()
        log.debug(
            "feature handle stored: %s, %d images, %d bytes", entry.kind, entry.num_images, entry.nbytes
        )
        return roi_pb2.UploadFeaturesResponse(
            handle=entry.handle,
            byte_size=entry.nbytes,
            ttl_seconds=entry.ttl_s,
            expires_at=time.time() + entry.ttl_s,
            num_images=entry.num_images,
            kind=entry.kind,
        )

    # -- use and release ----------------------------------------------------------------------

    def lookup(self, handle: str, owner: str, op: str) -> StoredFeatures:
        """The owner's live handle, its time-to-live refreshed; FAILED_PRECONDITION naming it
        (and why it is gone, where known) otherwise, INVALID_ARGUMENT when ``op`` cannot pool
        its kind."""
        self.check_enabled("handle")
        with self._lock:
            now = self._clock()
            self._sweep_locked(now)
            entry = self._entries.get(handle)
            if entry is None or entry.owner != owner:
                owner_gone = self._gone.get(handle)
                why = owner_gone[1] if owner_gone is not None and owner_gone[0] == owner else "unknown"
                self._miss(why)
                shown = handle if len(handle) <= 64 else handle[:61] + "..."
                raise FailedPrecondition(
                    f"handle: {GONE_WORDS} {shown!r} is {why}{_WHY[why]}; upload the maps again"
                )
            entry.expires = now + entry.ttl_s
            self._entries.move_to_end(handle)
        if self._metrics is not None:
            self._metrics.feature_hits.inc()
        _check_op(entry, op)
        return entry

    def _miss(self, why: str) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.feature_misses, why).inc()

    def release(self, handle: str, owner: str) -> bool:
        """Drops the owner's handle; False when it holds none of that name (not an error)."""
        self.check_enabled()
        with self._lock:
            entry = self._entries.get(handle)
            if entry is None or entry.owner != owner:
                return False
            self._drop(entry, "released")
            self._publish()
        return True

    def close(self) -> None:
        """Drops every handle (the server is stopping; requests still running keep theirs)."""
        with self._lock:
            for entry in list(self._entries.values()):
                self._drop(entry, "released")
            self._publish()


_WHY = {
    "unknown": " (never uploaded, or not this caller's, or forgotten)",
    "expired": " (its time-to-live passed without use)",
    "evicted": " (the feature store needed its room for another upload)",
    "released": "",
}


@dataclass(frozen=True)
class _Size:
    height: int
    width: int


def _no_shared_memory() -> SharedMemoryRegistry:
    return SharedMemoryRegistry(enabled=False, prefix="")


def _own(t: torch.Tensor, device: torch.device, copy: bool) -> torch.Tensor:
    """``t`` as the store keeps it. On the CPU, a view of the received message (``t`` itself):
    its bytes are immutable, and the view keeps them alive for as long as the store holds it,
    so that an upload costs no copy, as inline maps cost none. ``copy``: a view of a client's
    shared memory region (the region is the client's to reuse), or of a message that holds
    much besides its maps. On a GPU everything is copied (moved to the device once, here)."""
    if device.type == "cpu":
        return t.clone(memory_format=torch.contiguous_format) if copy else t
    return t.to(device, copy=True).contiguous()


def _upload_tensors(msg: roi_pb2.UploadFeaturesRequest, which: str) -> list[roi_pb2.Tensor]:
    if which == "input":
        return [msg.input]
    if which == "ragged":
        return list(msg.ragged.maps)
    return [lv.map for lv in msg.pyramid.levels]


def _message_maps(
    msg: roi_pb2.UploadFeaturesRequest, which: str, contents: _Contents, up: _Upload
) -> list[torch.Tensor]:
    """The message's maps (views), checked as codec checks an inline request's and against the
    upload's earlier messages (dtype, channels, levels, scales)."""

    def agree(t: torch.Tensor, name: str, channels: int) -> None:
        if up.dtype is None:
            up.dtype, up.channels = t.dtype, channels
            return
        if t.dtype != up.dtype:
            want, got = (wire.dtype_name(WIRE_OF_TORCH[d]) for d in (up.dtype, t.dtype))
            raise InvalidArgument(f"{name}.dtype", f"must be the upload's dtype {want}, got {got}")
        if channels != up.channels:
            raise InvalidArgument(
                f"{name}.shape", f"must have the upload's {up.channels} channels, got {channels}"
            )

    if which == "input":
        t = _tensor(msg.input, contents, "input", 4, MAP_SHAPES[4])
        _check_map(t, "input")
        agree(t, "input", int(t.shape[1]))
        if up.chunks and tuple(t.shape[2:]) != tuple(up.chunks[0][0].shape[2:]):
            raise InvalidArgument(
                "input.shape",
                f"must have the (H, W) of the upload's first message {list(up.chunks[0][0].shape[2:])}",
            )
        up.num_images += int(t.shape[0])
        return [t]
    if which == "ragged":
        if not msg.ragged.maps:
            raise InvalidArgument("ragged.maps", "must hold at least one Tensor[C, H, W]")
        maps = []
        for i, m in enumerate(msg.ragged.maps):
            name = f"ragged.maps[{i}]"
            t = _tensor(m, contents, name, 3, MAP_SHAPES[3])
            _check_map(t, name)
            agree(t, name, int(t.shape[0]))
            maps.append(t)
        up.num_images += len(maps)
        return maps
    pyramid = msg.pyramid
    if not pyramid.levels:
        raise InvalidArgument("pyramid.levels", "must hold at least one level")
    if up.levels and len(pyramid.levels) != up.levels:
        raise InvalidArgument(
            "pyramid.levels", f"must hold the upload's {up.levels} levels, got {len(pyramid.levels)}"
        )
    maps = []
    for i, level in enumerate(pyramid.levels):
        name = f"pyramid.levels[{i}].map"
        t = _tensor(level.map, contents, name, 4, MAP_SHAPES[4])
        _check_map(t, name)
        agree(t, name, int(t.shape[1]))
        if maps and t.shape[0] != maps[0].shape[0]:
            raise InvalidArgument(
                f"{name}.shape", f"must have the N of levels[0] ({maps[0].shape[0]}), got {t.shape[0]}"
            )
        if up.chunks and tuple(t.shape[2:]) != tuple(up.chunks[0][i].shape[2:]):
            raise InvalidArgument(
                f"{name}.shape",
                f"must have the (H, W) of this level in the upload's first message {list(up.chunks[0][i].shape[2:])}",
            )
        maps.append(t)
    up.levels = len(maps)
    given = [lv.HasField("spatial_scale") for lv in pyramid.levels]
    if all(given):
        scales = tuple(
            _positive_scale(lv.spatial_scale, f"pyramid.levels[{i}].spatial_scale")
            for i, lv in enumerate(pyramid.levels)
        )
        if up.num_images == 0:
            up.scales = scales
        elif up.scales != scales:
            raise InvalidArgument(
                "pyramid.levels.spatial_scale",
                f"must be the upload's first message's {list(up.scales or ())}",
            )
    elif any(given):
        raise InvalidArgument("pyramid.levels.spatial_scale", "give a scale on every level or on none")
    else:
        if up.scales is not None:
            raise InvalidArgument(
                "pyramid.levels.spatial_scale",
                "the upload's first message gave scales: give them on every message",
            )
        n = int(maps[0].shape[0])
        if len(pyramid.image_sizes) != n:
            raise InvalidArgument(
                "pyramid.image_sizes",
                f"needed, one per image of the message, when the levels carry no spatial_scale: {n} images, got {len(pyramid.image_sizes)}",
            )
        for i, s in enumerate(pyramid.image_sizes):
            if s.height <= 0 or s.width <= 0:
                raise InvalidArgument(
                    f"pyramid.image_sizes[{i}]", f"must be positive, got ({s.height}, {s.width})"
                )
            up.image_sizes.append((int(s.height), int(s.width)))
    up.num_images += int(maps[0].shape[0])
    return maps


def _check_scales(scales: tuple[float, ...]) -> None:
    for i, s in enumerate(scales):
        k = -math.log2(s)
        if k != round(k) or (i > 0 and s != scales[i - 1] / 2):
            raise InvalidArgument(
                f"pyramid.levels[{i}].spatial_scale",
                f"levels must be consecutive powers of 1/2, finest first; got {list(scales)}",
            )


def _check_op(entry: StoredFeatures, op: str) -> None:
    if op == "multiscale_roi_align" and entry.kind != "pyramid":
        raise InvalidArgument(
            "handle", f"multiscale_roi_align needs a pyramid handle; this one holds a {entry.kind}"
        )
    if op in _ONE_MAP_OPS and entry.kind == "pyramid":
        raise InvalidArgument(
            "handle", f"{op} pools one map; this handle holds a pyramid (use multiscale_roi_align)"
        )
    if entry.kind == "ragged" and op != "roi_align":
        raise InvalidArgument("handle", f"only roi_align takes ragged per-image maps, not {op}")
