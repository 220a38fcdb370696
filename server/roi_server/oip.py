"""The Open Inference Protocol (KServe v2 / Triton's ``inference.GRPCInferenceService``) on the
same port as ``roi.v1``, over the same engine.

Each op is a model (``roi_align``, ...). A ModelInferRequest is translated into the
``roi.v1.PoolRequest`` it means, with its tensors' bytes left where they are (views of the
received message, or of the caller's shared memory region), and then goes through exactly what
a ``roi.v1`` request goes through: :func:`~roi_server.codec.decode_request`'s validation and
limits, the dynamic batcher (an OIP request and a ``roi.v1`` request for the same op and
parameters may share a kernel launch), the same metrics. Validation errors are reworded to
name the OIP input or parameter (``input 'rois' shape: must be [K, 5] ...``) instead of the
``roi.v1`` field.

Zero-copy framing: ``raw_input_contents`` and ``raw_output_contents`` are top-level repeated
``bytes`` fields, so a large request is split by a walk over its top-level fields only (the
payloads become views of the received bytes, protobuf parses the rest), and a response is its
header serialised by protobuf joined once with the output's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError, Message
from roi_client import codec as wire
from roi_client import framing
from roi_client import oip as wire_oip
from roi_client._proto.inference import grpc_service_pb2 as pb
from roi_client._proto.roi.v1 import roi_pb2

from . import __version__
from .codec import DecodedRequest, decode_request, write_output
from .errors import InvalidArgument, ServiceError, Unavailable, Unimplemented, status_of
from .streams import answer_stream

if TYPE_CHECKING:
    from .metrics import ServiceMetrics
    from .service import RoIService
    from .shm_service import SharedMemoryService

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
PROTOCOL = "oip"
T = TypeVar("T")

# As roi.v1's service: messages above this are parsed and serialised on a thread.
OFF_LOOP_BYTES = 1 << 20
# Below this a request is parsed by protobuf whole (its copies cost less than the walk).
WALK_MIN_BYTES = wire_oip.WALK_MIN_BYTES
DEADLINE_SLACK_S = 0.05


MODELS = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated", "multiscale_roi_align")
OP_OF_MODEL = {
    "roi_align": roi_pb2.OP_ROI_ALIGN,
    "roi_pool": roi_pb2.OP_ROI_POOL,
    "ps_roi_align": roi_pb2.OP_PS_ROI_ALIGN,
    "ps_roi_pool": roi_pb2.OP_PS_ROI_POOL,
    "roi_align_rotated": roi_pb2.OP_ROI_ALIGN_ROTATED,
    "multiscale_roi_align": roi_pb2.OP_MULTISCALE_ROI_ALIGN,
}
MAP_DATATYPES = {
    "FP32": roi_pb2.DTYPE_FLOAT32,
    "FP16": roi_pb2.DTYPE_FLOAT16,
    "BF16": roi_pb2.DTYPE_BFLOAT16,
    "FP64": roi_pb2.DTYPE_FLOAT64,
}
DATATYPE_OF_WIRE = {v: k for k, v in MAP_DATATYPES.items()}
BOX_DATATYPES = ("FP32", "FP64")
# Typed contents: the InferTensorContents field of each datatype that has one.
CONTENTS_FIELD = {
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "INT64": ("int64_contents", np.int64),
}
# The levels ModelMetadata lists for multiscale_roi_align (an FPN's P2-P5); requests may give
# any number, level_0 finest.
METADATA_LEVELS = 4

# The op's parameters (roi.v1.PoolParams' fields) and the ops that take each.
_ALL = frozenset(MODELS)
PARAMETERS: dict[str, frozenset[str]] = {
    "pooled_height": _ALL,
    "pooled_width": _ALL,
    "spatial_scale": _ALL - {"multiscale_roi_align"},
    "sampling_ratio": frozenset({"roi_align", "ps_roi_align", "roi_align_rotated", "multiscale_roi_align"}),
    "aligned": frozenset({"roi_align", "roi_align_rotated", "multiscale_roi_align"}),
    "pool_mode": frozenset({"roi_align", "multiscale_roi_align"}),
    "canonical_scale": frozenset({"multiscale_roi_align"}),
    "canonical_level": frozenset({"multiscale_roi_align"}),
}
# Request parameters of the protocol itself (or of its clients) that do not change the result.
IGNORED_PARAMETERS = frozenset(
    {
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "binary_data_output",
        "headers",
        "triton_enable_empty_final_response",
    }
)
SHM_REGION, SHM_OFFSET, SHM_BYTE_SIZE = (
    "shared_memory_region",
    "shared_memory_offset",
    "shared_memory_byte_size",
)
_SHM_PARAMETERS = frozenset({SHM_REGION, SHM_OFFSET, SHM_BYTE_SIZE})
_LEVEL = re.compile(r"level_(\d+)$")
_LEVEL_SCALE = re.compile(r"spatial_scale_(\d+)$")

EXTENSIONS = ("parameters", "binary_tensor_data")


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


def _unknown_model(name: str) -> NotFound:
    return NotFound(f"unknown model {name!r}: this server's models are {', '.join(MODELS)}")


# -- the message's bytes ------------------------------------------------------------------------


class _Views(framing.Frame):
    """The bytes of each tensor of a translated PoolRequest, by the index of the placeholder
    its ``data`` holds: views of the ModelInferRequest's raw_input_contents (no copy), or the
    array made from typed contents."""

    def __init__(self, views: list[Any]) -> None:
        super().__init__(b"")
        self.views = views

    def data(self, tensor: roi_pb2.Tensor) -> Any:
        data = tensor.data
        if len(data) >= 4:
            index = int.from_bytes(data[-4:], "little")
            if index < len(self.views) and data == framing.placeholder(index):
                return self.views[index]
        return data

    def offset(self, tensor: roi_pb2.Tensor) -> int | None:
        return None


def parse_infer_request(
    raw: bytes, min_bytes: int = WALK_MIN_BYTES
) -> tuple[pb.ModelInferRequest, list[Any]]:
    """``raw`` as a ModelInferRequest, and its raw_input_contents: views of ``raw`` for a
    message of ``min_bytes`` or more (:mod:`roi_client.oip`)."""
    try:
        req, raw_inputs = wire_oip.parse_infer_request(raw, min_bytes)
    except DecodeError as exc:
        raise InvalidArgument("", f"the message is not an inference.ModelInferRequest: {exc}") from None
    return req, raw_inputs


def serialize_infer_response(
    resp: pb.ModelInferResponse, payload: Any | None, wrap_key: bytes = b""
) -> bytes:
    """``resp`` with ``payload`` as its one raw_output_contents (none if None), joined once."""
    return wire_oip.serialize_infer_response(resp, [] if payload is None else [payload], wrap_key)


def peek_model_name(raw: bytes) -> str:
    """ModelInferRequest.model_name (field 1) read from the first fields of ``raw`` without
    parsing it (a refused request costs no copy of its tensors); "" where it is not found."""
    view = memoryview(raw)
    try:
        split_at = 0
        for _ in range(16):
            if split_at >= len(view):
                break
            key, pos = wire_oip.read_varint(view, split_at, len(view))
            if key & 7 == 2:
                length, body = wire_oip.read_varint(view, pos, len(view))
                if key >> 3 == 1:
                    return bytes(view[body : body + length]).decode("utf-8", "replace")
                split_at = body + length
            elif key & 7 == 0:
                _, split_at = wire_oip.read_varint(view, pos, len(view))
            elif key & 7 in (1, 5):
                split_at = pos + (8 if key & 7 == 1 else 4)
            else:
                break
    except ValueError:
        pass
    return ""


# -- translation ------------------------------------------------------------------------------

_FIELD_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"^pyramid\.levels\[(\d+)\]\.map"), lambda m: f"input 'level_{m.group(1)}'"),
    (
        re.compile(r"^pyramid\.levels\[(\d+)\]\.spatial_scale"),
        lambda m: f"parameter 'spatial_scale_{m.group(1)}'",
    ),
    (re.compile(r"^pyramid\.levels\.spatial_scale"), lambda m: "parameters 'spatial_scale_<l>'"),
    (re.compile(r"^pyramid\.levels"), lambda m: "inputs 'level_<l>'"),
    (re.compile(r"^pyramid\.image_sizes(\[\d+\])?"), lambda m: f"input 'image_sizes'{m.group(1) or ''}"),
    (re.compile(r"^boxes\.rois"), lambda m: "input 'rois'"),
    (re.compile(r"^boxes"), lambda m: "input 'rois'"),
    (re.compile(r"^input"), lambda m: "input 'input'"),
    (
        re.compile(r"^params\.pooled_height/pooled_width"),
        lambda m: "parameters 'pooled_height'/'pooled_width'",
    ),
    (re.compile(r"^params\.(\w+)"), lambda m: f"parameter '{m.group(1)}'"),
    (re.compile(r"^output_region"), lambda m: "output 'output'"),
]
_REST = {
    ".shape": " shape",
    ".dtype": " datatype",
    ".data": " contents",
    ".shared_memory.byte_size": " shared_memory_byte_size",
    ".shared_memory.region": " shared_memory_region",
    ".shared_memory": " shared memory",
    ".byte_size": " shared_memory_byte_size",
    ".region": " shared_memory_region",
}


def oip_field(field: str) -> str:
    """A roi.v1 field name, as an error message names it, in the OIP request's words."""
    for pattern, name in _FIELD_RULES:
        m = pattern.match(field)
        if m:
            rest = field[m.end() :]
            return name(m) + _REST.get(rest, rest)
    return field


