"""Random ``roi.v1.PoolRequest`` messages for fuzzing the service, and the rule every answer
must obey.

:func:`pool_requests` is a hypothesis strategy over the proto's fields. It first draws a
*valid* request for a random op: every dtype, dense, ragged or FPN features, boxes as rois or
per-image lists (empty ones included), every parameter, and valid but hard inputs (NaN and
infinite map values, huge, inverted and subnormal box coordinates, extreme sampling ratios and
FPN settings; these are listed in :attr:`FuzzCase.extremes`). About half the time it then
breaks the request with one to three mutations (:data:`MUTATION_KINDS`): unknown enum values,
wrong dtypes, shapes that do not match the bytes, huge, negative or empty dimensions, absurd
ranks, NaN/inf/out-of-range boxes and image indices, mismatched channel counts between levels
or ragged maps, absurd output sizes, missing oneofs, and byte-level damage (truncated, flipped
or appended bytes, invalid UTF-8, unknown and merged fields, more bytes than a server with
a 1 MiB limit takes). A few cases are random bytes.

:func:`classify` sends nothing; it judges one answer: a result whose shape, dtype, size and id
follow from the request, or INVALID_ARGUMENT / RESOURCE_EXHAUSTED with a short message that
reveals no internals. A valid request must not be refused as INVALID_ARGUMENT. Anything else
raises :class:`Violation`. :func:`reference_output` is the in-process ``roi_kernels`` call on
a valid request's tensors, for comparing results bit for bit.

Used by tests/test_fuzz_service.py (a bounded run in CI) and benchmarks/fuzz_service.py
(10,000+ cases).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from hypothesis import strategies as st
from roi_client import codec as wire
from roi_client import framing
from roi_client._proto.roi.v1 import roi_pb2

POOL_METHOD = "/roi.v1.RoIService/Pool"
POOL_STREAM_METHOD = "/roi.v1.RoIService/PoolStream"

F32, F16, BF16, F64 = (
    roi_pb2.DTYPE_FLOAT32,
    roi_pb2.DTYPE_FLOAT16,
    roi_pb2.DTYPE_BFLOAT16,
    roi_pb2.DTYPE_FLOAT64,
)
ROI_ALIGN, ROI_POOL = roi_pb2.OP_ROI_ALIGN, roi_pb2.OP_ROI_POOL
PS_ROI_ALIGN, PS_ROI_POOL = roi_pb2.OP_PS_ROI_ALIGN, roi_pb2.OP_PS_ROI_POOL
ROTATED, MULTISCALE = roi_pb2.OP_ROI_ALIGN_ROTATED, roi_pb2.OP_MULTISCALE_ROI_ALIGN

VALID_OPS = (ROI_ALIGN, ROI_POOL, PS_ROI_ALIGN, PS_ROI_POOL, ROTATED, MULTISCALE)
PS_OPS = (PS_ROI_ALIGN, PS_ROI_POOL)
WITH_MAX_MODE = (ROI_ALIGN, MULTISCALE)
VALID_DTYPES = (F32, F16, BF16, F64)
BOX_DTYPES = (F32, F64)
ITEMSIZE = {F32: 4, F16: 2, BF16: 2, F64: 8}

# Enum values a proto3 parser keeps as plain integers: unspecified, just past the last, far
# past it, negative, the int32 extremes.
UNKNOWN_OPS = (0, 7, 99, -1, 2**31 - 1, -(2**31))
UNKNOWN_DTYPES = (0, 5, 7, 99, -1, 2**31 - 1, -(2**31))
UNKNOWN_POOL_MODES = (3, 99, -5, 2**31 - 1)
HUGE_DIMS = (2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1)
# Output sizes: zero, large enough that only small requests fit the output caps, and past
# int32 and uint32 ranges' ends (the field is uint32).
ABSURD_SIZES = (0, 0, 2**12, 2**16, 2**31 - 1, 2**31, 2**32 - 1)
# Ranks a tensor message can claim (the service's tensors have 2, 3 or 4 dimensions); numpy
# stops at 64, and a long shape must not make a long error message.
ABSURD_RANKS = (0, 1, 2, 3, 4, 5, 6, 40, 65, 70, 5000)
# Box coordinates that break naive code but are finite in float32.
EXTREME_COORDS = (0.0, -0.0, 1e-45, -1e-45, 1e30, -1e30, 3.4e38, -3.4e38, 16777217.0)
NONFINITE = (math.nan, -math.nan, math.inf, -math.inf)

# What a client may be told when its request is refused.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
# Signs of internals in a message: a traceback, a C++ frame or namespace, a source path.
LEAKS = re.compile(
    r"Traceback|File \"|Exception raised from|INTERNAL ASSERT|\b(c10|at|std|torch|pybind11)::"
    r"|\.py\b|\.cpp\b|\.h\b|\.cu\b|\.so\b|(/[\w.\-]+){2,}|site-packages|0x[0-9a-fA-F]{8,}"
)
# A refusal's message travels in the trailers: it must stay short whatever the request holds.
MAX_MESSAGE_CHARS = 2048
# gRPC's own words when the trailers were too large: the server's message never arrived.
LOST = re.compile(r"Stream removed|metadata size exceeds")


class Violation(AssertionError):
    """An answer the service must never give."""


@dataclass
class FuzzCase:
    """A request to send.

    ``payload`` is what goes on the wire and ``request`` its parse (None when it does not
    parse). ``mutations`` names what was done to a valid request (``kind@where``; empty: the
    request is valid and must get a result). ``extremes`` names the valid but hard inputs it
    holds. ``finite``: its maps hold only finite values.
    """

    payload: bytes
    request: roi_pb2.PoolRequest | None
    mutations: tuple[str, ...] = ()
    extremes: tuple[str, ...] = ()
    finite: bool = True

    @property
    def valid(self) -> bool:
        return not self.mutations

    @property
    def kinds(self) -> tuple[str, ...]:
        """The mutations' kinds, without where they were applied."""
        return tuple(sorted({m.split("@", 1)[0] for m in self.mutations}))

    def with_id(self, request_id: str) -> FuzzCase:
        """The same case under another id (the stream's way to tell answers apart). Bytes that
        do not parse cannot carry one and are returned unchanged."""
        if self.request is None:
            return self
        req = roi_pb2.PoolRequest()
        req.CopyFrom(self.request)
        req.id = request_id
        return FuzzCase(req.SerializeToString(), req, self.mutations, self.extremes, self.finite)

    def describe(self) -> str:
        what = ", ".join(self.mutations) or "valid"
        if self.extremes:
            what += f"; extremes: {', '.join(self.extremes)}"
        if self.request is None:
            return f"[{what}] {len(self.payload)} bytes that do not parse: {self.payload[:64].hex()}"
        text = str(self.request)
        text = re.sub(
            r'data: "(?:[^"\\]|\\.)*"', lambda m: f"data: <{len(m.group(0)) - 8} escaped chars>", text
        )
        text = re.sub(r"(shape: 1\n\s*){8,}", "shape: 1 <repeated>\n", text)
        return f"[{what}] {len(self.payload)} bytes\n{text}"


# ---------------------------------------------------------------------------------------------
# A valid request


@dataclass
class _Draft:
    """A request being built, and what the mutations need to know of it."""

    req: roi_pb2.PoolRequest
    op: int
    dtype: int
    n: int
    c: int
    cols: int
    rng: np.random.Generator
    special: bool
    extreme_boxes: bool = False
    mutations: list[str] = field(default_factory=list)
    extremes: list[str] = field(default_factory=list)

    def values(self, dtype: int, shape: tuple[int, ...]) -> bytes:
        return _values(dtype, shape, self.rng, self.special)


