"""Requests encoded once, sent as often as wanted.

:class:`EncodedRequest` holds a serialised ``roi.v1.PoolRequest``: building one copies the
tensors into the message, sending it again costs nothing more. Its constructors take the same
arguments as the ``roi_kernels`` functions, with numpy arrays or torch tensors.

:class:`RequestDraft` is the same request before it is serialised: a client using shared memory
writes its large tensors into a region instead of the message (:meth:`RequestDraft.encode_into`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from typing import Self

    from .shm import SharedMemoryRegion

import numpy as np

from . import codec, framing
from ._proto.roi.v1 import roi_pb2
from .errors import RoIError

SizeLike = Union[int, Sequence[int]]

OPS: dict[str, int] = {
    "roi_align": roi_pb2.OP_ROI_ALIGN,
    "roi_pool": roi_pb2.OP_ROI_POOL,
    "ps_roi_align": roi_pb2.OP_PS_ROI_ALIGN,
    "ps_roi_pool": roi_pb2.OP_PS_ROI_POOL,
    "roi_align_rotated": roi_pb2.OP_ROI_ALIGN_ROTATED,
    "multiscale_roi_align": roi_pb2.OP_MULTISCALE_ROI_ALIGN,
}
_POOL_MODES = {"avg": roi_pb2.POOL_MODE_AVG, "max": roi_pb2.POOL_MODE_MAX}
_POSITION_SENSITIVE = ("ps_roi_align", "ps_roi_pool")


def _pair(output_size: SizeLike) -> tuple[int, int]:
    if isinstance(output_size, (int, np.integer)):
        return int(output_size), int(output_size)
    size = tuple(int(s) for s in output_size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise RoIError.invalid_argument(f"output_size must be an int or (height, width), got {output_size!r}")
    return size  # type: ignore[return-value]


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    # The wire field is unsigned: a negative size would wrap around, so it is refused here.
    if size[0] <= 0 or size[1] <= 0:
        raise RoIError.invalid_argument(f"output_size must be positive, got {size}")
    return size


def _wire_dtype(dtype: Any) -> int | None:
    if dtype is None:
        return None
    try:
        return codec.dtype_from_name(dtype)
    except ValueError as exc:
        raise RoIError.invalid_argument(str(exc)) from None


class _Parts:
    """The Tensors of a request being built, and their payloads: ``payloads[i]`` is what
    replaces the placeholder ``i`` in ``tensors[i].data``."""

    def __init__(self) -> None:
        self.tensors: list[roi_pb2.Tensor] = []
        self.payloads: list[Any] = []


def _encode(x: Any, msg: roi_pb2.Tensor, name: str, parts: _Parts, wire_dtype: int | None = None) -> None:
    """Writes ``x``'s dtype and shape into ``msg``, and appends its data to ``parts``
    (framing.serialize writes it into the message, the one copy the client makes)."""
    try:
        parts.payloads.append(codec.tensor_payload(x, wire_dtype, msg, len(parts.payloads)))
    except (TypeError, ValueError) as exc:
        raise RoIError.invalid_argument(f"{name}: {exc}") from None
    parts.tensors.append(msg)


def _is_sequence_of_arrays(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and (len(x) == 0 or hasattr(x[0], "shape"))


def _box_wire_dtype(b: Any) -> int:
    dtype = str(getattr(b, "dtype", ""))
    return roi_pb2.DTYPE_FLOAT64 if dtype in ("float64", "torch.float64") else roi_pb2.DTYPE_FLOAT32


def _encode_boxes(boxes: Any, msg: roi_pb2.Boxes, parts: _Parts) -> int:
    """Boxes as ``rois`` (one array with the image index first) or ``per_image`` (a list);
    float64 stays float64, anything else travels as float32. Returns the box count."""
    if _is_sequence_of_arrays(boxes):
        count = 0
        per_image = msg.per_image
        for i, b in enumerate(boxes):
            _encode(b, per_image.boxes.add(), f"boxes[{i}]", parts, _box_wire_dtype(b))
            count += int(b.shape[0]) if len(b.shape) else 0
        if not boxes:
            msg.per_image.SetInParent()
        return count
    _encode(boxes, msg.rois, "boxes", parts, _box_wire_dtype(boxes))
    shape = msg.rois.shape
    return int(shape[0]) if len(shape) else 0


class _Constructors:
    """The constructors of a request, one per op (the arguments of the roi_kernels functions),
    for :class:`EncodedRequest` and :class:`RequestDraft`."""

    @classmethod
    def _finish(cls, draft: RequestDraft) -> Any:
        raise NotImplementedError

    @classmethod
    def build(
        cls,
        op: str,
        *,
        input: Any = None,
        features: Sequence[Any] | None = None,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float | None = None,
        sampling_ratio: int | None = None,
        aligned: bool | None = None,
        pool_mode: str | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
        canonical_scale: int | None = None,
        canonical_level: int | None = None,
        out_dtype: Any = None,
        wire_dtype: Any = None,
        id: str = "",
        handle: str | None = None,
        handle_channels: int = 0,
        handle_torch: bool = False,
    ) -> Self:
        """The general form: ``input`` is ``[N, C, H, W]`` or a list of ``[C, H_i, W_i]``
        (ragged, roi_align); ``features`` the FPN levels for multiscale_roi_align.
        ``wire_dtype`` is the dtype the maps travel and are computed in (default: theirs);
        ``out_dtype`` the result's (default: the wire dtype). ``handle`` names uploaded maps
        (:meth:`roi_client.RoIClient.features`) instead, whose channels and whether they were
        torch tensors are ``handle_channels`` and ``handle_torch``."""
        if op not in OPS:
            raise RoIError.invalid_argument(f"op must be one of {', '.join(OPS)}, got {op!r}")
        req = roi_pb2.PoolRequest(id=id, op=OPS[op])
        p = req.params
        p.pooled_height, p.pooled_width = _check_size(_pair(output_size))
        if spatial_scale is not None:
            p.spatial_scale = float(spatial_scale)
        if sampling_ratio is not None:
            p.sampling_ratio = int(sampling_ratio)
        if aligned is not None:
            p.aligned = bool(aligned)
        if pool_mode is not None:
            if pool_mode not in _POOL_MODES:
                raise RoIError.invalid_argument(f'pool_mode must be "avg" or "max", got {pool_mode!r}')
            p.pool_mode = _POOL_MODES[pool_mode]
        if canonical_scale is not None:
            p.canonical_scale = int(canonical_scale)
        if canonical_level is not None:
            p.canonical_level = int(canonical_level)
        wire = _wire_dtype(wire_dtype)
        if out_dtype is not None:
            req.out_dtype = _wire_dtype(out_dtype)

        as_torch = False
        parts = _Parts()
        if handle is not None:
            req.handle = handle
            as_torch = handle_torch
        elif features is not None:
            levels = list(features)
            as_torch = bool(levels) and codec.is_torch_tensor(levels[0])
            for i, f in enumerate(levels):
                _encode(f, req.pyramid.levels.add().map, f"features[{i}]", parts, wire)
            for h, w in image_sizes or ():
                req.pyramid.image_sizes.add(height=int(h), width=int(w))
            if not levels:
                req.pyramid.SetInParent()
        elif _is_sequence_of_arrays(input):
            maps = list(input)
            as_torch = bool(maps) and codec.is_torch_tensor(maps[0])
            for i, m in enumerate(maps):
                _encode(m, req.ragged.maps.add(), f"input[{i}]", parts, wire)
            if not maps:
                req.ragged.SetInParent()
        else:
            as_torch = codec.is_torch_tensor(input)
            _encode(input, req.input, "input", parts, wire)
        num_boxes = _encode_boxes(boxes, req.boxes, parts)
        draft = RequestDraft(op, req, tuple(parts.tensors), tuple(parts.payloads), num_boxes, as_torch, handle_channels)
        return cls._finish(draft)

    @classmethod
    def roi_align(
        cls,
        input: Any,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = False,
        pool_mode: str = "avg",
        **options: Any,
    ) -> Self:
        return cls.build(
            "roi_align",
            input=input,
            boxes=boxes,
            output_size=output_size,
            spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
            pool_mode=pool_mode,
            **options,
        )

    @classmethod
    def roi_pool(cls, input: Any, boxes: Any, output_size: SizeLike, spatial_scale: float = 1.0, **options: Any) -> Self:
        return cls.build("roi_pool", input=input, boxes=boxes, output_size=output_size, spatial_scale=spatial_scale, **options)

    @classmethod
    def ps_roi_align(
        cls,
        input: Any,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        **options: Any,
    ) -> Self:
        return cls.build(
            "ps_roi_align",
            input=input,
            boxes=boxes,
            output_size=output_size,
            spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio,
            **options,
        )

    @classmethod
    def ps_roi_pool(cls, input: Any, boxes: Any, output_size: SizeLike, spatial_scale: float = 1.0, **options: Any) -> Self:
        return cls.build("ps_roi_pool", input=input, boxes=boxes, output_size=output_size, spatial_scale=spatial_scale, **options)

    @classmethod
    def roi_align_rotated(
        cls,
        input: Any,
        rois: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = True,
        **options: Any,
    ) -> Self:
        return cls.build(
            "roi_align_rotated",
            input=input,
            boxes=rois,
            output_size=output_size,
            spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
            **options,
        )

    @classmethod
    def multiscale_roi_align(
        cls,
        features: Sequence[Any],
        boxes: Any,
        image_sizes: Sequence[Sequence[int]],
        output_size: SizeLike,
        sampling_ratio: int = -1,
        aligned: bool = False,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        pool_mode: str = "avg",
        **options: Any,
    ) -> Self:
        """The level scales are inferred by the server from ``image_sizes``, as torchvision's
        ``MultiScaleRoIAlign`` does."""
        return cls.build(
            "multiscale_roi_align",
            features=features,
            boxes=boxes,
            image_sizes=image_sizes,
            output_size=output_size,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
            canonical_scale=canonical_scale,
            canonical_level=canonical_level,
            pool_mode=pool_mode,
            **options,
        )


@dataclass(frozen=True)
class EncodedRequest(_Constructors):
    """A serialised PoolRequest and what the client needs to read its answer.

    ``output_region`` (with ``output_offset``) is the shared memory region the request asks
    its result into (:meth:`with_output_region`), where the answer's output is read."""

    op: str
    payload: bytes
    num_boxes: int
    as_torch: bool = False
    id: str = ""
    output_region: SharedMemoryRegion | None = None
    output_offset: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    @classmethod
    def _finish(cls, draft: RequestDraft) -> EncodedRequest:
        return draft.encode()

    def with_id(self, request_id: str) -> EncodedRequest:
        """The same request with another id, without re-encoding it: a protobuf message
        followed by another is their merge, and the later id wins."""
        extra = roi_pb2.PoolRequest(id=request_id).SerializeToString()
        return replace(self, payload=self.payload + extra, id=request_id)

    def without_payload(self) -> EncodedRequest:
        """What reading the answer needs, without the message (kept per request of a stream)."""
        return replace(self, payload=b"")

    def with_output_region(self, region: SharedMemoryRegion, offset: int, byte_size: int) -> EncodedRequest:
        """The same request with its result written into ``byte_size`` bytes from ``offset``
        of ``region`` (registered with the server), appended as :meth:`with_id` appends an id."""
        extra = roi_pb2.PoolRequest(output_region=region.ref(offset, byte_size)).SerializeToString()
        return replace(self, payload=self.payload + extra, output_region=region, output_offset=offset)


