"""Requests off the wire: validation, and tensors as zero-copy views of the received bytes.

:func:`decode_request` checks everything the service can check before a kernel sees the input
(dtypes, byte lengths, shapes, box values, image indices, parameters, the per-request caps) and
raises :class:`~roi_server.errors.InvalidArgument` naming the field. What it returns holds torch
tensors that share memory with the bytes gRPC received (through :mod:`roi_client.framing`), or,
for a tensor given as a ``SharedMemoryRef``, with the caller's registered region
(:mod:`roi_server.shm`): the kernels only read them. A payload that does not lie on a multiple
of its element size (another encoder's message, an odd offset in a region) is copied once, to
an aligned buffer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from roi_client import codec as wire
from roi_client import framing
from roi_client._proto.roi.v1 import roi_pb2

from .batch_keys import batch_key
from .errors import InvalidArgument, Unimplemented
from .shm import SharedMemoryRegistry

if TYPE_CHECKING:
    from .features import FeatureStore

# The maps are read-only views of the request's bytes, which the kernels never write. torch
# warns about such views once per process; that one warning is spent here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.from_numpy(np.frombuffer(bytes(4), dtype=np.float32))

OP_NAMES: dict[int, str] = {
    roi_pb2.OP_ROI_ALIGN: "roi_align",
    roi_pb2.OP_ROI_POOL: "roi_pool",
    roi_pb2.OP_PS_ROI_ALIGN: "ps_roi_align",
    roi_pb2.OP_PS_ROI_POOL: "ps_roi_pool",
    roi_pb2.OP_ROI_ALIGN_ROTATED: "roi_align_rotated",
    roi_pb2.OP_MULTISCALE_ROI_ALIGN: "multiscale_roi_align",
}
ALL_OPS = tuple(OP_NAMES.values())


def peek_header(raw: bytes) -> tuple[str, int]:
    """The ``id`` and ``op`` of a serialised PoolRequest, read from its top-level fields
    without parsing it: a request refused before it is parsed (a full queue) costs no copy of
    its tensors, and is still counted under its op. Damaged bytes give what was read before
    the damage (``("", 0)`` at worst); parsing then reports them. At most 64 fields are read:
    a PoolRequest has eight, and random bytes must not cost a loop over every byte."""
    view = memoryview(raw)
    n, pos = len(view), 0
    req_id, op = "", 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while pos < n and shift < 64:
            byte = view[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise ValueError("truncated varint")

    try:
        for _ in range(64):
            if pos >= n:
                break
            key = varint()
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                value = varint()
                if number == 2:
                    op = value & 0xFFFFFFFF  # an enum is an int32 on the wire
                    op -= (op >> 31) << 32
            elif wire_type == 2:
                length = varint()
                if pos + length > n:
                    break
                if number == 1:
                    req_id = bytes(view[pos : pos + length]).decode("utf-8", "replace")
                pos += length
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            else:
                break
    except ValueError:
        pass
    return req_id, op

TORCH_DTYPES: dict[int, torch.dtype] = {
    roi_pb2.DTYPE_FLOAT32: torch.float32,
    roi_pb2.DTYPE_FLOAT16: torch.float16,
    roi_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    roi_pb2.DTYPE_FLOAT64: torch.float64,
}
WIRE_OF_TORCH = {v: k for k, v in TORCH_DTYPES.items()}
BOX_DTYPES = (roi_pb2.DTYPE_FLOAT32, roi_pb2.DTYPE_FLOAT64)
# Dense maps and pyramid levels, and ragged per-image maps, by rank.
MAP_SHAPES = {4: "[N, C, H, W]", 3: "[C, H, W]"}

# No tensor a message can carry spans more bytes (gRPC fails messages of about 1 GiB).
MAX_TENSOR_BYTES = 1 << 30

# The kernels' own bound (checks.h); more samples per bin than this is refused there too.
MAX_SAMPLING_RATIO = 1024

_WITH_SAMPLING = {"roi_align", "ps_roi_align", "roi_align_rotated", "multiscale_roi_align"}
_WITH_ALIGNED = {"roi_align", "roi_align_rotated", "multiscale_roi_align"}
_WITH_POOL_MODE = {"roi_align", "multiscale_roi_align"}
_POSITION_SENSITIVE = {"ps_roi_align", "ps_roi_pool"}

# What a request that names shared memory meets when the decoder is given no registry.
_NO_SHARED_MEMORY = SharedMemoryRegistry(enabled=False, prefix="")


@dataclass(frozen=True)
class Limits:
    """Per-request caps, from the settings."""

    max_boxes: int
    max_output_elements: int
    max_message_bytes: int


@dataclass
class DecodedRequest:
    """One validated request, ready for a kernel.

    ``maps`` by ``layout``: "dense" ``[Tensor[N, C, H, W]]``; "ragged" ``[Tensor[C, H_i, W_i]]``
    (one per image); "pyramid" ``[Tensor[N, C, H_l, W_l]]`` (one per level, ``scales``).
    ``rois`` is ``Tensor[K, 5]`` (rotated ``[K, 6]``) in the kernels' accumulation dtype.
    """

    id: str
    op: str
    layout: str
    maps: list[torch.Tensor]
    rois: torch.Tensor
    num_images: int
    channels: int
    out_channels: int
    pooled_height: int
    pooled_width: int
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    pool_mode: str
    canonical_scale: int
    canonical_level: int
    scales: tuple[float, ...]
    dtype: torch.dtype
    out_dtype: torch.dtype
    map_bytes: int
    key: tuple = field(default=())
    # PoolRequest.output_region and the writable view of the result's bytes in it, taken (and
    # checked) at decoding; the view keeps the region mapped until :meth:`release`.
    output_region: roi_pb2.SharedMemoryRef | None = field(default=None, repr=False)
    output_view: memoryview | None = field(default=None, repr=False)

    @property
    def num_boxes(self) -> int:
        return int(self.rois.shape[0])

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.num_boxes, self.out_channels, self.pooled_height, self.pooled_width)

    def release(self) -> None:
        """Lets go of the output region's view (once the result is written, or the request
        failed): a region unregistered meanwhile is unmapped only when no view is left."""
        # Taken first: a codec thread (done writing) and the event loop (the request ended)
        # may both release it.
        view, self.output_view = self.output_view, None
        if view is not None:
            view.release()


@dataclass
class _Contents:
    """Where a request's tensors' bytes lie: in the received message (``frame``) or in the
    registered shared memory regions of the caller (``owner``)."""

    frame: framing.Frame
    shared_memory: SharedMemoryRegistry
    owner: str

    def data(self, msg: roi_pb2.Tensor, name: str) -> tuple[Any, str]:
        """``msg``'s bytes (a view, no copy), and the field that gives their length."""
        if msg.WhichOneof("contents") == "shared_memory":
            field_name = f"{name}.shared_memory"
            return self.shared_memory.view(self.owner, msg.shared_memory, field_name), f"{field_name}.byte_size"
        # A view where the walker found it; read it once (each read of a bytes field copies).
        return self.frame.data(msg), f"{name}.data"