def _reword(exc: ServiceError) -> ServiceError:
    """``exc`` naming the OIP input or parameter instead of the roi.v1 field."""
    if isinstance(exc, InvalidArgument) and exc.field:
        problem = exc.message[len(exc.field) + 2 :]
        return InvalidArgument(oip_field(exc.field), problem)
    text = exc.message
    head, sep, tail = text.partition(": ")
    if sep and re.fullmatch(r"[\w.\[\]/]+", head):
        renamed = oip_field(head)
        if renamed != head:
            out = ServiceError(f"{renamed}: {tail}", exc.code)
            return out
    return exc


def _param_value(name: str, p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidArgument(f"parameter '{name}'", "has no value")
    return getattr(p, kind), kind


def _int_param(name: str, p: pb.InferParameter, lo: int, hi: int) -> int:
    value, kind = _param_value(name, p)
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter '{name}'", f"must be an integer (int64_param), got {kind}")
    if not lo <= value <= hi:
        raise InvalidArgument(f"parameter '{name}'", f"must be in [{lo}, {hi}], got {value}")
    return int(value)


def _float_param(name: str, p: pb.InferParameter) -> float:
    value, kind = _param_value(name, p)
    if kind not in ("double_param", "int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter '{name}'", f"must be a number (double_param), got {kind}")
    return float(value)


def _params(model: str, parameters: Any, req: roi_pb2.PoolRequest) -> dict[int, float]:
    """Sets ``req.params`` from the request parameters; returns the per-level scales given
    (``spatial_scale_<l>``)."""
    params = req.params
    scales: dict[int, float] = {}
    int32 = (-(1 << 31), (1 << 31) - 1)
    for name, p in parameters.items():
        if name in IGNORED_PARAMETERS:
            continue
        level = _LEVEL_SCALE.match(name)
        if level and model == "multiscale_roi_align":
            scales[int(level.group(1))] = _float_param(name, p)
            continue
        ops = PARAMETERS.get(name)
        if ops is None or model not in ops:
            known = sorted(k for k, v in PARAMETERS.items() if model in v)
            if model == "multiscale_roi_align":
                known.append("spatial_scale_<l>")
            raise InvalidArgument(
                f"parameter '{name}'", f"unknown for model {model!r}, which takes {', '.join(known)}"
            )
        if name in ("pooled_height", "pooled_width"):
            setattr(params, name, _int_param(name, p, 1, (1 << 32) - 1))
        elif name == "spatial_scale":
            params.spatial_scale = _float_param(name, p)
        elif name in ("sampling_ratio", "canonical_scale", "canonical_level"):
            setattr(params, name, _int_param(name, p, *int32))
        elif name == "aligned":
            value, kind = _param_value(name, p)
            if kind != "bool_param":
                raise InvalidArgument(f"parameter '{name}'", f"must be a bool (bool_param), got {kind}")
            params.aligned = bool(value)
        elif name == "pool_mode":
            value, kind = _param_value(name, p)
            if kind != "string_param" or value not in ("avg", "max"):
                raise InvalidArgument(f"parameter '{name}'", f'must be "avg" or "max", got {value!r}')
            params.pool_mode = roi_pb2.POOL_MODE_MAX if value == "max" else roi_pb2.POOL_MODE_AVG
    for name in ("pooled_height", "pooled_width"):
        if name not in parameters:
            raise InvalidArgument(f"parameter '{name}'", "is required (the output size, a positive integer)")
    return scales


def _shm_ref(where: str, parameters: Any) -> roi_pb2.SharedMemoryRef | None:
    """The region that ``parameters`` (an input's or output's) name, if any."""
    given = _SHM_PARAMETERS & set(parameters.keys())
    if not given:
        return None
    if SHM_REGION not in given or SHM_BYTE_SIZE not in given:
        raise InvalidArgument(
            where, f"give both {SHM_REGION} and {SHM_BYTE_SIZE} (and optionally {SHM_OFFSET})"
        )
    region, kind = _param_value(SHM_REGION, parameters[SHM_REGION])
    if kind != "string_param":
        raise InvalidArgument(f"{where} {SHM_REGION}", f"must be a string, got {kind}")
    size = _int_param(f"{where} {SHM_BYTE_SIZE}", parameters[SHM_BYTE_SIZE], 0, (1 << 63) - 1)
    offset = (
        _int_param(f"{where} {SHM_OFFSET}", parameters[SHM_OFFSET], 0, (1 << 63) - 1)
        if SHM_OFFSET in given
        else 0
    )
    return roi_pb2.SharedMemoryRef(region=region, offset=offset, byte_size=size)


def _expected_inputs(model: str) -> str:
    if model == "multiscale_roi_align":
        return "level_0 ... level_<L-1>, rois and optionally image_sizes"
    return "input and rois"


def translate(
    req: pb.ModelInferRequest,
    raw_inputs: list[Any],
    shm_view: Callable[[roi_pb2.SharedMemoryRef, str], Any] | None = None,
) -> tuple[roi_pb2.PoolRequest, _Views]:
    """The roi.v1 PoolRequest that ``req`` means, each tensor's data a placeholder for its
    bytes in the returned frame. Checks what only the OIP form can get wrong (names,
    datatypes, where the bytes are); the rest is :func:`decode_request`'s."""
    model = req.model_name
    if model not in OP_OF_MODEL:
        raise _unknown_model(model)
    if req.model_version not in ("", "1"):
        raise NotFound(f"model {model!r} has no version {req.model_version!r} (its only version is 1)")
    out = roi_pb2.PoolRequest(id=req.id, op=OP_OF_MODEL[model])
    scales = _params(model, req.parameters, out)
    if raw_inputs and len(raw_inputs) != len(req.inputs):
        raise InvalidArgument(
            "raw_input_contents",
            f"holds {len(raw_inputs)} entries for {len(req.inputs)} inputs: give one per input, or none",
        )
    views: list[Any] = []
    seen: dict[str, pb.ModelInferRequest.InferInputTensor] = {}
    levels: dict[int, roi_pb2.Tensor] = {}
    image_sizes: np.ndarray | None = None
    multiscale = model == "multiscale_roi_align"
    for i, inp in enumerate(req.inputs):
        name = inp.name
        where = f"input '{name}'"
        if name in seen:
            raise InvalidArgument(where, "is given twice")
        seen[name] = inp
        level = _LEVEL.match(name) if multiscale else None
        if name == "rois":
            allowed: tuple[str, ...] = BOX_DATATYPES
        elif name == "image_sizes" and multiscale:
            allowed = ("INT64",)
        elif (name == "input" and not multiscale) or level:
            allowed = tuple(MAP_DATATYPES)
        else:
            raise InvalidArgument(
                where, f"unknown for model {model!r}, which takes {_expected_inputs(model)}"
            )
        if inp.datatype not in allowed:
            raise InvalidArgument(f"{where} datatype", f"must be {', '.join(allowed)}, got {inp.datatype!r}")
        ref = _shm_ref(where, inp.parameters)
        has_contents = inp.HasField("contents")
        if ref is not None and (raw_inputs or has_contents):
            raise InvalidArgument(where, "names a shared memory region and carries contents too: give one")
        if raw_inputs and has_contents:
            raise InvalidArgument(
                where, "has typed contents while raw_input_contents is given: give one form for all inputs"
            )
        if ref is None:
            if raw_inputs:
                data = raw_inputs[i]
            elif has_contents:
                data = _typed(inp, where)
            else:
                raise InvalidArgument(
                    where, "has no data: give raw_input_contents, typed contents or a shared memory region"
                )
        if inp.datatype == "INT64":
            if ref is not None:
                # A few bytes, read now (the maps and boxes are read in place by the decoder).
                if shm_view is None:
                    raise InvalidArgument(where, "names a shared memory region, and shared memory is off")
                data = bytes(shm_view(ref, where))
            image_sizes = _image_sizes(inp, data, where)
            continue
        tensor = roi_pb2.Tensor(
            dtype=MAP_DATATYPES.get(inp.datatype, roi_pb2.DTYPE_FLOAT32), shape=list(inp.shape)
        )
        if ref is not None:
            tensor.shared_memory.CopyFrom(ref)
        else:
            tensor.data = framing.placeholder(len(views))
            views.append(data)
        if name == "rois":
            out.boxes.rois.CopyFrom(tensor)
        elif name == "input":
            out.input.CopyFrom(tensor)
        else:
            assert level is not None
            index = int(level.group(1))
            if index in levels:
                raise InvalidArgument(where, f"names level {index}, which another input names too")
            levels[index] = tensor
    if "rois" not in seen:
        raise InvalidArgument("input 'rois'", f"is missing: model {model!r} takes {_expected_inputs(model)}")
    if multiscale:
        if not levels:
            raise InvalidArgument(
                "input 'level_0'", f"is missing: model {model!r} takes {_expected_inputs(model)}"
            )
        # The first index not given (a name like level_1000000 must not cost a range of it).
        missing = next(i for i in range(len(levels) + 1) if i not in levels)
        if missing < len(levels) or max(levels) >= len(levels):
            raise InvalidArgument(
                f"input 'level_{missing}'",
                f"is missing: levels are level_0 ... level_{max(levels)}, finest first",
            )
        for index in range(len(levels)):
            lv = out.pyramid.levels.add()
            lv.map.CopyFrom(levels[index])
            if index in scales:
                lv.spatial_scale = scales[index]
        extra = sorted(set(scales) - set(levels))
        if extra:
            raise InvalidArgument(
                f"parameter 'spatial_scale_{extra[0]}'", f"names no level (the request has {len(levels)})"
            )
        if image_sizes is not None:
            for h, w in image_sizes.tolist():
                out.pyramid.image_sizes.add(height=h, width=w)
    elif "input" not in seen:
        raise InvalidArgument("input 'input'", f"is missing: model {model!r} takes {_expected_inputs(model)}")
    for o in req.outputs:
        if o.name != "output":
            raise InvalidArgument(f"output '{o.name}'", f"unknown: model {model!r} has one output, 'output'")
        ref = _shm_ref("output 'output'", o.parameters)
        if ref is not None:
            out.output_region.CopyFrom(ref)
    return out, _Views(views)


def _typed(inp: pb.ModelInferRequest.InferInputTensor, where: str) -> np.ndarray:
    found = CONTENTS_FIELD.get(inp.datatype)
    if found is None:
        raise InvalidArgument(
            f"{where} contents",
            f"{inp.datatype} has no typed contents in the protocol: send it in raw_input_contents",
        )
    field_name, dtype = found
    values = getattr(inp.contents, field_name)
    for other in (
        "bool_contents",
        "int_contents",
        "int64_contents",
        "uint_contents",
        "uint64_contents",
        "fp32_contents",
        "fp64_contents",
        "bytes_contents",
    ):
        if other != field_name and len(getattr(inp.contents, other)):
            raise InvalidArgument(
                f"{where} contents", f"a {inp.datatype} tensor's values go in {field_name}, not {other}"
            )
    return wire.little_endian(np.asarray(values, dtype=dtype))


def _image_sizes(inp: pb.ModelInferRequest.InferInputTensor, data: Any, where: str) -> np.ndarray:
    if len(inp.shape) != 2 or inp.shape[1] != 2:
        raise InvalidArgument(f"{where} shape", f"must be [N, 2] (height, width), got {list(inp.shape)}")
    n = int(inp.shape[0])
    if not 0 <= n <= (1 << 20):
        raise InvalidArgument(f"{where} shape", f"must be [N, 2] (height, width), got {list(inp.shape)}")
    nbytes = memoryview(data).nbytes
    if nbytes != n * 2 * 8:
        raise InvalidArgument(
            f"{where} contents", f"holds {nbytes} bytes, shape {list(inp.shape)} of INT64 needs {n * 16}"
        )
    sizes = np.frombuffer(data, dtype="<i8").reshape(n, 2)
    bad = np.flatnonzero(((sizes <= 0) | (sizes >= (1 << 32))).any(axis=1))
    if bad.size:
        raise InvalidArgument(
            f"{where}[{int(bad[0])}]", f"must be positive (below 2^32), got {sizes[bad[0]].tolist()}"
        )
    return sizes


# -- the service ------------------------------------------------------------------------------


class OIPService:
    """The OIP methods, over ``roi``'s batcher, limits and metrics and ``shm``'s registry."""

    def __init__(
        self, roi: RoIService, shm: SharedMemoryService, metrics: ServiceMetrics, stream_window: int = 128
    ) -> None:
        self.roi = roi
        self.shm = shm
        self.metrics = metrics
        self.stream_window = stream_window
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="roi-oip-codec")
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.roi.batcher is not None and self.roi.info is not None and not self._closing.is_set()

    def begin_shutdown(self) -> None:
        """ServerReady turns false, new requests are refused (UNAVAILABLE), open streams stop
        reading and answer what they have read."""
        self._closing.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @property
    def idle(self) -> bool:
        return self._active == 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def handler(self) -> grpc.GenericRpcHandler:
        unary: dict[str, tuple[type[Message], Callable[..., Message]]] = {
            "ServerLive": (pb.ServerLiveRequest, lambda owner, r: pb.ServerLiveResponse(live=True)),
            "ServerReady": (pb.ServerReadyRequest, lambda owner, r: pb.ServerReadyResponse(ready=self.ready)),
            "ModelReady": (pb.ModelReadyRequest, self._model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self._server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self._model_metadata),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self._repository_index),
            "SystemSharedMemoryRegister": (pb.SystemSharedMemoryRegisterRequest, self._shm_register),
            "SystemSharedMemoryStatus": (pb.SystemSharedMemoryStatusRequest, self._shm_status),
            "SystemSharedMemoryUnregister": (pb.SystemSharedMemoryUnregisterRequest, self._shm_unregister),
            "CudaSharedMemoryRegister": (pb.CudaSharedMemoryRegisterRequest, _no_cuda_shared_memory),
            "CudaSharedMemoryStatus": (pb.CudaSharedMemoryStatusRequest, _no_cuda_shared_memory),
            "CudaSharedMemoryUnregister": (pb.CudaSharedMemoryUnregisterRequest, _no_cuda_shared_memory),
        }
        handlers = {
            f"/{SERVICE_NAME}/{name}": grpc.unary_unary_rpc_method_handler(self._unary(message, fn))
            for name, (message, fn) in unary.items()
        }
        handlers[f"/{SERVICE_NAME}/ModelInfer"] = grpc.unary_unary_rpc_method_handler(self.model_infer)
        handlers[f"/{SERVICE_NAME}/ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer
        )
        return _Handlers(handlers, self._note_arrival)

    def _note_arrival(self) -> None:
        self.roi.last_arrival = time.monotonic()

    def count_refusal(
        self, method: str, raw: bytes | None, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
    ) -> None:
        """Counts a call refused before it reached this service (by the token check): a
        ModelInfer call under the model its message names, a ModelStreamInfer as one request
        of op "unknown"; the other methods are not requests and are not counted."""
        if method == f"/{SERVICE_NAME}/ModelInfer":
            model = peek_model_name(raw) if raw is not None else ""
            op = model if model in OP_OF_MODEL else "unknown"
        elif method == f"/{SERVICE_NAME}/ModelStreamInfer":
            op = "unknown"
        else:
            return
        m = self.metrics
        m.child(m.requests, PROTOCOL, op, code.name).inc()

    # -- small methods ------------------------------------------------------------------------

    def _unary(
        self, message: type[Message], fn: Callable[[str, Any], Message]
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        async def method(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                try:
                    request = message.FromString(raw)
                except DecodeError as exc:
                    raise InvalidArgument(
                        "", f"the message is not an inference.{message.__name__}: {exc}"
                    ) from None
                return fn(self.shm.owner(context), request).SerializeToString()
            except Exception as exc:
                if not isinstance(exc, ServiceError):
                    log.exception("%s failed", message.__name__)
                await context.abort(*status_of(exc))
                raise  # not reached: abort raises

        return method

    def _models(self) -> tuple[str, ...]:
        info = self.roi.info
        return MODELS if info is None else tuple(m for m in MODELS if m in info.ops)

    def _check_model(self, name: str, version: str) -> None:
        if name not in OP_OF_MODEL:
            raise _unknown_model(name)
        if version not in ("", "1"):
            raise NotFound(f"model {name!r} has no version {version!r} (its only version is 1)")

    def _model_ready(self, owner: str, req: pb.ModelReadyRequest) -> Message:
        self._check_model(req.name, req.version)
        return pb.ModelReadyResponse(ready=self.ready and req.name in self._models())

    def _server_metadata(self, owner: str, req: pb.ServerMetadataRequest) -> Message:
        extensions = list(EXTENSIONS)
        if self.shm.registry.enabled:
            extensions.append("system_shared_memory")
        return pb.ServerMetadataResponse(name="roi-server", version=__version__, extensions=extensions)

    def _model_metadata(self, owner: str, req: pb.ModelMetadataRequest) -> Message:
        self._check_model(req.name, req.version)
        return model_metadata(req.name)

    def _repository_index(self, owner: str, req: pb.RepositoryIndexRequest) -> Message:
        available = self._models()
        models = []
        for name in MODELS:
            ready = self.ready and name in available
            if req.ready and not ready:
                continue
            reason = (
                ""
                if ready
                else ("not available on this device" if self.roi.info is not None else "warming up")
            )
            models.append(
                pb.RepositoryIndexResponse.ModelIndex(
                    name=name, version="1", state="READY" if ready else "UNAVAILABLE", reason=reason
                )
            )
        return pb.RepositoryIndexResponse(models=models)

    def _shm_register(self, owner: str, req: pb.SystemSharedMemoryRegisterRequest) -> Message:
        # tritonclient names the object as shm_open takes it ("/roi_x"); the registry by its
        # name under /dev/shm.
        key = req.key.removeprefix("/")
        try:
            self.shm.registry.register(owner, req.name, key, req.offset, req.byte_size)
        except InvalidArgument as exc:
            raise InvalidArgument(
                "name" if exc.field == "region" else exc.field, exc.message[len(exc.field) + 2 :]
            ) from None
        return pb.SystemSharedMemoryRegisterResponse()

    def _shm_status(self, owner: str, req: pb.SystemSharedMemoryStatusRequest) -> Message:
        try:
            regions = self.shm.registry.status(owner, req.name)
        except InvalidArgument as exc:
            raise InvalidArgument("name", exc.message[len(exc.field) + 2 :]) from None
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in regions:
            resp.regions[r.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=r.name, key="/" + r.key, offset=r.offset, byte_size=r.byte_size
                )
            )
        return resp

    def _shm_unregister(self, owner: str, req: pb.SystemSharedMemoryUnregisterRequest) -> Message:
        try:
            self.shm.registry.unregister(owner, req.name)
        except InvalidArgument as exc:
            raise InvalidArgument("name", exc.message[len(exc.field) + 2 :]) from None
        return pb.SystemSharedMemoryUnregisterResponse()

    # -- inference ----------------------------------------------------------------------------

    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        deadline = _deadline(context)
        answer = await self._answer(raw, deadline, self.shm.owner(context))
        if isinstance(answer, tuple):
            await context.abort(answer[0], answer[1])
        assert isinstance(answer, bytes)
        return answer

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        deadline = _deadline(context)
        owner = self.shm.owner(context)

        async def one(raw: bytes) -> bytes:
            answer = await self._answer(raw, deadline, owner, in_stream=True)
            assert isinstance(answer, bytes)
            return answer

        # Closed with this generator (a cancelled call), so that its tasks end with it.
        async with contextlib.aclosing(answer_stream(requests, context, one, self.stream_window, self._closing)) as out:
            async for answer in out:
                yield answer

    async def _answer(
        self, raw: bytes, deadline: float | None, owner: str, in_stream: bool = False
    ) -> bytes | tuple[grpc.StatusCode, str]:
        """One ModelInferRequest from its bytes to its response's bytes (a
        ModelStreamInferResponse in a stream), or the status a unary call ends in. Counted in
        the metrics whatever it ends in, as roi.v1's requests are, with protocol "oip"."""
        m = self.metrics
        start = time.perf_counter()
        self.roi.last_arrival = time.monotonic()
        self._enter()
        m.received_bytes.inc(len(raw))
        op, code, req_id, model = "unknown", grpc.StatusCode.OK, "", ""
        decoded: DecodedRequest | None = None
        try:
            batcher, info = self.roi.batcher, self.roi.info
            if self._closing.is_set() or batcher is None or info is None or batcher.full:
                # Refused before parsing (under overload a refusal must cost far less than an
                # answer), counted under the model its message names.
                peeked = peek_model_name(raw)
                op = peeked if peeked in OP_OF_MODEL else op
                if self._closing.is_set():
                    raise Unavailable("the server is shutting down")
                if batcher is None or info is None:
                    raise Unavailable("the server is warming up")
                batcher.refuse_if_full()
            req, raw_inputs = await self._off_loop(len(raw), parse_infer_request, raw)
            req_id, model = req.id, req.model_name
            if model in OP_OF_MODEL:
                op = model
            pool_req, frame = translate(
                req, raw_inputs, lambda ref, where: self.shm.registry.view(owner, ref, where)
            )
            registry = self.shm.registry
            nbytes = len(raw) + sum(t.shared_memory.byte_size for t in _shm_tensors(pool_req))
            try:
                decoded = await self._off_loop(
                    nbytes,
                    decode_request,
                    pool_req,
                    self.roi.limits,
                    frozenset(info.ops),
                    frame,
                    registry,
                    owner,
                )
            except ServiceError as exc:
                raise _reword(exc) from None
            remaining = None if deadline is None else deadline - time.perf_counter()
            result = await batcher.submit(decoded, remaining)
            out_bytes = result.output.numel() * result.output.element_size()
            answer = await self._off_loop(out_bytes, _encode_response, req, decoded, result, start, in_stream)
            m.sent_bytes.inc(len(answer))
            return answer
        except asyncio.CancelledError:
            expired = deadline is not None and time.perf_counter() >= deadline - DEADLINE_SLACK_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("OIP request %r (%s) failed", req_id, op)
            code, message = status_of(exc)
            if not in_stream:
                return code, message
            err = pb.ModelStreamInferResponse(
                error_message=message,
                infer_response=pb.ModelInferResponse(model_name=model, model_version="1", id=req_id),
            )
            answer = err.SerializeToString()
            m.sent_bytes.inc(len(answer))
            return answer
        finally:
            if decoded is not None:
                decoded.release()
            m.child(m.requests, PROTOCOL, op, code.name).inc()
            m.child(m.request_duration, op).observe(time.perf_counter() - start)
            self._leave()

    async def _off_loop(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        if nbytes < OFF_LOOP_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _enter(self) -> None:
        self._active += 1
        self._idle.clear()
        self.metrics.in_flight.inc()

    def _leave(self) -> None:
        self._active -= 1
        self.metrics.in_flight.dec()
        if self._active == 0:
            self._idle.set()


def model_metadata(model: str) -> pb.ModelMetadataResponse:
    """What ModelMetadata says of ``model``: its inputs and output, -1 where a dimension takes
    any size. Maps are listed as FP32 (FP16, BF16 and FP64 are accepted too, and the output
    has the maps' datatype); rois as FP32 (FP64 accepted)."""
    T = pb.ModelMetadataResponse.TensorMetadata
    rois = T(name="rois", datatype="FP32", shape=[-1, 6 if model == "roi_align_rotated" else 5])
    if model == "multiscale_roi_align":
        inputs = [
            T(name=f"level_{i}", datatype="FP32", shape=[-1, -1, -1, -1]) for i in range(METADATA_LEVELS)
        ]
        inputs += [rois, T(name="image_sizes", datatype="INT64", shape=[-1, 2])]
    else:
        inputs = [T(name="input", datatype="FP32", shape=[-1, -1, -1, -1]), rois]
    return pb.ModelMetadataResponse(
        name=model,
        versions=["1"],
        platform="roi_kernels",
        inputs=inputs,
        outputs=[T(name="output", datatype="FP32", shape=[-1, -1, -1, -1])],
    )


def _no_cuda_shared_memory(owner: str, req: Any) -> Message:
    raise Unimplemented(
        "CUDA shared memory is not supported by roi-server: use system shared memory "
        "(SystemSharedMemoryRegister, with the server started with --allow-shared-memory)"
    )


def _shm_tensors(req: roi_pb2.PoolRequest):
    kind = req.WhichOneof("features")
    if kind == "input":
        tensors = [req.input]
    elif kind == "pyramid":
        tensors = [lv.map for lv in req.pyramid.levels]
    else:
        tensors = []
    tensors.append(req.boxes.rois)
    return [t for t in tensors if t.WhichOneof("contents") == "shared_memory"]


def _encode_response(
    req: pb.ModelInferRequest, decoded: DecodedRequest, result: Any, start: float, in_stream: bool
) -> bytes:
    out: torch.Tensor = result.output
    resp = pb.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
    tensor = resp.outputs.add(
        name="output", datatype=DATATYPE_OF_WIRE[_wire_dtype(out.dtype)], shape=list(out.shape)
    )
    p = resp.parameters
    p["queue_seconds"].double_param = result.queue_s
    p["compute_seconds"].double_param = result.compute_s
    p["batch_id"].int64_param = result.batch_id
    p["batch_requests"].int64_param = result.batch_requests
    p["batch_boxes"].int64_param = result.batch_boxes
    payload = None
    if decoded.output_view is not None:
        ref = decoded.output_region
        assert ref is not None
        write_output(out, roi_pb2.Tensor(), decoded)
        tensor.parameters[SHM_REGION].string_param = ref.region
        tensor.parameters[SHM_BYTE_SIZE].int64_param = out.numel() * out.element_size()
        if ref.offset:
            tensor.parameters[SHM_OFFSET].int64_param = ref.offset
    else:
        words = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
        payload = wire.little_endian(words.contiguous().numpy())
    p["total_seconds"].double_param = time.perf_counter() - start
    # In a stream the response is ModelStreamInferResponse.infer_response (field 2): its
    # length is known before the output is joined, so that the output is copied once there too.
    return serialize_infer_response(resp, payload, wrap_key=b"\x12" if in_stream else b"")


def _wire_dtype(dtype: torch.dtype) -> int:
    from .codec import WIRE_OF_TORCH

    return WIRE_OF_TORCH[dtype]


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.perf_counter() + remaining


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler], note_arrival: Callable[[], None]) -> None:
        self._handlers = handlers
        self._note_arrival = note_arrival

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is not None:
            self._note_arrival()
        return handler


__all__ = ["SERVICE_NAME", "OIPService", "model_metadata", "oip_field", "parse_infer_request", "translate"]