def _values(dtype: int, shape: tuple[int, ...], rng: np.random.Generator, special: bool) -> bytes:
    """``prod(shape)`` random values of ``dtype`` as wire bytes; ``special`` sprinkles NaN,
    +-inf, huge and subnormal values in."""
    count = math.prod(shape)
    x = rng.standard_normal(count).astype(np.float32)
    if special and count:
        picks = rng.integers(0, count, size=max(1, count // 8))
        pool = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-40, 65504.0, 7e4], np.float32)
        x[picks] = rng.choice(pool, picks.size)
    if dtype == BF16:
        return wire.float32_to_bfloat16_bits(x).tobytes()
    with np.errstate(over="ignore"):
        return x.astype(wire.WIRE_DTYPES[dtype]).tobytes()


def _tensor(dtype: int, shape: tuple[int, ...], data: bytes) -> roi_pb2.Tensor:
    return roi_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def _dense(d: _Draft, h: int, w: int) -> None:
    shape = (d.n, d.c, h, w)
    d.req.input.CopyFrom(_tensor(d.dtype, shape, d.values(d.dtype, shape)))


def _ragged(d: _Draft, sizes: list[tuple[int, int]]) -> None:
    d.req.ragged.SetInParent()
    for h, w in sizes:
        shape = (d.c, h, w)
        d.req.ragged.maps.add().CopyFrom(_tensor(d.dtype, shape, d.values(d.dtype, shape)))


def _pyramid(draw, d: _Draft) -> None:
    """Levels whose scales are consecutive powers of 1/2, given on every level or inferred
    from image sizes (the finest level a quarter of the largest image's height)."""
    levels = draw(st.integers(1, 4))
    hb, wb = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h0, w0 = hb << (levels - 1), wb << (levels - 1)
    d.req.pyramid.SetInParent()
    for i in range(levels):
        shape = (d.n, d.c, h0 >> i, w0 >> i)
        d.req.pyramid.levels.add().map.CopyFrom(_tensor(d.dtype, shape, d.values(d.dtype, shape)))
    if draw(st.booleans()):
        first = draw(st.integers(0, 5))
        for i, lv in enumerate(d.req.pyramid.levels):
            lv.spatial_scale = 2.0 ** -(first + i)
    else:
        image_h = 4 * h0
        for i in range(draw(st.integers(1, d.n + 1))):
            height = image_h if i == 0 else draw(st.integers(1, image_h))
            d.req.pyramid.image_sizes.add(height=height, width=draw(st.integers(1, 4 * w0)))


def _coordinate(draw, d: _Draft, width: int) -> float:
    if d.extreme_boxes and draw(st.integers(0, 3)) == 0:
        d.extremes.append("extreme_box")
        return draw(st.sampled_from(EXTREME_COORDS))
    return draw(st.floats(-64.0, 400.0, width=width))


def _box_rows(draw, d: _Draft, k: int, box_dtype: int, index_col: bool) -> np.ndarray:
    width = 64 if box_dtype == F64 else 32
    rows = []
    for _ in range(k):
        row = [_coordinate(draw, d, width) for _ in range(d.cols)]
        if index_col:
            row = [float(draw(st.integers(0, d.n - 1))), *row]
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(k, d.cols + index_col)


def _encode_boxes(rows: np.ndarray, box_dtype: int) -> roi_pb2.Tensor:
    with np.errstate(over="ignore", invalid="ignore"):
        arr = rows.astype(wire.WIRE_DTYPES.get(box_dtype, np.float32))
    return _tensor(box_dtype, arr.shape, arr.tobytes())


def _boxes(draw, d: _Draft, box_dtype: int, layout: str) -> None:
    d.req.ClearField("boxes")
    if layout == "rois":
        rows = _box_rows(draw, d, draw(st.integers(0, 12)), box_dtype, index_col=True)
        d.req.boxes.rois.CopyFrom(_encode_boxes(rows, box_dtype))
    else:
        d.req.boxes.per_image.SetInParent()
        for _ in range(draw(st.integers(0, d.n))):  # the last images may have no list
            rows = _box_rows(draw, d, draw(st.integers(0, 6)), box_dtype, index_col=False)
            d.req.boxes.per_image.boxes.add().CopyFrom(_encode_boxes(rows, box_dtype))


@st.composite
def _valid_draft(draw) -> _Draft:
    op = draw(st.sampled_from(VALID_OPS))
    dtype = draw(st.sampled_from(VALID_DTYPES))
    ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    c = draw(st.integers(1, 3)) * ph * pw if op in PS_OPS else draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    special = draw(st.integers(0, 7)) == 0
    req = roi_pb2.PoolRequest(id=draw(st.text(max_size=12)), op=op)
    d = _Draft(
        req,
        op,
        dtype,
        n=draw(st.integers(1, 3)),
        c=c,
        cols=5 if op == ROTATED else 4,
        rng=rng,
        special=special,
    )
    if special:
        d.extremes.append("nonfinite_maps")

    p = req.params
    p.pooled_height, p.pooled_width = ph, pw
    if draw(st.booleans()):
        p.spatial_scale = draw(st.one_of(st.sampled_from([1.0, 0.5, 0.25, 1 / 16]), st.floats(1e-3, 4.0)))
    if draw(st.booleans()):
        p.sampling_ratio = draw(st.integers(-2, 4))
    if draw(st.integers(0, 19)) == 0:
        p.spatial_scale = draw(st.sampled_from([5e-324, 1e-300, 1e300, 3e38]))
        d.extremes.append("spatial_scale")
    if draw(st.integers(0, 19)) == 0:
        # The largest ratio (1024^2 samples a bin) only with one bin a box: twelve boxes over a
        # 12x12 map then take 25 ms (roi_align, 6 channels) to 0.3 s (ps_roi_align, 18), where
        # 4x4 bins took 2 s, and a run of such requests would pile up behind the device.
        p.sampling_ratio = draw(st.sampled_from([64, -(2**31)] + ([1024] if ph * pw == 1 else [])))
        d.extremes.append("sampling_ratio")
    if draw(st.booleans()):
        p.aligned = draw(st.booleans())
    modes = [0, roi_pb2.POOL_MODE_AVG] + ([roi_pb2.POOL_MODE_MAX] if op in WITH_MAX_MODE else [])
    p.pool_mode = draw(st.sampled_from(modes))
    if op == MULTISCALE and draw(st.integers(0, 3)) == 0:
        p.canonical_scale = draw(st.sampled_from([224, 1, 56, 2**31 - 1]))
        d.extremes.append("canonical_scale")
    if op == MULTISCALE and draw(st.integers(0, 3)) == 0:
        p.canonical_level = draw(st.sampled_from([4, 0, 2, -3, 100, 2**31 - 1, -(2**31)]))
        d.extremes.append("canonical_level")
    if draw(st.integers(0, 3)) == 0:
        req.out_dtype = draw(st.sampled_from(VALID_DTYPES))

    if op == MULTISCALE:
        _pyramid(draw, d)
    elif op == ROI_ALIGN and draw(st.integers(0, 2)) == 0:
        _ragged(d, [(draw(st.integers(1, 12)), draw(st.integers(1, 12))) for _ in range(d.n)])
    else:
        _dense(d, draw(st.integers(1, 12)), draw(st.integers(1, 12)))

    d.extreme_boxes = draw(st.integers(0, 3)) == 0
    box_dtype = draw(st.sampled_from([F32, F32, F32, F64]))
    _boxes(draw, d, box_dtype, draw(st.sampled_from(["rois", "rois", "per_image"])))
    return d


# ---------------------------------------------------------------------------------------------
# Mutations. Each returns the label to record (``kind@where``), or None where it does not
# apply to the request drawn.


def _map_messages(d: _Draft) -> list[tuple[str, roi_pb2.Tensor]]:
    kind = d.req.WhichOneof("features")
    if kind == "input":
        return [("input", d.req.input)]
    if kind == "ragged":
        return [(f"ragged[{i}]", m) for i, m in enumerate(d.req.ragged.maps)]
    if kind == "pyramid":
        return [(f"level[{i}]", lv.map) for i, lv in enumerate(d.req.pyramid.levels)]
    return []


def _box_messages(d: _Draft) -> list[tuple[str, roi_pb2.Tensor]]:
    layout = d.req.boxes.WhichOneof("layout")
    if layout == "rois":
        return [("rois", d.req.boxes.rois)]
    if layout == "per_image":
        return [(f"per_image[{i}]", t) for i, t in enumerate(d.req.boxes.per_image.boxes)]
    return []