def _shape_text(shape) -> str:
    dims = [int(s) for s in shape]
    if len(dims) <= 8:
        return str(dims)
    return f"[{', '.join(map(str, dims[:8]))}, ...] ({len(dims)} dimensions)"


def _tensor(
    msg: roi_pb2.Tensor,
    contents: _Contents,
    name: str,
    rank: int,
    want: str,
    allowed: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``msg`` as a tensor sharing the received bytes or the caller's region (``contents`` says
    where they lie). It must have ``rank`` dimensions (``want`` names them for the error
    message)."""
    if allowed is not None and msg.dtype in wire.WIRE_DTYPES and msg.dtype not in allowed:
        names = ", ".join(wire.dtype_name(d) for d in allowed)
        raise InvalidArgument(f"{name}.dtype", f"must be {names}, got {wire.dtype_name(msg.dtype)}")
    # Checked before numpy sees the shape: it refuses more than 64 dimensions.
    if len(msg.shape) != rank:
        raise InvalidArgument(f"{name}.shape", f"must be {want}, got {_shape_text(msg.shape)}")
    data, length_field = contents.data(msg, name)
    try:
        words, shape = wire.wire_layout(msg, name, memoryview(data).nbytes, length_field)
    except ValueError as exc:
        field_name, _, problem = str(exc).partition(": ")
        raise InvalidArgument(field_name, problem) from None
    # An empty tensor (a dimension 0) matches its zero bytes whatever its other dimensions,
    # and numpy refuses shapes whose size overflows even then.
    span = words.itemsize
    for s in shape:
        span *= max(s, 1)
    if span > MAX_TENSOR_BYTES:
        raise InvalidArgument(f"{name}.shape", f"dimensions too large: {list(shape)}")
    arr = wire.decode_words(data, words, shape)
    if not arr.flags.aligned:
        arr = arr.copy()
    t = torch.from_numpy(arr)
    if msg.dtype == roi_pb2.DTYPE_BFLOAT16:
        t = t.view(torch.bfloat16)
    return t


def _check_map(t: torch.Tensor, name: str) -> None:
    if any(s <= 0 for s in t.shape):
        raise InvalidArgument(f"{name}.shape", f"sizes must be positive, got {list(t.shape)}")


def _positive_scale(value: float, name: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(name, f"must be a positive finite number, got {value}")
    return float(value)


def _infer_scales(maps: list[torch.Tensor], image_sizes) -> list[float]:
    # torchvision's rule (and roi_kernels.infer_scales'): the power of two closest to
    # map height / largest image height, rounded in float32 as torch does.
    max_h = max(int(s.height) for s in image_sizes)
    scales = []
    for t in maps:
        approx = np.float32(float(t.shape[-2]) / float(max_h))
        scales.append(2.0 ** float(np.round(np.log2(approx))))
    return scales


def _features(
    req: roi_pb2.PoolRequest, contents: _Contents, op: str, store: FeatureStore | None = None
) -> tuple[str, list[torch.Tensor], tuple[float, ...]]:
    kind = req.WhichOneof("features")
    if kind is None:
        raise InvalidArgument("features", "give input, pyramid, ragged or handle")
    if kind == "handle":
        if store is None:
            raise Unimplemented("handle: this server has no feature store")
        # The stored tensors themselves: the request keeps them alive until it has run,
        # whatever becomes of the handle meanwhile.
        entry = store.lookup(req.handle, contents.owner, op)
        return entry.layout, list(entry.maps), entry.scales
    if op == "multiscale_roi_align" and kind != "pyramid":
        raise InvalidArgument(kind, "multiscale_roi_align takes its levels in pyramid")
    if kind == "pyramid" and op != "multiscale_roi_align":
        raise InvalidArgument("pyramid", f"only multiscale_roi_align takes a pyramid, not {op}")
    if kind == "ragged" and op != "roi_align":
        raise InvalidArgument("ragged", f"only roi_align takes ragged per-image maps, not {op}")

    if kind == "input":
        t = _tensor(req.input, contents, "input", 4, MAP_SHAPES[4])
        _check_map(t, "input")
        return "dense", [t], ()

    if kind == "ragged":
        if not req.ragged.maps:
            raise InvalidArgument("ragged.maps", "must hold at least one Tensor[C, H, W]")
        maps = []
        for i, m in enumerate(req.ragged.maps):
            name = f"ragged.maps[{i}]"
            t = _tensor(m, contents, name, 3, MAP_SHAPES[3])
            _check_map(t, name)
            if maps and t.dtype != maps[0].dtype:
                raise InvalidArgument(f"{name}.dtype", "must equal ragged.maps[0].dtype")
            if maps and t.shape[0] != maps[0].shape[0]:
                raise InvalidArgument(
                    f"{name}.shape", f"must have the channels of ragged.maps[0] ({maps[0].shape[0]})"
                )
            maps.append(t)
        return "ragged", maps, ()

    pyramid = req.pyramid
    if not pyramid.levels:
        raise InvalidArgument("pyramid.levels", "must hold at least one level")
    maps = []
    for i, level in enumerate(pyramid.levels):
        name = f"pyramid.levels[{i}].map"
        t = _tensor(level.map, contents, name, 4, MAP_SHAPES[4])
        _check_map(t, name)
        if maps and t.dtype != maps[0].dtype:
            raise InvalidArgument(f"{name}.dtype", "must equal the dtype of levels[0]")
        if maps and tuple(t.shape[:2]) != tuple(maps[0].shape[:2]):
            raise InvalidArgument(
                f"{name}.shape", f"must have the N and C of levels[0] {list(maps[0].shape[:2])}, got {list(t.shape[:2])}"
            )
        maps.append(t)
    given = [lv.HasField("spatial_scale") for lv in pyramid.levels]
    if all(given):
        scales = [
            _positive_scale(lv.spatial_scale, f"pyramid.levels[{i}].spatial_scale")
            for i, lv in enumerate(pyramid.levels)
        ]
    elif any(given):
        raise InvalidArgument("pyramid.levels.spatial_scale", "give a scale on every level or on none")
    else:
        if not pyramid.image_sizes:
            raise InvalidArgument("pyramid.image_sizes", "needed when the levels carry no spatial_scale")
        for i, s in enumerate(pyramid.image_sizes):
            if s.height <= 0 or s.width <= 0:
                raise InvalidArgument(f"pyramid.image_sizes[{i}]", f"must be positive, got ({s.height}, {s.width})")
        scales = _infer_scales(maps, pyramid.image_sizes)
    # The kernel assigns boxes to levels k_min..k_max from the first and last scale.
    for i, s in enumerate(scales):
        k = -math.log2(s)
        if k != round(k) or (i > 0 and s != scales[i - 1] / 2):
            raise InvalidArgument(
                f"pyramid.levels[{i}].spatial_scale",
                f"levels must be consecutive powers of 1/2, finest first; got {scales}",
            )
    return "pyramid", maps, tuple(scales)


def _boxes(req: roi_pb2.PoolRequest, contents: _Contents, cols: int, acc: torch.dtype) -> torch.Tensor:
    kind = req.boxes.WhichOneof("layout")
    if kind is None:
        raise InvalidArgument("boxes", "give rois or per_image")
    if kind == "rois":
        want = f"[K, {cols + 1}] (image index first)"
        t = _tensor(req.boxes.rois, contents, "boxes.rois", 2, want, BOX_DTYPES)
        if t.shape[1] != cols + 1:
            raise InvalidArgument("boxes.rois.shape", f"must be {want}, got {list(t.shape)}")
        return t.to(acc)
    parts = []
    for i, m in enumerate(req.boxes.per_image.boxes):
        name = f"boxes.per_image[{i}]"
        t = _tensor(m, contents, name, 2, f"[L, {cols}]", BOX_DTYPES)
        if t.shape[1] != cols:
            raise InvalidArgument(f"{name}.shape", f"must be [L, {cols}], got {list(t.shape)}")
        t = t.to(acc)
        parts.append(torch.cat([torch.full((t.shape[0], 1), float(i), dtype=acc), t], dim=1))
    if not parts:
        return torch.empty((0, cols + 1), dtype=acc)
    return torch.cat(parts, dim=0)


def _params(req: roi_pb2.PoolRequest, op: str) -> dict[str, Any]:
    p = req.params
    if p.pooled_height <= 0 or p.pooled_width <= 0:
        raise InvalidArgument(
            "params.pooled_height/pooled_width", f"output size must be positive, got ({p.pooled_height}, {p.pooled_width})"
        )
    spatial_scale = _positive_scale(p.spatial_scale, "params.spatial_scale") if p.HasField("spatial_scale") else 1.0
    sampling_ratio = int(p.sampling_ratio) if p.HasField("sampling_ratio") else -1
    if sampling_ratio > MAX_SAMPLING_RATIO:
        raise InvalidArgument("params.sampling_ratio", f"must be <= {MAX_SAMPLING_RATIO} (or <= 0 for adaptive), got {sampling_ratio}")
    aligned = bool(p.aligned) if p.HasField("aligned") else op == "roi_align_rotated"
    if p.pool_mode in (roi_pb2.POOL_MODE_UNSPECIFIED, roi_pb2.POOL_MODE_AVG):
        pool_mode = "avg"
    elif p.pool_mode == roi_pb2.POOL_MODE_MAX:
        pool_mode = "max"
    else:
        raise InvalidArgument("params.pool_mode", f"unknown pool mode {p.pool_mode}")
    if pool_mode == "max" and op not in _WITH_POOL_MODE:
        raise InvalidArgument("params.pool_mode", f"{op} has no max mode")
    canonical_scale = int(p.canonical_scale) if p.HasField("canonical_scale") else 224
    canonical_level = int(p.canonical_level) if p.HasField("canonical_level") else 4
    if canonical_scale <= 0:
        raise InvalidArgument("params.canonical_scale", f"must be positive, got {canonical_scale}")
    return {
        "pooled_height": int(p.pooled_height),
        "pooled_width": int(p.pooled_width),
        "spatial_scale": spatial_scale,
        # Ops without these parameters ignore them; normalised so that they batch together.
        "sampling_ratio": sampling_ratio if op in _WITH_SAMPLING else -1,
        "aligned": aligned if op in _WITH_ALIGNED else False,
        "pool_mode": pool_mode,
        "canonical_scale": canonical_scale if op == "multiscale_roi_align" else 224,
        "canonical_level": canonical_level if op == "multiscale_roi_align" else 4,
    }


def _tensors(req: roi_pb2.PoolRequest):
    """Every Tensor of ``req``."""
    kind = req.WhichOneof("features")
    if kind == "input":
        yield req.input
    elif kind == "ragged":
        yield from req.ragged.maps
    elif kind == "pyramid":
        for level in req.pyramid.levels:
            yield level.map
    layout = req.boxes.WhichOneof("layout")
    if layout == "rois":
        yield req.boxes.rois
    elif layout == "per_image":
        yield from req.boxes.per_image.boxes


def shared_memory_bytes(req: roi_pb2.PoolRequest) -> int:
    """The bytes ``req``'s tensors name in shared memory (what decoding may have to copy, on
    top of the message's own)."""
    return sum(t.shared_memory.byte_size for t in _tensors(req) if t.WhichOneof("contents") == "shared_memory")


