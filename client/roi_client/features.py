"""Feature handles: maps uploaded to the server once and pooled by many requests.

A detector pools one FPN pyramid several times per forward pass (the box head, the mask head,
every stage of a cascade). ``client.features(maps)`` uploads the maps (``UploadFeatures``) and
returns a :class:`FeatureMaps` whose op methods send only boxes and parameters, naming the
handle::

    with client.features(levels, image_sizes=sizes) as fm:
        boxes_feats = fm.multiscale_roi_align(proposals, 7, 2)
        mask_feats = fm.multiscale_roi_align(detections, 14, 2)

The upload is split into messages of whole images that fit the server's message limit (read
once from ``Describe``); with ``RoIClient(shared_memory=True)`` its large tensors go through a
shared memory region instead, as the op methods' do. A handle the server no longer holds
(expired, evicted, released there, or the server restarted) is uploaded again from the
arrays this object keeps, and the call retried once; with ``keep=False`` the arrays are not
kept and :class:`FeatureHandleGone` is raised instead. numpy only: torch is used where the
maps are torch tensors, never imported otherwise.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import grpc
import numpy as np

from . import codec, framing
from ._proto.roi.v1 import roi_pb2
from .channel import SERVICE
from .errors import RoIError
from .op_methods import UNSET
from .request import RequestDraft, SizeLike

if TYPE_CHECKING:
    from .aio import AsyncRoIClient
    from .client import RoIClient
    from .shm import SharedMemoryRegion

log = logging.getLogger(__name__)

UPLOAD = f"/{SERVICE}/UploadFeatures"
RELEASE = f"/{SERVICE}/ReleaseFeatures"
# Room left in each upload message for everything but the payloads (headers, shapes,
# alignment padding of 64 bytes per tensor).
MESSAGE_MARGIN = 64 << 10
# What the server says of a handle it does not hold (roi_server.features.GONE_WORDS).
_GONE_WORDS = "feature handle"
_ONE_MAP_OPS = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated")


class FeatureHandleGone(RoIError):
    """The server no longer holds a handle (expired, evicted or released there) made with
    ``keep=False``, so that the client cannot upload its maps again: upload them again with
    ``client.features(...)``."""


def handle_gone(err: RoIError) -> bool:
    """Whether ``err`` is the server saying that the handle a request named is gone."""
    return (
        err.code == grpc.StatusCode.FAILED_PRECONDITION
        and _GONE_WORDS in err.details
        and "off on this server" not in err.details
    )


def _wire_size(x: Any, wire: int | None) -> int:
    """The size of one element of ``x`` on the wire (codec.as_wire_array's choice)."""
    if wire is not None:
        return codec.WIRE_DTYPES[wire].itemsize
    name = str(getattr(x, "dtype", "float32")).removeprefix("torch.")
    return {"float16": 2, "bfloat16": 2, "float64": 8}.get(name, 4)


def _shape(x: Any, name: str, rank: int, want: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in getattr(x, "shape", np.shape(x)))
    if len(shape) != rank:
        raise ValueError(f"{name} must be {want}, got shape {list(shape)}")
    if any(s <= 0 for s in shape):
        raise ValueError(f"{name} must have positive sizes, got shape {list(shape)}")
    return shape


@dataclass
class _Source:
    """What an upload sends (and a re-upload sends again): the caller's arrays as given."""

    kind: str
    maps: list[Any]
    image_sizes: list[tuple[int, int]] | None
    spatial_scales: list[float] | None
    wire: int | None
    as_torch: bool
    channels: int
    num_images: int
    wire_name: str

    @classmethod
    def of(cls, maps: Any, image_sizes: Any, spatial_scales: Any, wire_dtype: Any) -> _Source:
        try:
            wire = None if wire_dtype is None else codec.dtype_from_name(wire_dtype)
        except ValueError as exc:
            raise ValueError(f"wire_dtype: {exc}") from None
        sizes = None if image_sizes is None else [(int(h), int(w)) for h, w in image_sizes]
        scales = None if spatial_scales is None else [float(s) for s in spatial_scales]
        if isinstance(maps, (list, tuple)):
            if not maps:
                raise ValueError("maps must hold at least one array")
            ranks = {len(getattr(m, "shape", np.shape(m))) for m in maps}
            if ranks == {3} and sizes is None and scales is None:
                kind = "ragged"
                shapes = [_shape(m, f"maps[{i}]", 3, "[C, H_i, W_i]") for i, m in enumerate(maps)]
                channels, num_images = shapes[0][0], len(maps)
                for i, s in enumerate(shapes):
                    if s[0] != channels:
                        raise ValueError(
                            f"maps[{i}] must have the {channels} channels of maps[0], got {s[0]}"
                        )
            else:
                kind = "pyramid"
                shapes = [
                    _shape(m, f"maps[{i}]", 4, "[N, C, H_l, W_l] (a pyramid level)")
                    for i, m in enumerate(maps)
                ]
                channels, num_images = shapes[0][1], shapes[0][0]
                for i, s in enumerate(shapes):
                    if s[:2] != shapes[0][:2]:
                        raise ValueError(
                            f"maps[{i}] must have the N and C of maps[0] {list(shapes[0][:2])}, got {list(s[:2])}"
                        )
                if (sizes is None) == (scales is None):
                    raise ValueError(
                        "a pyramid needs image_sizes [(h, w), ...] or spatial_scales (one per level), not both"
                    )
                if sizes is not None and len(sizes) != num_images:
                    raise ValueError(
                        f"image_sizes must hold one (h, w) per image: {num_images} images, got {len(sizes)}"
                    )
                if scales is not None and len(scales) != len(maps):
                    raise ValueError(
                        f"spatial_scales must hold one scale per level: {len(maps)} levels, got {len(scales)}"
                    )
            as_torch = codec.is_torch_tensor(maps[0])
            maps = list(maps)
        else:
            if image_sizes is not None or spatial_scales is not None:
                raise ValueError(
                    "image_sizes and spatial_scales are for a pyramid (a list of levels), not one map"
                )
            kind = "map"
            shape = _shape(
                maps, "maps", 4, "[N, C, H, W], a list of [C, H_i, W_i] or a list of pyramid levels"
            )
            channels, num_images = shape[1], shape[0]
            as_torch = codec.is_torch_tensor(maps)
            maps = [maps]
        first = maps[0]
        wire_name = (
            codec.dtype_name(wire)
            if wire is not None
            else str(getattr(first, "dtype", "float32")).removeprefix("torch.")
        )
        if wire_name not in ("float16", "bfloat16", "float64"):
            wire_name = "float32"
        return cls(kind, maps, sizes, scales, wire, as_torch, channels, num_images, wire_name)

    def image_bytes(self) -> list[int]:
        """The wire bytes of each image (of every level, for a pyramid)."""
        if self.kind == "ragged":
            return [int(np.prod(m.shape)) * _wire_size(m, self.wire) for m in self.maps]
        per_image = sum(int(np.prod(m.shape[1:])) * _wire_size(m, self.wire) for m in self.maps)
        return [per_image] * self.num_images

    def chunks(self, limit: int) -> list[tuple[int, int]]:
        """Image ranges [a, b) whose maps fit ``limit`` bytes each."""
        sizes = self.image_bytes()
        out, start, total = [], 0, 0
        for i, n in enumerate(sizes):
            if n > limit:
                raise RoIError.invalid_argument(
                    f"maps: image {i} takes {n} bytes, more than an upload message may carry ({limit} bytes under the "
                    "message size limit); raise the limits (--max-message-bytes and the client's max_message_bytes) or "
                    "send smaller maps"
                )
            if i > start and total + n > limit:
                out.append((start, i))
                start, total = i, 0
            total += n
        out.append((start, len(sizes)))
        return out

    def message(
        self, a: int, b: int, ttl: float
    ) -> tuple[roi_pb2.UploadFeaturesRequest, list[roi_pb2.Tensor], list[Any]]:
        """The upload message of images [a, b): the message with placeholders, its Tensors and
        their payloads (as request.RequestDraft holds them)."""
        msg = roi_pb2.UploadFeaturesRequest()
        if a == 0 and ttl:
            msg.ttl_seconds = ttl
        tensors: list[roi_pb2.Tensor] = []
        payloads: list[Any] = []

        def add(x: Any, target: roi_pb2.Tensor, name: str) -> None:
            try:
                payloads.append(codec.tensor_payload(x, self.wire, target, len(payloads)))
            except (TypeError, ValueError) as exc:
                raise RoIError.invalid_argument(f"{name}: {exc}") from None
            tensors.append(target)

        if self.kind == "map":
            add(self.maps[0][a:b], msg.input, "maps")
        elif self.kind == "ragged":
            for i in range(a, b):
                add(self.maps[i], msg.ragged.maps.add(), f"maps[{i}]")
        else:
            for li, level in enumerate(self.maps):
                lv = msg.pyramid.levels.add()
                add(level[a:b], lv.map, f"maps[{li}]")
                if self.spatial_scales is not None:
                    lv.spatial_scale = self.spatial_scales[li]
            for h, w in (self.image_sizes or [])[a:b]:
                msg.pyramid.image_sizes.add(height=h, width=w)
        return msg, tensors, payloads


def _check_ttl(ttl: Any) -> float:
    if ttl is None:
        return 0.0
    value = float(ttl)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    return value


def _placement(parts: list[tuple[Any, list, list]], min_bytes: int) -> tuple[dict[tuple[int, int], int], int]:
    """Offsets in one region of every payload of ``min_bytes`` or more, and the region's size."""
    offsets, end = {}, 0
    for ci, (_, _, payloads) in enumerate(parts):
        for pi, p in enumerate(payloads):
            if p.nbytes >= min_bytes and p.nbytes:
                at = -(-end // framing.ALIGNMENT) * framing.ALIGNMENT
                offsets[(ci, pi)] = at
                end = at + p.nbytes
    return offsets, end


def _encode_parts(
    parts: list[tuple[Any, list, list]],
    region: SharedMemoryRegion | None,
    offsets: dict[tuple[int, int], int],
) -> Iterator[bytes]:
    """Each upload message's bytes, its payloads at ``offsets`` written into ``region`` and sent
    as references (all of them when ``region`` is None: in the message)."""
    for ci, (msg, tensors, payloads) in enumerate(parts):
        if region is None:
            yield framing.serialize(msg, payloads)
            continue
        kept = []
        for pi, (tensor, payload) in enumerate(zip(tensors, payloads)):
            at = offsets.get((ci, pi))
            if at is not None:
                region.write(payload, at)
                tensor.shared_memory.CopyFrom(region.ref(at, payload.nbytes))
            else:
                tensor.data = framing.placeholder(len(kept))
                kept.append(payload)
        yield framing.serialize(msg, kept)


class _HandleOps:
    """The op methods of a handle, each the matching RoIClient method minus the maps; they
    build the request and hand it to ``self._call`` (whose result, or awaitable, they return)."""

    kind: str
    _source_info: tuple[int, bool, str]

    def _call(self, op: str, options: dict[str, Any], timeout: Any) -> Any:
        raise NotImplementedError

    def _draft(self, handle: str, op: str, options: dict[str, Any]) -> RequestDraft:
        channels, as_torch, wire_name = self._source_info
        if op == "multiscale_roi_align" and self.kind != "pyramid":
            raise ValueError(f"multiscale_roi_align needs a pyramid handle; this one holds a {self.kind}")
        if op in _ONE_MAP_OPS and self.kind == "pyramid":
            raise ValueError(f"{op} pools one map; this handle holds a pyramid (use multiscale_roi_align)")
        if self.kind == "ragged" and op != "roi_align":
            raise ValueError(f"only roi_align takes ragged per-image maps, not {op}")
        if options.get("out_dtype") is None:
            # The server's default (the maps' dtype), given so that the result's size is known.
            options["out_dtype"] = wire_name
        return RequestDraft.build(
            op, handle=handle, handle_channels=channels, handle_torch=as_torch, **options
        )

    def roi_align(
        self,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = False,
        pool_mode: str = "avg",
        *,
        out_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        options = {
            "boxes": boxes,
            "output_size": output_size,
            "spatial_scale": spatial_scale,
            "sampling_ratio": sampling_ratio,
            "aligned": aligned,
            "pool_mode": pool_mode,
            "out_dtype": out_dtype,
        }
        return self._call("roi_align", options, timeout)

    def roi_pool(
        self,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        *,
        out_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        options = {
            "boxes": boxes,
            "output_size": output_size,
            "spatial_scale": spatial_scale,
            "out_dtype": out_dtype,
        }
        return self._call("roi_pool", options, timeout)

    def ps_roi_align(
        self,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        *,
        out_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        options = {
            "boxes": boxes,
            "output_size": output_size,
            "spatial_scale": spatial_scale,
            "sampling_ratio": sampling_ratio,
            "out_dtype": out_dtype,
        }
        return self._call("ps_roi_align", options, timeout)

    def ps_roi_pool(
        self,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        *,
        out_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        options = {
            "boxes": boxes,
            "output_size": output_size,
            "spatial_scale": spatial_scale,
            "out_dtype": out_dtype,
        }
        return self._call("ps_roi_pool", options, timeout)

    def roi_align_rotated(
        self,
        rois: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = True,
        *,
        out_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        """``rois``: ``[K, 6]`` (image index, cx, cy, w, h, angle in degrees) or a list of
        ``[L_i, 5]``."""
        options = {
            "boxes": rois,
            "output_size": output_size,
            "spatial_scale": spatial_scale,
            "sampling_ratio": sampling_ratio,
            "aligned": aligned,
            "out_dtype": out_dtype,
        }
        return self._call("roi_align_rotated", options, timeout)

    def multiscale_roi_align(
        self,
        boxes: Any,
        output_size: SizeLike,
        sampling_ratio: int = -1,
        aligned: bool = False,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        pool_mode: str = "avg",
        *,
        out_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        """The level scales are the upload's (``spatial_scales``, or inferred from its
        ``image_sizes`` as torchvision's ``MultiScaleRoIAlign`` does)."""
        options = {
            "boxes": boxes,
            "output_size": output_size,
            "sampling_ratio": sampling_ratio,
            "aligned": aligned,
            "canonical_scale": canonical_scale,
            "canonical_level": canonical_level,
            "pool_mode": pool_mode,
            "out_dtype": out_dtype,
        }
        return self._call("multiscale_roi_align", options, timeout)


@dataclass
class _State:
    """A handle as the server gave it, and what is needed to make it again."""

    handle: str
    nbytes: int
    ttl_s: float
    expires_at: float
    source: _Source | None
    ttl: float

    def update(self, resp: roi_pb2.UploadFeaturesResponse) -> None:
        self.handle, self.nbytes = resp.handle, int(resp.byte_size)
        self.ttl_s, self.expires_at = resp.ttl_seconds, resp.expires_at


def prepare(
    maps: Any, image_sizes: Any, spatial_scales: Any, ttl: Any, wire_dtype: Any, keep: bool
) -> tuple[_Source, _State]:
    """The arguments of ``client.features()`` checked (RoIError INVALID_ARGUMENT naming the
    one at fault), and the state of a handle still to be uploaded."""
    try:
        source = _Source.of(maps, image_sizes, spatial_scales, wire_dtype)
        ttl_value = _check_ttl(ttl)
    except ValueError as exc:
        raise RoIError.invalid_argument(str(exc)) from None
    return source, _State("", 0, 0.0, 0.0, source if keep else None, ttl_value)


def feature_limit(raw_describe: bytes, client_max: int) -> int:
    """The payload bytes an upload message may carry, from the server's Describe answer."""
    info = roi_pb2.DescribeResponse.FromString(raw_describe)
    if not info.feature_store.enabled:
        raise RoIError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "feature handles are off on this server (it runs with --feature-store-bytes 0, or predates them)",
        )
    server_max = int(info.limits.max_message_bytes) or client_max
    return max(1, min(server_max, client_max) - MESSAGE_MARGIN)


class FeatureMaps(_HandleOps):
    """Maps held by the server under a handle (made by :meth:`roi_client.RoIClient.features`).

    The op methods are :class:`~roi_client.RoIClient`'s minus the maps, and return what those
    return. ``with fm:`` releases the handle at the end; :meth:`release` does it explicitly
    (twice is harmless). ``handle``, ``nbytes`` (what the server holds), ``kind`` ("map",
    "ragged" or "pyramid"), ``closed``, ``ttl_s`` and ``expires_at`` (Unix time, refreshed
    by the server on every use but not here).
    """

    def __init__(self, client: RoIClient, state: _State, source: _Source) -> None:
        self._client = client
        self._state = state
        self.kind = source.kind
        self._source_info = (source.channels, source.as_torch, source.wire_name)
        self.closed = False
        self._lock = threading.Lock()

    @property
    def handle(self) -> str:
        return self._state.handle

    @property
    def nbytes(self) -> int:
        return self._state.nbytes

    @property
    def ttl_s(self) -> float:
        return self._state.ttl_s

    @property
    def expires_at(self) -> float:
        return self._state.expires_at

    def _call(self, op: str, options: dict[str, Any], timeout: Any) -> Any:
        if self.closed:
            raise ValueError(
                f"feature handle {self.handle!r} was released; upload the maps again with client.features()"
            )
        used = self.handle
        draft = self._draft(used, op, dict(options))
        try:
            return self._client._run(draft, timeout)
        except RoIError as err:
            if not handle_gone(err):
                raise
            self._reupload(err, used, timeout)
        return self._client._run(self._draft(self.handle, op, dict(options)), timeout)

    def _reupload(self, err: RoIError, used: str, timeout: Any) -> None:
        # One upload for the threads that found the handle gone together; the others then
        # use its handle.
        with self._lock:
            if self._state.handle != used:
                return
            source = self._state.source
            if source is None:
                raise FeatureHandleGone(
                    err.code, f"{err.details} (made with keep=False: the client kept no copy)"
                ) from None
            log.info("feature handle gone on the server (%s); uploading the maps again", err.details)
            self._state.update(self._client._upload_features(source, self._state.ttl, timeout))

    def release(self, *, timeout: float | None = UNSET) -> None:
        """Drops the handle on the server and this object's references to the maps. A server
        that cannot be reached lets it expire by itself (its time-to-live)."""
        if self.closed:
            return
        self.closed = True
        self._state.source = None
        self._client._release_features(self.handle, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"FeatureMaps({self.kind}, {self.nbytes} bytes{', released' if self.closed else ''})"


class AsyncFeatureMaps(_HandleOps):
    """:class:`FeatureMaps` for :class:`~roi_client.AsyncRoIClient`: ``await fm.roi_align(...)``,
    ``async with fm:``, ``await fm.release()``."""

    handle = FeatureMaps.handle
    nbytes = FeatureMaps.nbytes
    ttl_s = FeatureMaps.ttl_s
    expires_at = FeatureMaps.expires_at
    __repr__ = FeatureMaps.__repr__

    def __init__(self, client: AsyncRoIClient, state: _State, source: _Source) -> None:
        self._client = client
        self._state = state
        self.kind = source.kind
        self._source_info = (source.channels, source.as_torch, source.wire_name)
        self.closed = False
        self._lock: Any = None  # an asyncio.Lock, made in the client's event loop

    def _call(self, op: str, options: dict[str, Any], timeout: Any) -> Any:
        if self.closed:
            raise ValueError(
                f"feature handle {self.handle!r} was released; upload the maps again with client.features()"
            )
        # Checked (and the request built) now, on the caller's thread, as the client's op
        # methods do.
        draft = self._draft(self.handle, op, dict(options))
        return self._run(draft, op, options, timeout)

    async def _run(self, draft: RequestDraft, op: str, options: dict[str, Any], timeout: Any) -> Any:
        used = draft.message.handle
        try:
            return await self._client._run(draft, timeout)
        except RoIError as err:
            if not handle_gone(err):
                raise
            await self._reupload(err, used, timeout)
        return await self._client._run(self._draft(self.handle, op, dict(options)), timeout)

    async def _reupload(self, err: RoIError, used: str, timeout: Any) -> None:
        # One upload for the calls that found the handle gone together (as FeatureMaps').
        import asyncio

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._state.handle != used:
                return
            source = self._state.source
            if source is None:
                raise FeatureHandleGone(
                    err.code, f"{err.details} (made with keep=False: the client kept no copy)"
                ) from None
            log.info("feature handle gone on the server (%s); uploading the maps again", err.details)
            self._state.update(await self._client._upload_features(source, self._state.ttl, timeout))

    async def release(self, *, timeout: float | None = UNSET) -> None:
        if self.closed:
            return
        self.closed = True
        self._state.source = None
        await self._client._release_features(self.handle, timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


# -- the clients' side: uploads and releases ----------------------------------------------------


def upload_parts(source: _Source, limit: int, ttl: float) -> list[tuple[Any, list, list]]:
    """The upload's messages (unserialised), each of whole images within ``limit`` bytes."""
    return [source.message(a, b, ttl) for a, b in source.chunks(limit)]


def wire_messages(parts: list[tuple[Any, list, list]]) -> Iterator[bytes]:
    """The messages with every tensor in them, serialised one at a time as gRPC sends them."""
    return _encode_parts(parts, None, {})


def shared_memory_plan(
    parts: list[tuple[Any, list, list]], min_bytes: int
) -> tuple[dict[tuple[int, int], int], int]:
    """Where each tensor of ``min_bytes`` or more goes in one region, and that region's size
    (0: none is that large)."""
    return _placement(parts, min_bytes)


def region_messages(
    parts: list[tuple[Any, list, list]], region: SharedMemoryRegion, offsets: dict[tuple[int, int], int]
) -> Iterator[bytes]:
    """The messages with the tensors at ``offsets`` written into ``region`` and referenced.
    The server copies them before it answers, so the region is free again after the call."""
    return _encode_parts(parts, region, offsets)


def decode_upload(raw: bytes) -> roi_pb2.UploadFeaturesResponse:
    return roi_pb2.UploadFeaturesResponse.FromString(raw)


def release_request(handle: str) -> bytes:
    return roi_pb2.ReleaseFeaturesRequest(handle=handle).SerializeToString()


def log_release_failure(handle: str, err: RoIError) -> None:
    log.debug("releasing feature handle %s: %s (it expires by itself)", handle, err)


__all__ = [
    "RELEASE",
    "UPLOAD",
    "AsyncFeatureMaps",
    "FeatureHandleGone",
    "FeatureMaps",
    "handle_gone",
]