def _intact(msg: roi_pb2.Tensor, rank: int) -> bool:
    """Whether ``msg`` is still a small well-formed tensor of ``rank`` dimensions (an earlier
    mutation may have broken it)."""
    shape = list(msg.shape)
    return (
        msg.dtype in ITEMSIZE
        and len(shape) == rank
        and all(0 <= s <= 4096 for s in shape)
        and len(msg.data) == math.prod(shape) * ITEMSIZE[msg.dtype]
    )


def _set_shape(msg: roi_pb2.Tensor, shape: list[int]) -> None:
    del msg.shape[:]
    msg.shape.extend(shape)


TENSOR_KINDS = (
    "dtype",
    "unknown_dtype",
    "dim",
    "huge_dim",
    "negative_dim",
    "rank",
    "truncate",
    "extend",
    "clear",
    "empty",
)


def _break_tensor(draw, msg: roi_pb2.Tensor, where: str) -> str:
    kind = draw(st.sampled_from(TENSOR_KINDS))
    shape = list(msg.shape) or [1]
    if kind == "dtype":
        # Another valid dtype over the same bytes: a different element count, or the same
        # count reinterpreted where the sizes agree (float16 <-> bfloat16).
        msg.dtype = draw(st.sampled_from([t for t in VALID_DTYPES if t != msg.dtype]))
    elif kind == "unknown_dtype":
        msg.dtype = draw(st.sampled_from(UNKNOWN_DTYPES))
    elif kind == "dim":
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 16))
        _set_shape(msg, shape)
    elif kind == "huge_dim":
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.sampled_from(HUGE_DIMS))
        if len(shape) > 1 and draw(st.booleans()):
            # A zero elsewhere: the byte count (0) agrees with the shape.
            shape[(i + 1) % len(shape)] = 0
            msg.data = b""
        _set_shape(msg, shape)
    elif kind == "negative_dim":
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from([-1, -(2**63)]))
        _set_shape(msg, shape)
    elif kind == "rank":
        # Too few or too many dimensions, with bytes that agree with them.
        rank = draw(st.sampled_from([r for r in ABSURD_RANKS if r != len(msg.shape)]))
        _set_shape(msg, [1] * rank)
        msg.data = bytes(ITEMSIZE.get(msg.dtype, 4))
    elif kind == "truncate":
        msg.data = msg.data[: draw(st.integers(0, max(len(msg.data) - 1, 0)))]
    elif kind == "extend":
        msg.data = msg.data + bytes(draw(st.integers(1, 9)))
    elif kind == "clear":
        msg.Clear()
    elif kind == "empty":
        # A consistent empty tensor: one dimension 0 and no bytes.
        shape[draw(st.integers(0, len(shape) - 1))] = 0
        _set_shape(msg, shape)
        msg.data = b""
    return f"{kind}@{where}"


def _m_map_tensor(draw, d: _Draft) -> str | None:
    maps = _map_messages(d)
    if not maps:
        return None
    where, msg = draw(st.sampled_from(maps))
    return "map_" + _break_tensor(draw, msg, where)


# Shared memory references. benchmarks/fuzz_service.py registers FUZZ_REGION (filled with
# random floats) and registers then unregisters GONE_REGION before it sends; elsewhere (a
# server with shared memory off) every reference is refused alike.
FUZZ_REGION = "fuzz-region"
GONE_REGION = "fuzz-gone"
FUZZ_REGION_BYTES = 1 << 20


def _m_shared_memory(draw, d: _Draft) -> str | None:
    """A map or box tensor's bytes replaced by a reference into a region: registered or not,
    in bounds or past the end, of the right size or not; or an output region."""
    tensors = _map_messages(d) + _box_messages(d)
    if not tensors:
        return None
    where, msg = draw(st.sampled_from(tensors))
    nbytes = len(msg.data)
    region = draw(st.sampled_from([FUZZ_REGION, FUZZ_REGION, FUZZ_REGION, GONE_REGION, "fuzz-never", ""]))
    offset = draw(st.sampled_from([0, 64, 4, FUZZ_REGION_BYTES - 8, FUZZ_REGION_BYTES, 2**63, 2**64 - 1]))
    size = draw(st.sampled_from([nbytes, nbytes, 0, nbytes + 4, FUZZ_REGION_BYTES, 2**64 - 1]))
    msg.shared_memory.CopyFrom(roi_pb2.SharedMemoryRef(region=region, offset=offset, byte_size=size))
    if draw(st.integers(0, 3)) == 0:
        d.req.output_region.CopyFrom(
            roi_pb2.SharedMemoryRef(
                region=draw(st.sampled_from([FUZZ_REGION, GONE_REGION, "fuzz-never"])),
                offset=draw(st.sampled_from([0, 8, FUZZ_REGION_BYTES - 16, 2**63])),
                byte_size=draw(st.sampled_from([0, 16, FUZZ_REGION_BYTES, 2**64 - 1])),
            )
        )
        return f"shm_ref@{where}+output"
    return f"shm_ref@{where}"


def _m_box_tensor(draw, d: _Draft) -> str | None:
    boxes = _box_messages(d)
    if not boxes:
        return None
    where, msg = draw(st.sampled_from(boxes))
    return "box_" + _break_tensor(draw, msg, where)


def _m_unknown_op(draw, d: _Draft) -> str:
    d.req.op = draw(st.sampled_from(UNKNOWN_OPS))
    return "unknown_op"


def _m_other_op(draw, d: _Draft) -> str:
    # Features and boxes made for one op, sent to another: some fit, most do not.
    d.req.op = draw(st.sampled_from([o for o in VALID_OPS if o != d.req.op]))
    return "other_op"


def _m_output_size(draw, d: _Draft) -> str:
    field_name = draw(st.sampled_from(["pooled_height", "pooled_width"]))
    setattr(d.req.params, field_name, draw(st.sampled_from(ABSURD_SIZES)))
    return f"output_size@{field_name}"


def _m_spatial_scale(draw, d: _Draft) -> str:
    d.req.params.spatial_scale = draw(st.sampled_from([0.0, -0.0, -1.0, -1e-300, *NONFINITE]))
    return "spatial_scale"


def _m_sampling_ratio(draw, d: _Draft) -> str:
    d.req.params.sampling_ratio = draw(st.sampled_from([1025, 5000, 2**31 - 1]))
    return "sampling_ratio"


def _m_pool_mode(draw, d: _Draft) -> str:
    if d.req.op not in WITH_MAX_MODE and draw(st.booleans()):
        d.req.params.pool_mode = roi_pb2.POOL_MODE_MAX
    else:
        d.req.params.pool_mode = draw(st.sampled_from(UNKNOWN_POOL_MODES))
    return "pool_mode"


def _m_canonical_scale(draw, d: _Draft) -> str:
    d.req.params.canonical_scale = draw(st.sampled_from([0, -1, -224, -(2**31)]))
    return "canonical_scale"


def _m_out_dtype(draw, d: _Draft) -> str:
    d.req.out_dtype = draw(st.sampled_from([t for t in UNKNOWN_DTYPES if t != 0]))
    return "out_dtype"


def _m_features_kind(draw, d: _Draft) -> str | None:
    current = d.req.WhichOneof("features")
    if current is None:
        return None
    kind = draw(st.sampled_from([k for k in ("none", "input", "ragged", "pyramid") if k != current]))
    if kind == "none":
        d.req.ClearField(current)
    elif kind == "input":
        _dense(d, 6, 7)
    elif kind == "ragged":
        _ragged(d, [(5, 6)] * d.n)
    else:
        _pyramid(draw, d)
    return f"features_kind@{kind}"