def decode_request(
    req: roi_pb2.PoolRequest,
    limits: Limits,
    available_ops: frozenset[str] | None = None,
    frame: framing.Frame | None = None,
    shared_memory: SharedMemoryRegistry | None = None,
    owner: str = "",
    features: FeatureStore | None = None,
) -> DecodedRequest:
    """Validates ``req`` and returns it as tensors; raises InvalidArgument naming the field.
    ``frame`` is :func:`roi_client.framing.parse`'s (None: ``req`` holds its own bytes).
    Tensors and the output region given in shared memory are read from and checked against
    the regions that ``owner`` (the caller, see
    :meth:`roi_server.shm_service.SharedMemoryService.owner`) registered in ``shared_memory``
    (None: shared memory is off, and such a request is refused with FAILED_PRECONDITION).
    A request naming a feature handle takes the maps ``owner`` uploaded to ``features``."""
    contents = _Contents(
        framing.Frame(b"") if frame is None else frame,
        _NO_SHARED_MEMORY if shared_memory is None else shared_memory,
        owner,
    )
    op = OP_NAMES.get(req.op)
    if op is None:
        raise InvalidArgument("op", f"unknown or unspecified op {req.op}")
    if available_ops is not None and op not in available_ops:
        raise Unimplemented(f"op: {op} is not available on this server")
    params = _params(req, op)
    out_dtype_wire = req.out_dtype
    if out_dtype_wire != roi_pb2.DTYPE_UNSPECIFIED and out_dtype_wire not in TORCH_DTYPES:
        raise InvalidArgument("out_dtype", f"unknown dtype {out_dtype_wire}")

    layout_kind = req.WhichOneof("features")
    layout, maps, scales = _features(req, contents, op, features)
    dtype = maps[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rotated = op == "roi_align_rotated"
    rois = _boxes(req, contents, 5 if rotated else 4, acc)

    if layout == "ragged":
        num_images, channels = len(maps), int(maps[0].shape[0])
    else:
        num_images, channels = int(maps[0].shape[0]), int(maps[0].shape[1])
    ph, pw = params["pooled_height"], params["pooled_width"]
    out_channels = channels
    if op in _POSITION_SENSITIVE:
        bins = ph * pw
        if channels % bins != 0:
            raise InvalidArgument(
                "handle" if layout_kind == "handle" else "input.shape",
                f"{op} needs channels divisible by output_size[0] * output_size[1] = {bins}, got C = {channels}",
            )
        out_channels = channels // bins

    k = int(rois.shape[0])
    if k > limits.max_boxes:
        raise InvalidArgument("boxes", f"{k} boxes, above this server's limit of {limits.max_boxes} per request")
    if k:
        # numpy, on a view of the same memory: on the few boxes of a small request each torch
        # call costs more than the kernel.
        r = rois.numpy()
        finite = np.isfinite(r)
        if not finite.all():
            bad = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise InvalidArgument("boxes", f"box {bad} has a non-finite coordinate: {r[bad].tolist()}")
        idx = r[:, 0]
        in_range = (idx >= 0) & (idx < num_images)
        if not in_range.all():
            bad = int(np.flatnonzero(~in_range)[0])
            raise InvalidArgument(
                "boxes", f"box {bad} has image index {idx[bad].item():g}, outside [0, {num_images}) for {num_images} image(s)"
            )
        # The kernels truncate a fractional index (as torchvision's do): over the wire that
        # is a mistake of the caller's, not an image to guess.
        whole = idx == np.floor(idx)
        if not whole.all():
            bad = int(np.flatnonzero(~whole)[0])
            raise InvalidArgument("boxes", f"box {bad} has image index {idx[bad]!s}, which is not a whole number")
    out_elements = k * out_channels * ph * pw
    if out_elements > limits.max_output_elements:
        raise InvalidArgument(
            "boxes",
            f"the output would hold {out_elements} elements (K * C * PH * PW), above this server's limit of "
            f"{limits.max_output_elements}",
        )
    out_dtype = TORCH_DTYPES.get(out_dtype_wire, dtype)
    out_bytes = out_elements * out_dtype.itemsize
    output_region = output_view = None
    if req.HasField("output_region"):
        # Checked now, so that a bad region is refused before the kernel runs. The response
        # then carries no data: the message limit does not bound the output.
        output_region = req.output_region
        output_view = contents.shared_memory.output_view(owner, output_region, out_bytes, "output_region")
    elif out_bytes + 4096 > limits.max_message_bytes:
        # The response must fit the message limit too (a few hundred bytes of framing aside).
        raise InvalidArgument(
            "boxes",
            f"the output would take {out_bytes} bytes, above this server's message limit of {limits.max_message_bytes}",
        )

    map_bytes = sum(t.numel() * t.element_size() for t in maps)
    decoded = DecodedRequest(
        id=req.id,
        op=op,
        layout=layout,
        maps=maps,
        rois=rois,
        num_images=num_images,
        channels=channels,
        out_channels=out_channels,
        scales=scales,
        dtype=dtype,
        out_dtype=out_dtype,
        map_bytes=map_bytes,
        output_region=output_region,
        output_view=output_view,
        **params,
    )
    decoded.key = batch_key(decoded)
    return decoded


def _output_words(out: torch.Tensor, msg: roi_pb2.Tensor) -> np.ndarray:
    """Sets ``msg``'s dtype and shape for ``out`` (CPU); returns its wire words (``out``'s own
    memory when it is contiguous)."""
    msg.dtype = WIRE_OF_TORCH[out.dtype]
    if out.dtype == torch.bfloat16:
        out = out.view(torch.int16)
    arr = wire.little_endian(out.contiguous().numpy())
    msg.shape.extend(arr.shape)
    return arr


def output_payload(out: torch.Tensor, msg: roi_pb2.Tensor, index: int = 0) -> np.ndarray:
    """Sets ``msg``'s dtype and shape for ``out`` (CPU) and its data to framing's placeholder
    ``index``; returns the array that :func:`roi_client.framing.serialize` writes in its place
    (``out``'s own memory when it is contiguous)."""
    arr = _output_words(out, msg)
    msg.data = framing.placeholder(index)
    return arr


def write_output(out: torch.Tensor, msg: roi_pb2.Tensor, decoded: DecodedRequest) -> None:
    """Writes ``out`` (CPU) into ``decoded``'s output region, sets ``msg`` to its dtype, shape
    and a reference to the bytes written, and releases the region's view."""
    assert decoded.output_view is not None and decoded.output_region is not None
    arr = _output_words(out, msg)
    # A request alone in its batch, on the CPU, had its result written into the region by
    # the kernel (engine.output_region_tensor): nothing to copy. Otherwise one copy, from the
    # kernel's output into the region: that output is the batch's (several requests'
    # results, on the device under CUDA), of which this result is a slice (converted to
    # out_dtype where asked).
    if arr.nbytes and arr.ctypes.data != np.frombuffer(decoded.output_view, np.uint8).ctypes.data:
        decoded.output_view[:] = memoryview(arr).cast("B")
    decoded.release()
    ref = decoded.output_region
    msg.shared_memory.CopyFrom(roi_pb2.SharedMemoryRef(region=ref.region, offset=ref.offset, byte_size=arr.nbytes))
