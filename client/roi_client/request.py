"""Requests encoded once, sent as often as wanted.

:class:`EncodedRequest` holds a serialised ``roi.v1.PoolRequest``: building one copies the
tensors into the message, sending it again costs nothing more. Its constructors take the same
arguments as the ``roi_kernels`` functions, with numpy arrays or torch tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Union

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


def _encode(x: Any, msg: roi_pb2.Tensor, name: str, payloads: list, wire_dtype: int | None = None) -> None:
    """Writes ``x``'s dtype and shape into ``msg``, and appends its data to ``payloads``
    (framing.serialize writes it into the message, the one copy the client makes)."""
    try:
        payloads.append(codec.tensor_payload(x, wire_dtype, msg, len(payloads)))
    except (TypeError, ValueError) as exc:
        raise RoIError.invalid_argument(f"{name}: {exc}") from None


def _is_sequence_of_arrays(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and (len(x) == 0 or hasattr(x[0], "shape"))


def _box_wire_dtype(b: Any) -> int:
    dtype = str(getattr(b, "dtype", ""))
    return roi_pb2.DTYPE_FLOAT64 if dtype in ("float64", "torch.float64") else roi_pb2.DTYPE_FLOAT32


def _encode_boxes(boxes: Any, msg: roi_pb2.Boxes, payloads: list) -> int:
    """Boxes as ``rois`` (one array with the image index first) or ``per_image`` (a list);
    float64 stays float64, anything else travels as float32. Returns the box count."""
    if _is_sequence_of_arrays(boxes):
        count = 0
        per_image = msg.per_image
        for i, b in enumerate(boxes):
            _encode(b, per_image.boxes.add(), f"boxes[{i}]", payloads, _box_wire_dtype(b))
            count += int(b.shape[0]) if len(b.shape) else 0
        if not boxes:
            msg.per_image.SetInParent()
        return count
    _encode(boxes, msg.rois, "boxes", payloads, _box_wire_dtype(boxes))
    shape = msg.rois.shape
    return int(shape[0]) if len(shape) else 0


@dataclass(frozen=True)
class EncodedRequest:
    """A serialised PoolRequest and what the client needs to read its answer."""

    op: str
    payload: bytes
    num_boxes: int
    as_torch: bool = False
    id: str = ""

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    def with_id(self, request_id: str) -> EncodedRequest:
        """The same request with another id, without re-encoding it: a protobuf message
        followed by another is their merge, and the later id wins."""
        extra = roi_pb2.PoolRequest(id=request_id).SerializeToString()
        return replace(self, payload=self.payload + extra, id=request_id)

    # -- constructors, one per op (the arguments of the roi_kernels functions) --------------

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
    ) -> EncodedRequest:
        """The general form: ``input`` is ``[N, C, H, W]`` or a list of ``[C, H_i, W_i]``
        (ragged, roi_align); ``features`` the FPN levels for multiscale_roi_align.
        ``wire_dtype`` is the dtype the maps travel and are computed in (default: theirs);
        ``out_dtype`` the result's (default: the wire dtype)."""
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
        payloads: list = []
        if features is not None:
            levels = list(features)
            as_torch = bool(levels) and codec.is_torch_tensor(levels[0])
            for i, f in enumerate(levels):
                _encode(f, req.pyramid.levels.add().map, f"features[{i}]", payloads, wire)
            for h, w in image_sizes or ():
                req.pyramid.image_sizes.add(height=int(h), width=int(w))
            if not levels:
                req.pyramid.SetInParent()
        elif _is_sequence_of_arrays(input):
            maps = list(input)
            as_torch = bool(maps) and codec.is_torch_tensor(maps[0])
            for i, m in enumerate(maps):
                _encode(m, req.ragged.maps.add(), f"input[{i}]", payloads, wire)
            if not maps:
                req.ragged.SetInParent()
        else:
            as_torch = codec.is_torch_tensor(input)
            _encode(input, req.input, "input", payloads, wire)
        num_boxes = _encode_boxes(boxes, req.boxes, payloads)
        return cls(op=op, payload=framing.serialize(req, payloads), num_boxes=num_boxes, as_torch=as_torch, id=id)

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
    ) -> EncodedRequest:
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
    def roi_pool(cls, input: Any, boxes: Any, output_size: SizeLike, spatial_scale: float = 1.0, **options: Any) -> EncodedRequest:
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
    ) -> EncodedRequest:
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
    def ps_roi_pool(cls, input: Any, boxes: Any, output_size: SizeLike, spatial_scale: float = 1.0, **options: Any) -> EncodedRequest:
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
    ) -> EncodedRequest:
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
    ) -> EncodedRequest:
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