def _m_channels(draw, d: _Draft) -> str | None:
    """One ragged map or pyramid level with another channel count; for the ps ops, a count
    that output_size does not divide."""
    maps = _map_messages(d)
    if d.req.WhichOneof("features") == "input":
        if d.req.op not in PS_OPS or not _intact(d.req.input, 4):
            return None
        shape = list(d.req.input.shape)
        shape[1] += draw(st.integers(1, 3))
        d.req.input.CopyFrom(
            _tensor(d.req.input.dtype, tuple(shape), d.values(d.req.input.dtype, tuple(shape)))
        )
        return "channels@input"
    if len(maps) < 2:
        return None
    where, msg = draw(st.sampled_from(maps[1:]))
    axis = 0 if where.startswith("ragged") else 1
    if not _intact(msg, 3 if axis == 0 else 4):
        return None
    shape = list(msg.shape)
    shape[axis] = shape[axis] + 1 if draw(st.booleans()) or shape[axis] == 1 else shape[axis] - 1
    msg.CopyFrom(_tensor(msg.dtype, tuple(shape), d.values(msg.dtype, tuple(shape))))
    return f"channels@{where}"


def _m_map_dtypes(draw, d: _Draft) -> str | None:
    """One ragged map or pyramid level in another dtype than the first (bytes to match)."""
    maps = _map_messages(d)
    if len(maps) < 2:
        return None
    where, msg = draw(st.sampled_from(maps[1:]))
    if not _intact(msg, 3 if where.startswith("ragged") else 4):
        return None
    dtype = draw(st.sampled_from([t for t in VALID_DTYPES if t != msg.dtype]))
    msg.CopyFrom(_tensor(dtype, tuple(msg.shape), d.values(dtype, tuple(msg.shape))))
    return f"map_dtypes@{where}"


def _m_batch(draw, d: _Draft) -> str | None:
    """A pyramid level with another number of images."""
    maps = [(w, m) for w, m in _map_messages(d) if w.startswith("level")]
    if len(maps) < 2:
        return None
    where, msg = draw(st.sampled_from(maps[1:]))
    if not _intact(msg, 4):
        return None
    shape = list(msg.shape)
    shape[0] += 1
    msg.CopyFrom(_tensor(msg.dtype, tuple(shape), d.values(msg.dtype, tuple(shape))))
    return f"batch@{where}"


def _m_no_maps(draw, d: _Draft) -> str | None:
    kind = d.req.WhichOneof("features")
    if kind == "ragged":
        d.req.ragged.ClearField("maps")
    elif kind == "pyramid":
        d.req.pyramid.ClearField("levels")
    else:
        return None
    return f"no_maps@{kind}"


def _m_level_scales(draw, d: _Draft) -> str | None:
    """Level scales given on some levels only, with bad values, not halving, or missing with
    no image sizes (or bad ones) to infer them from."""
    if d.req.WhichOneof("features") != "pyramid" or not d.req.pyramid.levels:
        return None
    pyramid = d.req.pyramid
    how = draw(st.sampled_from(["some", "bad_value", "not_halving", "no_sizes", "bad_size"]))
    if how == "some":
        if len(pyramid.levels) < 2:
            return None
        for i, lv in enumerate(pyramid.levels):
            if i % 2:
                lv.ClearField("spatial_scale")
            else:
                lv.spatial_scale = 0.25 / 2**i
    elif how == "bad_value":
        values = [0.0, -0.5, 0.3, 2.0**1000, 2.0**-1074, 1e308, *NONFINITE]
        for i, lv in enumerate(pyramid.levels):
            lv.spatial_scale = 0.25 / 2**i
        pyramid.levels[draw(st.integers(0, len(pyramid.levels) - 1))].spatial_scale = draw(
            st.sampled_from(values)
        )
    elif how == "not_halving":
        if len(pyramid.levels) < 2:
            return None
        factor = draw(st.sampled_from([1.0, 2.0, 0.25]))
        for i, lv in enumerate(pyramid.levels):
            lv.spatial_scale = 0.25 * factor**i
    elif how == "no_sizes":
        for lv in pyramid.levels:
            lv.ClearField("spatial_scale")
        pyramid.ClearField("image_sizes")
    else:
        for lv in pyramid.levels:
            lv.ClearField("spatial_scale")
        if not pyramid.image_sizes:
            pyramid.image_sizes.add(height=16, width=16)
        size = pyramid.image_sizes[draw(st.integers(0, len(pyramid.image_sizes) - 1))]
        which = draw(st.sampled_from(["height", "width"]))
        setattr(size, which, draw(st.sampled_from([0, 1, 3, 2**32 - 1])))
    return f"level_scales@{how}"