@dataclass(frozen=True)
class RequestDraft(_Constructors):
    """A PoolRequest built but not serialised: ``tensors[i].data`` holds framing's placeholder
    for ``payloads[i]`` (the tensor's wire words, the caller's memory where it could be).
    :meth:`encode` writes every payload into the message, for the wire; :meth:`encode_into`
    writes the large ones into a shared memory region and sends references to them."""

    op: str
    message: roi_pb2.PoolRequest
    tensors: tuple[roi_pb2.Tensor, ...]
    payloads: tuple[Any, ...]
    num_boxes: int
    as_torch: bool = False
    # The channels of the maps a request on a feature handle pools (0: not such a request).
    handle_channels: int = 0

    @classmethod
    def _finish(cls, draft: RequestDraft) -> RequestDraft:
        return draft

    @property
    def output_nbytes(self) -> int:
        """The result's size as the server computes it (K * C * PH * PW elements of the out
        dtype); 0 for a request it will refuse (its error then says why)."""
        req = self.message
        kind = req.WhichOneof("features")
        if kind == "input":
            first, channel_axis = req.input, 1
        elif kind == "ragged" and req.ragged.maps:
            first, channel_axis = req.ragged.maps[0], 0
        elif kind == "pyramid" and req.pyramid.levels:
            first, channel_axis = req.pyramid.levels[0].map, 1
        elif kind == "handle" and self.handle_channels and req.out_dtype:
            first, channel_axis = None, 0
        else:
            return 0
        words = codec.WIRE_DTYPES.get(req.out_dtype or first.dtype) if first is not None else codec.WIRE_DTYPES.get(req.out_dtype)
        if words is None or (first is not None and len(first.shape) <= channel_axis):
            return 0
        ph, pw = req.params.pooled_height, req.params.pooled_width
        channels = first.shape[channel_axis] if first is not None else self.handle_channels
        if self.op in _POSITION_SENSITIVE:
            channels //= ph * pw
        return self.num_boxes * channels * ph * pw * words.itemsize

    def encode(self) -> EncodedRequest:
        """The request with every tensor in the message."""
        payload = framing.serialize(self.message, self.payloads)
        return EncodedRequest(self.op, payload, self.num_boxes, self.as_torch, self.message.id)

    def _placement(self, min_bytes: int, output: bool) -> tuple[dict[int, int], int | None, int]:
        """({payload index: offset} of the payloads of ``min_bytes`` or more, the output's
        offset (None: it travels in the answer), the bytes they take). Each starts on
        framing's alignment, as a payload does in a message."""
        offsets: dict[int, int] = {}
        end = 0
        for i, p in enumerate(self.payloads):
            if p.nbytes >= min_bytes and p.nbytes:
                offsets[i] = -(-end // framing.ALIGNMENT) * framing.ALIGNMENT
                end = offsets[i] + p.nbytes
        output_at = None
        if output and self.output_nbytes >= min_bytes and self.output_nbytes:
            output_at = -(-end // framing.ALIGNMENT) * framing.ALIGNMENT
            end = output_at + self.output_nbytes
        return offsets, output_at, end

    def region_bytes(self, min_bytes: int, output: bool = True) -> int:
        """The size of the region :meth:`encode_into` needs (0: nothing is that large)."""
        return self._placement(min_bytes, output)[2]

    def encode_into(self, region: SharedMemoryRegion, min_bytes: int, output: bool = True) -> EncodedRequest:
        """The request with its tensors of ``min_bytes`` or more written into ``region`` (of
        :meth:`region_bytes` at least, registered with the server) and sent as references,
        and with ``output``, the result asked into it too when it is that large. The draft is
        left as it was (:meth:`encode` still gives the request for the wire)."""
        offsets, output_at, end = self._placement(min_bytes, output)
        if end > region.size:
            raise RoIError.invalid_argument(f"the request needs {end} bytes of shared memory, {region!r} has {region.size}")
        kept: list[Any] = []
        try:
            for i, (tensor, payload) in enumerate(zip(self.tensors, self.payloads)):
                if i in offsets:
                    region.write(payload, offsets[i])
                    tensor.shared_memory.CopyFrom(region.ref(offsets[i], payload.nbytes))
                else:
                    # The placeholders are renumbered: serialize's payloads are those left.
                    tensor.data = framing.placeholder(len(kept))
                    kept.append(payload)
            payload_bytes = framing.serialize(self.message, kept)
        finally:
            for i, tensor in enumerate(self.tensors):
                tensor.data = framing.placeholder(i)
        request = EncodedRequest(self.op, payload_bytes, self.num_boxes, self.as_torch, self.message.id)
        if output_at is None:
            return request
        return request.with_output_region(region, output_at, region.size - output_at)