def _m_many_levels(draw, d: _Draft) -> str | None:
    """A pyramid of hundreds of 1x1 levels, their scales halving (valid) or not (an error
    that would quote every scale)."""
    if d.req.WhichOneof("features") != "pyramid":
        return None
    count = draw(st.sampled_from([12, 200, 1000]))
    halving = draw(st.booleans())
    d.req.pyramid.ClearField("levels")
    d.req.pyramid.ClearField("image_sizes")
    for i in range(count):
        lv = d.req.pyramid.levels.add(spatial_scale=2.0 ** -(i if halving else i // 2))
        lv.map.CopyFrom(_tensor(d.dtype, (d.n, d.c, 1, 1), d.values(d.dtype, (d.n, d.c, 1, 1))))
    return "many_levels"


def _m_box_columns(draw, d: _Draft) -> str | None:
    boxes = [(w, m) for w, m in _box_messages(d) if _intact(m, 2)]
    if not boxes:
        return None
    for _, msg in boxes:
        cols = max(msg.shape[1] + draw(st.sampled_from([-1, 1, 2])), 0)
        msg.CopyFrom(_encode_boxes(np.zeros((msg.shape[0], cols)), msg.dtype))
    return "box_columns"


def _m_box_dtype(draw, d: _Draft) -> str | None:
    boxes = _box_messages(d)
    if not boxes:
        return None
    where, msg = draw(st.sampled_from(boxes))
    if not _intact(msg, 2):
        return None
    dtype = draw(st.sampled_from([F16, BF16]))
    with np.errstate(over="ignore"):
        values = np.frombuffer(msg.data, wire.WIRE_DTYPES[msg.dtype]).astype(np.float32)
        data = (
            wire.float32_to_bfloat16_bits(values).tobytes()
            if dtype == BF16
            else values.astype(np.float16).tobytes()
        )
    msg.dtype, msg.data = dtype, data
    return f"box_dtype@{where}"


def _m_no_boxes(draw, d: _Draft) -> str:
    if draw(st.booleans()):
        d.req.ClearField("boxes")
    else:
        d.req.boxes.SetInParent()
        d.req.boxes.ClearField(d.req.boxes.WhichOneof("layout") or "rois")
    return "no_boxes"


def _edit_boxes(d: _Draft, edit: Callable[[np.ndarray, bool], bool]) -> bool:
    """Applies ``edit(rows, has_index)`` to the first non-empty box tensor; False when there
    is none."""
    for _, msg in _box_messages(d):
        if not _intact(msg, 2) or not msg.shape[0] or msg.dtype not in BOX_DTYPES or msg.shape[1] < 2:
            continue
        rows = (
            np.frombuffer(msg.data, wire.WIRE_DTYPES[msg.dtype]).reshape(tuple(msg.shape)).astype(np.float64)
        )
        if not edit(rows, d.req.boxes.WhichOneof("layout") == "rois"):
            return False
        with np.errstate(over="ignore", invalid="ignore"):
            msg.data = rows.astype(wire.WIRE_DTYPES[msg.dtype]).tobytes()
        return True
    return False


def _m_nonfinite_box(draw, d: _Draft) -> str | None:
    value = draw(st.sampled_from(NONFINITE))

    def edit(rows, has_index):
        rows[draw(st.integers(0, len(rows) - 1)), draw(st.integers(int(has_index), rows.shape[1] - 1))] = (
            value
        )
        return True

    return "nonfinite_box" if _edit_boxes(d, edit) else None


def _m_box_overflow(draw, d: _Draft) -> str | None:
    """float64 boxes past float32's range, sent with maps whose boxes the service keeps in
    float32 (valid with float64 maps)."""
    boxes = [(w, m) for w, m in _box_messages(d) if _intact(m, 2) and m.shape[0] and m.shape[1] >= 2]
    if not boxes:
        return None
    where, msg = draw(st.sampled_from(boxes))
    rows = np.full(tuple(msg.shape), draw(st.sampled_from([1e39, -1e39, 1e300])))
    if d.req.boxes.WhichOneof("layout") == "rois":
        rows[:, 0] = 0
    msg.dtype, msg.data = F64, rows.tobytes()
    return f"box_overflow@{where}"


def _m_image_index(draw, d: _Draft) -> str | None:
    if d.req.boxes.WhichOneof("layout") != "rois":
        return None
    value = draw(
        st.sampled_from([-1.0, -0.5, float(d.n), d.n + 0.5, 0.5, 1e9, 2.0**63, -(2.0**63), *NONFINITE])
    )

    def edit(rows, has_index):
        rows[draw(st.integers(0, len(rows) - 1)), 0] = value
        return True

    return "image_index" if _edit_boxes(d, edit) else None


def _m_extra_box_lists(draw, d: _Draft) -> str | None:
    """More per-image box lists than images: their boxes point past the last image."""
    if d.req.boxes.WhichOneof("layout") != "per_image":
        return None
    lists = d.req.boxes.per_image.boxes
    box_dtype = lists[0].dtype if lists else F32
    while len(lists) < d.n + draw(st.integers(1, 2)):
        rows = _box_rows(
            draw, d, draw(st.integers(0, 3)), box_dtype if box_dtype in BOX_DTYPES else F32, False
        )
        lists.add().CopyFrom(_encode_boxes(rows, box_dtype if box_dtype in BOX_DTYPES else F32))
    return "extra_box_lists"


def _m_many_boxes(draw, d: _Draft) -> str:
    """More boxes than a small server allows (the output stays small)."""
    k = draw(st.sampled_from([300, 3000]))
    rows = np.tile(np.array([[0.0, 1.0, 1.0, 5.0, 5.0, 0.0][: d.cols + 1]]), (k, 1))
    d.req.boxes.rois.CopyFrom(_encode_boxes(rows, F32))
    return "many_boxes"


MUTATORS: dict[str, Callable[[Any, _Draft], str | None]] = {
    "unknown_op": _m_unknown_op,
    "other_op": _m_other_op,
    "output_size": _m_output_size,
    "spatial_scale": _m_spatial_scale,
    "sampling_ratio": _m_sampling_ratio,
    "pool_mode": _m_pool_mode,
    "canonical_scale": _m_canonical_scale,
    "out_dtype": _m_out_dtype,
    "features_kind": _m_features_kind,
    "map_tensor": _m_map_tensor,
    "channels": _m_channels,
    "map_dtypes": _m_map_dtypes,
    "batch": _m_batch,
    "no_maps": _m_no_maps,
    "level_scales": _m_level_scales,
    "many_levels": _m_many_levels,
    "box_tensor": _m_box_tensor,
    "box_columns": _m_box_columns,
    "box_dtype": _m_box_dtype,
    "no_boxes": _m_no_boxes,
    "nonfinite_box": _m_nonfinite_box,
    "box_overflow": _m_box_overflow,
    "image_index": _m_image_index,
    "extra_box_lists": _m_extra_box_lists,
    "many_boxes": _m_many_boxes,
    "shared_memory": _m_shared_memory,
}


# Damage to the serialised bytes.
def _varint(value: int, width: int = 0) -> bytes:
    """``value`` as a varint (two's complement in 64 bits), padded to ``width`` bytes with
    continuation bytes (an overlong but valid encoding) when that is more than it needs."""
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value or len(out) + 1 < width:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _b_truncate(draw, payload: bytes) -> bytes:
    return payload[: draw(st.integers(0, max(len(payload) - 1, 0)))]


def _b_flip(draw, payload: bytes) -> bytes:
    if not payload:
        return b"\xff"
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 3))):
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return bytes(data)


def _b_append(draw, payload: bytes) -> bytes:
    return payload + draw(st.binary(min_size=1, max_size=16))


def _b_bad_utf8_id(draw, payload: bytes) -> bytes:
    # Field 1 (id, a string) holding bytes that are not UTF-8.
    text = draw(st.sampled_from([b"\xff", b"\xc3", b"a\xed\xa0\x80b", b"\xf8\x88\x80\x80\x80"]))
    return payload + b"\x0a" + _varint(len(text)) + text


def _b_unknown_field(draw, payload: bytes) -> bytes:
    number = draw(st.sampled_from([9, 99, 536870911]))
    return payload + _varint(number << 3) + _varint(draw(st.integers(0, 2**64 - 1)))


def _b_merge(draw, payload: bytes) -> bytes:
    # A second occurrence of fields: the last scalar wins, messages merge, repeated fields
    # (a tensor's shape) concatenate.
    fragment = draw(
        st.sampled_from(
            [
                roi_pb2.PoolRequest(op=ROI_POOL),
                roi_pb2.PoolRequest(params=roi_pb2.PoolParams(pooled_height=3)),
                roi_pb2.PoolRequest(input=roi_pb2.Tensor(shape=[2])),
                roi_pb2.PoolRequest(boxes=roi_pb2.Boxes(rois=roi_pb2.Tensor(shape=[1]))),
                roi_pb2.PoolRequest(out_dtype=F16),
            ]
        )
    )
    return payload + fragment.SerializeToString()


def _b_oversized(draw, payload: bytes) -> bytes:
    # An unknown field of just over 1 MiB: past the message limit of a server that sets it that
    # low (RESOURCE_EXHAUSTED from gRPC itself), ignored by one that does not. A stream that
    # carries it ends with that status as a whole, so the streams leave such cases out.
    return payload + _varint((99 << 3) | 2) + _varint(OVERSIZED_BYTES) + bytes(OVERSIZED_BYTES)


OVERSIZED_BYTES = (1 << 20) + 4096

BYTE_MUTATORS: dict[str, Callable[[Any, bytes], bytes]] = {
    "truncate_message": _b_truncate,
    "flip_bytes": _b_flip,
    "append_bytes": _b_append,
    "bad_utf8_id": _b_bad_utf8_id,
    "unknown_field": _b_unknown_field,
    "merge_fields": _b_merge,
    "oversized": _b_oversized,
}

# What pool_requests draws from; a tensor's own fields are broken twice as often. (The labels
# it records name the tensor mutation itself: "map_truncate@input", "box_rank@rois".) An
# oversized message costs the transport ~0.1 s or more: it is drawn apart, about once in a
# hundred broken requests.
MUTATION_KINDS = (
    tuple(MUTATORS) + ("map_tensor", "box_tensor") + tuple(k for k in BYTE_MUTATORS if k != "oversized")
)


# Aimed at the zero-copy parser (roi_client.framing), which the server uses on messages of
# framing.WALK_MIN_BYTES and more: hostile keys, lengths, wire types and nesting, and a prefix
# that makes any request that large.


def wire_field(number: int, wire_type: int, body: bytes = b"", *, key_width: int = 0, len_width: int = 0) -> bytes:
    key = _varint((number << 3) | wire_type, key_width)
    if wire_type == 2:
        return key + _varint(len(body), len_width) + body
    return key + body


@st.composite
def tensor_bytes(draw) -> bytes:
    """A Tensor's fields, valid or damaged where the walker looks."""
    dtype = draw(st.integers(0, 5))
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    n = int(np.prod(shape)) if shape else 1
    data = bytes(draw(st.binary(min_size=0, max_size=8))) + bytes(range(256))[: 4 * n % 256]
    parts = [wire_field(1, 0, _varint(dtype))]
    if draw(st.booleans()):
        parts.append(wire_field(2, 2, b"".join(_varint(s) for s in shape)))  # packed
    else:
        parts.extend(wire_field(2, 0, _varint(s)) for s in shape)  # unpacked
    parts.append(wire_field(3, 2, data, key_width=draw(st.sampled_from([0, 0, 2, 5, 6])), len_width=draw(st.sampled_from([0, 0, 3, 10, 11]))))
    extra = draw(
        st.lists(
            st.sampled_from(
                [
                    wire_field(3, 2, b"second data wins"),
                    wire_field(3, 0, _varint(7)),  # data with the wrong wire type: an unknown field
                    wire_field(3, 5, b"\x01\x02\x03\x04"),
                    wire_field(15, 2, bytes(5)),  # padding, as our encoder writes it
                    wire_field(9, 3) + wire_field(1, 0, b"\x01") + wire_field(9, 4),  # a group
                    wire_field(9, 4),  # an end group alone
                    wire_field(9, 6),
                    wire_field(9, 7),
                    wire_field(0, 0, b"\x00"),
                    wire_field((1 << 29) - 1, 0, b"\x01"),
                    wire_field(1 << 29, 0, b"\x01"),
                    b"\x1a\xff\xff\xff\xff\x0f",  # data whose length runs past the end
                    b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
                    wire_field(4, 2, wire_field(1, 2, b"roi_x") + wire_field(3, 0, _varint(4))),  # a shared-memory ref
                ]
            ),
            max_size=3,
        )
    )
    for e in extra:
        parts.insert(draw(st.integers(0, len(parts))), e)
    return b"".join(parts)


@st.composite
def hostile_framing_bytes(draw) -> bytes:
    """Bytes aimed at roi_client.framing's walker: a PoolRequest built from damaged tensors,
    nested where the walker goes into them, with the fields a oneof or a merge makes
    interesting, then perhaps truncated, flipped, or with bytes inserted or deleted."""
    tensor = lambda: draw(tensor_bytes())
    level = lambda: wire_field(1, 2, tensor()) + draw(st.sampled_from([b"", wire_field(2, 1, np.float64(0.25).tobytes())]))
    choices = [
        lambda: wire_field(4, 2, tensor()),
        lambda: wire_field(5, 2, b"".join(wire_field(1, 2, level()) for _ in range(draw(st.integers(0, 3))))),
        lambda: wire_field(6, 2, b"".join(wire_field(1, 2, tensor()) for _ in range(draw(st.integers(0, 3))))),
        lambda: wire_field(7, 2, wire_field(1, 2, tensor())),
        lambda: wire_field(7, 2, wire_field(2, 2, b"".join(wire_field(1, 2, tensor()) for _ in range(draw(st.integers(0, 3)))))),
        lambda: wire_field(1, 2, draw(st.sampled_from([b"req", b"\xff\xfe", b""]))),
        lambda: wire_field(2, 0, _varint(draw(st.integers(-3, 9)))),
        lambda: wire_field(3, 2, wire_field(1, 0, _varint(7)) + wire_field(2, 0, _varint(7))),
        lambda: wire_field(4, 0, _varint(1)),  # a message field with the wrong wire type
        lambda: wire_field(99, 2, wire_field(4, 2, tensor())),  # a tensor inside an unknown field
        lambda: wire_field(5, 2, wire_field(1, 2, wire_field(1, 2, tensor()), len_width=4)),
    ]
    parts = [draw(st.sampled_from(choices))() for _ in range(draw(st.integers(1, 5)))]
    raw = b"".join(parts)
    cut = draw(st.sampled_from(["none", "none", "truncate", "flip", "insert", "delete"]))
    if raw and cut == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif raw and cut == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1 :]
    elif cut == "insert":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(min_size=1, max_size=4)) + raw[i:]
    elif raw and cut == "delete":
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + raw[i + draw(st.integers(1, 4)) :]
    return raw



# An unknown field (number 127) that takes a message past framing.WALK_MIN_BYTES: the server
# then reads it with the zero-copy walker instead of protobuf alone. It means nothing.
WALKED_PREFIX = wire_field(127, 2, bytes(framing.WALK_MIN_BYTES))


def _parse(payload: bytes) -> roi_pb2.PoolRequest | None:
    try:
        return roi_pb2.PoolRequest.FromString(payload)
    except Exception:  # noqa: BLE001  (a DecodeError of some kind)
        return None


@st.composite
def valid_requests(draw) -> FuzzCase:
    """A valid request (see the module's doc): it must get a result."""
    d = draw(_valid_draft())
    payload = d.req.SerializeToString()
    return FuzzCase(payload, d.req, (), tuple(dict.fromkeys(d.extremes)), not d.special)


@st.composite
def pool_requests(draw, valid_share: float = 0.3) -> FuzzCase:
    """One fuzz case: random bytes (nominally 1 in 50; fewer come out, as hypothesis does not
    repeat a case and short byte strings soon repeat), else a valid request, left alone when a
    draw from 0..99 falls below ``100 * valid_share`` and else broken by one to three
    mutations. (Hypothesis favours small draws: with the default about half the cases stay
    valid.)"""
    pick = draw(st.integers(0, 49))
    if pick == 0:
        raw = draw(st.binary(max_size=64))
        return FuzzCase(raw, _parse(raw), ("garbage",))
    if pick == 49:
        raw = WALKED_PREFIX + draw(hostile_framing_bytes())
        return FuzzCase(raw, _parse(raw), ("hostile_framing",))
    d = draw(_valid_draft())
    byte_kinds = []
    if draw(st.integers(0, 99)) >= 100 * valid_share:
        for kind in draw(st.lists(st.sampled_from(MUTATION_KINDS), min_size=1, max_size=3)):
            if kind in BYTE_MUTATORS:
                byte_kinds.append(kind)
                continue
            label = MUTATORS[kind](draw, d)
            if label:
                d.mutations.append(label)
        if draw(st.integers(0, 99)) == 37:  # not 0: hypothesis favours the ends of a range
            byte_kinds.append("oversized")
    payload = d.req.SerializeToString()
    for kind in byte_kinds:
        payload = BYTE_MUTATORS[kind](draw, payload)
        d.mutations.append(kind)
    request = _parse(payload) if byte_kinds else d.req
    if len(payload) < framing.WALK_MIN_BYTES and draw(st.booleans()):
        # The same request, read by the walker (see WALKED_PREFIX).
        payload = WALKED_PREFIX + payload
        d.extremes.append("walked")
    return FuzzCase(payload, request, tuple(d.mutations), tuple(dict.fromkeys(d.extremes)), not d.special)


# ---------------------------------------------------------------------------------------------
# Judging an answer


def expected_output(req: roi_pb2.PoolRequest) -> tuple[tuple[int, int, int, int], int]:
    """(shape, wire dtype) that a successful answer to ``req`` must have, from the request's
    fields alone: ``[K, C, PH, PW]`` with K the boxes, C the channels (ps ops: divided by
    PH * PW), and the requested out_dtype or else the features' dtype."""
    kind = req.WhichOneof("features")
    if kind == "input":
        maps, channels = [req.input], int(req.input.shape[1])
    elif kind == "ragged":
        maps = list(req.ragged.maps)
        channels = int(maps[0].shape[0])
    elif kind == "pyramid":
        maps = [lv.map for lv in req.pyramid.levels]
        channels = int(maps[0].shape[1])
    else:
        raise ValueError("no features")
    layout = req.boxes.WhichOneof("layout")
    if layout == "rois":
        k = int(req.boxes.rois.shape[0])
    elif layout == "per_image":
        k = sum(int(t.shape[0]) for t in req.boxes.per_image.boxes)
    else:
        raise ValueError("no boxes")
    ph, pw = int(req.params.pooled_height), int(req.params.pooled_width)
    if req.op in PS_OPS:
        channels //= ph * pw
    dtype = req.out_dtype if req.out_dtype != roi_pb2.DTYPE_UNSPECIFIED else maps[0].dtype
    return (k, channels, ph, pw), dtype


def check_message(code: grpc.StatusCode, message: str) -> None:
    if not message or not message.strip():
        raise Violation(f"{code.name} without a message")
    if LOST.search(message):
        raise Violation(f"{code.name} from the transport, not the server: {message!r}")
    if len(message) > MAX_MESSAGE_CHARS:
        raise Violation(f"{code.name} message of {len(message)} characters: {message[:200]!r}...")
    leak = LEAKS.search(message)
    if leak:
        raise Violation(f"{code.name} message reveals internals ({leak.group(0)!r}): {message!r}")


def classify(case: FuzzCase, code: grpc.StatusCode, message: str, response: bytes | None) -> str:
    """The answer's category ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"); raises
    :class:`Violation` for any other status, a refusal of a valid request as invalid, a
    message that is empty, long or leaks internals, or a result inconsistent with the request.

    ``response`` is a serialised PoolResponse (for OK)."""
    if code == grpc.StatusCode.OK:
        if case.request is None:
            raise Violation("bytes that are not a PoolRequest were answered with a result")
        if response is None:
            raise Violation("OK without a response")
        resp = roi_pb2.PoolResponse.FromString(response)
        try:
            shape, dtype = expected_output(case.request)
        except (ValueError, IndexError) as exc:
            raise Violation(f"a result for a request without usable features or boxes ({exc})") from None
        got = tuple(int(s) for s in resp.output.shape)
        if got != shape:
            raise Violation(f"result shape {list(got)}, expected {list(shape)}")
        if resp.output.dtype != dtype:
            raise Violation(
                f"result dtype {wire.dtype_name(resp.output.dtype)}, expected {wire.dtype_name(dtype)}"
            )
        held = (
            resp.output.shared_memory.byte_size if resp.output.HasField("shared_memory") else len(resp.output.data)
        )
        if held != math.prod(shape) * ITEMSIZE[dtype]:
            raise Violation(f"result holds {held} bytes for shape {list(shape)}")
        if resp.id != case.request.id:
            raise Violation(f"result id {resp.id!r}, expected {case.request.id!r}")
        return "OK"
    # A reference to shared memory may also find it off, or its region shrunk; a feature
    # handle (damaged bytes can name one) is unknown.
    shm = any(k.startswith("shm_ref") for k in case.mutations)
    handle = case.request is not None and case.request.WhichOneof("features") == "handle"
    if code not in REFUSALS and not ((shm or handle) and code == grpc.StatusCode.FAILED_PRECONDITION):
        raise Violation(f"status {code.name}: {message!r}")
    if case.valid and code == grpc.StatusCode.INVALID_ARGUMENT:
        raise Violation(f"a valid request was refused: {message!r}")
    check_message(code, message)
    return code.name


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a stream item's numeric code."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    raise Violation(f"unknown status code {value}")


# ---------------------------------------------------------------------------------------------
# Reference results (torch and roi_kernels, imported only here)


def decoded_output(response: bytes):
    """A successful answer's output as a torch tensor (bfloat16 kept)."""
    resp = roi_pb2.PoolResponse.FromString(response)
    return wire.decode_array(resp.output, "output", as_torch=True)


def reference_output(req: roi_pb2.PoolRequest):
    """The in-process ``roi_kernels`` result for a valid request, on the same tensors as the
    service: the maps as sent, the boxes in the kernels' accumulation dtype (float64 for
    float64 maps, else float32), the result in ``out_dtype``."""
    import torch

    import roi_kernels

    def tensor(msg):
        return wire.decode_array(msg, as_torch=True)

    kind = req.WhichOneof("features")
    if kind == "input":
        maps = [tensor(req.input)]
    elif kind == "ragged":
        maps = [tensor(m) for m in req.ragged.maps]
    else:
        maps = [tensor(lv.map) for lv in req.pyramid.levels]
    acc = torch.float64 if maps[0].dtype == torch.float64 else torch.float32
    cols = 5 if req.op == ROTATED else 4
    if req.boxes.WhichOneof("layout") == "rois":
        rois = tensor(req.boxes.rois).to(acc)
    elif len(req.boxes.per_image.boxes):
        rois = roi_kernels.convert_boxes_to_rois(
            [tensor(t).to(acc) for t in req.boxes.per_image.boxes], cols=cols
        )
    else:
        rois = torch.empty((0, cols + 1), dtype=acc)

    p = req.params
    size = (int(p.pooled_height), int(p.pooled_width))
    scale = p.spatial_scale if p.HasField("spatial_scale") else 1.0
    ratio = p.sampling_ratio if p.HasField("sampling_ratio") else -1
    aligned = p.aligned if p.HasField("aligned") else req.op == ROTATED
    mode = "max" if p.pool_mode == roi_pb2.POOL_MODE_MAX else "avg"
    canonical_scale = p.canonical_scale if p.HasField("canonical_scale") else 224
    canonical_level = p.canonical_level if p.HasField("canonical_level") else 4

    if req.op == ROI_ALIGN:
        out = roi_kernels.roi_align(
            maps[0] if kind == "input" else maps, rois, size, scale, ratio, aligned, mode
        )
    elif req.op == ROI_POOL:
        out = roi_kernels.roi_pool(maps[0], rois, size, scale)
    elif req.op == PS_ROI_ALIGN:
        out = roi_kernels.ps_roi_align(maps[0], rois, size, scale, ratio)
    elif req.op == PS_ROI_POOL:
        out = roi_kernels.ps_roi_pool(maps[0], rois, size, scale)
    elif req.op == ROTATED:
        out = roi_kernels.roi_align_rotated(maps[0], rois, size, scale, ratio, aligned)
    elif all(lv.HasField("spatial_scale") for lv in req.pyramid.levels):
        scales = [lv.spatial_scale for lv in req.pyramid.levels]
        out = torch.ops.roi_kernels.multiscale_roi_align(
            maps, rois, scales, *size, ratio, aligned, mode, canonical_scale, canonical_level
        )
    else:
        sizes = [(s.height, s.width) for s in req.pyramid.image_sizes]
        out = roi_kernels.multiscale_roi_align(
            maps, rois, sizes, size, ratio, aligned, canonical_scale, canonical_level, mode
        )
    if req.out_dtype != roi_pb2.DTYPE_UNSPECIFIED:
        out = out.to(
            {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16, F64: torch.float64}[req.out_dtype]
        )
    return out


# ---------------------------------------------------------------------------------------------
# Uploads (UploadFeatures): a client stream of messages, each some images of one map, a
# ragged set or a pyramid

UPLOAD_METHOD = "/roi.v1.RoIService/UploadFeatures"
UPLOAD_KINDS = ("map", "ragged", "pyramid")
# Mutations after which the upload must be refused; "garbage" (random bytes for a message)
# and "shuffle" may by chance still make a valid upload.
UPLOAD_MUTATIONS = (
    "garbage",
    "unknown_dtype",
    "short_data",
    "kind_mix",
    "channels",
    "dtype_mix",
    "ttl",
    "no_features",
    "rank",
    "no_messages",
    "shm_ref",
    "huge_dims",
    "image_sizes",
    "scales",
    "zero_dim",
)
_MAYBE_VALID = {"garbage"}


@dataclass
class UploadCase:
    """An upload to send: its messages, what was done to a valid one (empty: valid), and the
    map bytes a valid one stores."""

    messages: list[bytes]
    mutations: tuple[str, ...] = ()
    nbytes: int = 0
    kind: str = ""

    @property
    def valid(self) -> bool:
        return not self.mutations

    @property
    def must_fail(self) -> bool:
        return any(m not in _MAYBE_VALID for m in self.mutations)


def random_upload(rng: np.random.Generator, valid_share: float = 0.4, max_side: int = 24) -> UploadCase:
    """A valid upload of 1 to 3 messages (each of 1 to 3 images; every dtype; maps of up to
    ``max_side`` pixels a side), left alone with probability ``valid_share``, else broken by
    one mutation of :data:`UPLOAD_MUTATIONS`."""
    kind = UPLOAD_KINDS[int(rng.integers(0, 3))]
    dtype = VALID_DTYPES[int(rng.integers(0, len(VALID_DTYPES)))]
    c = int(rng.integers(1, 9))
    chunks = [int(rng.integers(1, 4)) for _ in range(int(rng.integers(1, 4)))]
    h, w = int(rng.integers(1, max_side + 1)), int(rng.integers(1, max_side + 1))
    levels = int(rng.integers(1, 4))
    by_scales = bool(rng.integers(0, 2))
    msgs: list[roi_pb2.UploadFeaturesRequest] = []
    nbytes = 0
    for n in chunks:
        m = roi_pb2.UploadFeaturesRequest()
        if kind == "map":
            shape = (n, c, h, w)
            m.input.CopyFrom(_tensor(dtype, shape, _values(dtype, shape, rng, False)))
            nbytes += math.prod(shape) * ITEMSIZE[dtype]
        elif kind == "ragged":
            m.ragged.SetInParent()
            for _ in range(n):
                shape = (c, int(rng.integers(1, max_side + 1)), int(rng.integers(1, max_side + 1)))
                m.ragged.maps.add().CopyFrom(_tensor(dtype, shape, _values(dtype, shape, rng, False)))
                nbytes += math.prod(shape) * ITEMSIZE[dtype]
        else:
            # Level l is 1/2**(l+2) of a 64-pixel image: scales 1/4, 1/8, ... whether given or
            # inferred (from image heights of 48 to 64, which round the same way).
            for lv in range(levels):
                side = max(1, 16 >> lv)
                shape = (n, c, side, side)
                level = m.pyramid.levels.add()
                level.map.CopyFrom(_tensor(dtype, shape, _values(dtype, shape, rng, False)))
                nbytes += math.prod(shape) * ITEMSIZE[dtype]
                if by_scales:
                    level.spatial_scale = 0.25 / (1 << lv)
            if not by_scales:
                for _ in range(n):
                    m.pyramid.image_sizes.add(height=int(rng.integers(48, 65)), width=int(rng.integers(48, 65)))
        msgs.append(m)
    if rng.random() < 0.5:
        msgs[0].ttl_seconds = float(rng.choice([0.5, 10.0, 1e9]))
    mutations: list[str] = []
    if rng.random() >= valid_share:
        mutations.append(_break_upload(rng, msgs, kind))
    raw = [m.SerializeToString() for m in msgs]
    if "garbage" in mutations:
        i = int(rng.integers(0, len(raw)))
        raw[i] = rng.bytes(int(rng.integers(0, 64)))
    if "no_messages" in mutations:
        raw = []
    return UploadCase(raw, tuple(mutations), nbytes, kind)


def _first_tensor(m: roi_pb2.UploadFeaturesRequest) -> roi_pb2.Tensor:
    which = m.WhichOneof("features")
    if which == "input":
        return m.input
    if which == "ragged":
        return m.ragged.maps[0]
    return m.pyramid.levels[0].map


def _break_upload(rng: np.random.Generator, msgs: list[roi_pb2.UploadFeaturesRequest], kind: str) -> str:
    choices = [k for k in UPLOAD_MUTATIONS if not (k in ("image_sizes", "scales") and kind != "pyramid")]
    if len(msgs) < 2:
        choices = [k for k in choices if k not in ("kind_mix", "channels", "dtype_mix")]
    what = choices[int(rng.integers(0, len(choices)))]
    i = int(rng.integers(0, len(msgs)))
    t = _first_tensor(msgs[i])
    if what == "unknown_dtype":
        t.dtype = UNKNOWN_DTYPES[int(rng.integers(0, len(UNKNOWN_DTYPES)))]
    elif what == "short_data":
        t.data = t.data[: len(t.data) - int(rng.integers(1, len(t.data) + 1))]
    elif what == "kind_mix":
        other = [k for k in ("input", "ragged", "pyramid") if k != msgs[0].WhichOneof("features")]
        pick = other[int(rng.integers(0, 2))]
        m = msgs[-1]
        if pick == "input":
            m.input.CopyFrom(_tensor(F32, (1, 1, 2, 2), bytes(16)))
        elif pick == "ragged":
            m.ragged.maps.add().CopyFrom(_tensor(F32, (1, 2, 2), bytes(16)))
        else:
            m.pyramid.levels.add().map.CopyFrom(_tensor(F32, (1, 1, 2, 2), bytes(16)))
            m.pyramid.levels[0].spatial_scale = 0.25
    elif what in ("channels", "dtype_mix"):
        t = _first_tensor(msgs[-1])
        shape = list(t.shape)
        axis = 0 if len(shape) == 3 else 1
        dtype = t.dtype
        if what == "channels":
            shape[axis] += 1
        else:
            dtype = F64 if t.dtype != F64 else F32
        t.CopyFrom(_tensor(dtype, tuple(shape), bytes(math.prod(shape) * ITEMSIZE[dtype])))
    elif what == "ttl":
        msgs[0].ttl_seconds = float(rng.choice([-1.0, math.nan, -math.inf, math.inf]))
        if math.isinf(msgs[0].ttl_seconds) and msgs[0].ttl_seconds > 0:
            msgs[0].ttl_seconds = -5.0
    elif what == "no_features":
        msgs[i].ClearField(msgs[i].WhichOneof("features"))
    elif what == "rank":
        shape = list(t.shape) + [1] if rng.random() < 0.5 else list(t.shape)[1:]
        _set_shape(t, shape)
    elif what == "shm_ref":
        t.shared_memory.CopyFrom(roi_pb2.SharedMemoryRef(region=GONE_REGION, offset=0, byte_size=len(t.data) or 4))
    elif what == "huge_dims":
        shape = list(t.shape)
        shape[int(rng.integers(0, len(shape)))] = HUGE_DIMS[int(rng.integers(0, len(HUGE_DIMS)))]
        _set_shape(t, shape)
    elif what == "zero_dim":
        shape = list(t.shape)
        shape[int(rng.integers(0, len(shape)))] = 0
        t.CopyFrom(_tensor(t.dtype, tuple(shape), b""))
    elif what == "image_sizes":
        m = msgs[i]
        if m.pyramid.levels and m.pyramid.levels[0].HasField("spatial_scale"):
            m.pyramid.levels[-1].ClearField("spatial_scale")  # scales on some levels only
            if len(m.pyramid.levels) == 1:
                m.pyramid.image_sizes.add(height=0, width=5)
        elif m.pyramid.image_sizes:
            if rng.random() < 0.5:
                del m.pyramid.image_sizes[-1]
            else:
                m.pyramid.image_sizes[0].height = 0
        else:
            m.pyramid.image_sizes.add(height=0, width=5)
    elif what == "scales":
        m = msgs[i]
        for lv in m.pyramid.levels:
            lv.spatial_scale = float(rng.choice([0.3, -0.25, math.nan, 0.0, 3.0]))
    return what


@st.composite
def upload_requests(draw, valid_share: float = 0.4) -> UploadCase:
    """:func:`random_upload` as a hypothesis strategy (the draw picks its seed)."""
    return random_upload(np.random.default_rng(draw(st.integers(0, 2**63 - 1))), valid_share)


def classify_upload(case: UploadCase, code: grpc.StatusCode, message: str, response: bytes | None) -> str:
    """The answer's category; raises :class:`Violation` for a status other than OK,
    INVALID_ARGUMENT, RESOURCE_EXHAUSTED (the store's budget) or FAILED_PRECONDITION (handles
    or shared memory off), a broken upload stored, a valid one refused as invalid, a handle
    that does not hold the upload's bytes, or a bad message."""
    if code == grpc.StatusCode.OK:
        if case.must_fail:
            raise Violation(f"a broken upload ({', '.join(case.mutations)}) was stored")
        if response is None:
            raise Violation("OK without a response")
        resp = roi_pb2.UploadFeaturesResponse.FromString(response)
        if len(resp.handle) < 16:
            raise Violation(f"a guessable handle {resp.handle!r}")
        if case.valid and (resp.byte_size != case.nbytes or resp.kind != case.kind):
            raise Violation(f"stored {resp.byte_size} bytes of a {resp.kind}, sent {case.nbytes} of a {case.kind}")
        return "OK"
    if code not in REFUSALS and code != grpc.StatusCode.FAILED_PRECONDITION:
        raise Violation(f"status {code.name}: {message!r}")
    if case.valid and code == grpc.StatusCode.INVALID_ARGUMENT:
        raise Violation(f"a valid upload was refused: {message!r}")
    check_message(code, message)
    return code.name
