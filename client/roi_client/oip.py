"""Open Inference Protocol (KServe v2 / Triton gRPC) messages, with their tensors' bytes left
where they are, for roi-server's ``inference.GRPCInferenceService`` (server side) and
``roi-loadtest --protocol oip`` (client side). numpy only, no torch.

The payloads of ModelInferRequest (``raw_input_contents``, field 7) and ModelInferResponse
(``raw_output_contents``, field 6) are top-level repeated ``bytes`` fields, so the zero-copy
framing of :mod:`roi_client.framing` takes a simpler form here: a walk over the top-level
fields only finds each payload (a view of the received bytes), and protobuf parses the rest;
a message is written as protobuf's header joined once with the payloads' memory. A message
the walk does not follow completely goes to protobuf whole, which parses or refuses it.

Each op is a model (``roi_align``, ...) whose inputs are ``input`` (or ``level_<l>``),
``rois`` and, for multiscale_roi_align, optionally ``image_sizes``; the op's parameters are
request parameters (see the README, "Using Triton or KServe clients").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from ._proto.inference import grpc_service_pb2 as pb
from .codec import float32_to_bfloat16_bits

SERVICE_NAME = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE_NAME}/ModelInfer"
RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents
# Below this size protobuf's copies cost less than the walk (as in roi_client.framing).
WALK_MIN_BYTES = 256 << 10
# Payloads we write start on this offset of the message, after a padding field that no
# message of the protocol uses (the largest field number protobuf allows): readers skip it
# as an unknown field, and a reader's view of the payload is aligned for any dtype.
ALIGNMENT = 64
PAD_FIELD = (1 << 29) - 1
_PAD_KEY = bytes([0xFA, 0xFF, 0xFF, 0xFF, 0x0F])  # (PAD_FIELD << 3) | 2 as a varint

DATATYPE_OF_NUMPY = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64"}
NUMPY_OF_DATATYPE = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT64": np.int64,
    "BF16": np.uint16,
}


def read_varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """A varint at ``pos`` of ``buf[:end]``: (value, the position after it); ValueError if cut short."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("a truncated or overlong varint")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def split_bytes_field(raw: bytes, number: int) -> tuple[bytes, list[tuple[int, int]]] | None:
    """``raw`` without its top-level length-delimited fields ``number``, and where each of
    them lies in ``raw`` (offset, length); None where the walk does not follow the message."""
    n, pos = len(raw), 0
    rest: list[bytes] = []
    spans: list[tuple[int, int]] = []
    run = 0
    try:
        while pos < n:
            key_start = pos
            key, pos = read_varint(raw, pos, n)
            field_number, wire_type = key >> 3, key & 7
            if field_number == 0 or key >> 32:
                return None
            if wire_type == 0:
                _, pos = read_varint(raw, pos, n)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, body = read_varint(raw, pos, n)
                if length > n - body:
                    return None
                pos = body + length
                if field_number == number:
                    rest.append(raw[run:key_start])
                    spans.append((body, length))
                    run = pos
            else:
                return None  # groups and undefined wire types
            if pos > n:
                return None
    except ValueError:
        return None
    rest.append(raw[run:])
    return b"".join(rest), spans


def _parse(message_class, raw: bytes, number: int, min_bytes: int) -> tuple[Any, list[Any]]:
    if len(raw) >= min_bytes:
        split = split_bytes_field(raw, number)
        if split is not None:
            skeleton, spans = split
            msg = message_class.FromString(skeleton)
            view = memoryview(raw)
            return msg, [view[s : s + length] for s, length in spans]
    msg = message_class.FromString(raw)
    field = msg.DESCRIPTOR.fields_by_number[number].name
    return msg, list(getattr(msg, field))


def parse_infer_request(
    raw: bytes, min_bytes: int = WALK_MIN_BYTES
) -> tuple[pb.ModelInferRequest, list[Any]]:
    """``raw`` as a ModelInferRequest, and its raw_input_contents: views of ``raw`` for a
    message of ``min_bytes`` or more (protobuf's copies otherwise; the returned message's own
    raw_input_contents are then empty or equal to them). Raises protobuf's DecodeError."""
    return _parse(pb.ModelInferRequest, raw, RAW_INPUT_FIELD, min_bytes)


def parse_infer_response(
    raw: bytes, min_bytes: int = WALK_MIN_BYTES
) -> tuple[pb.ModelInferResponse, list[Any]]:
    """``raw`` as a ModelInferResponse and its raw_output_contents (views, as above)."""
    return _parse(pb.ModelInferResponse, raw, RAW_OUTPUT_FIELD, min_bytes)


def serialize_with_payloads(
    msg: Any, payloads: Sequence[Any], number: int, wrap_key: bytes = b"", align: int = ALIGNMENT
) -> bytes:
    """``msg`` with each of ``payloads`` (C-contiguous buffers) appended as its top-level
    bytes field ``number``: protobuf serialises the header and the payloads' memory is joined
    once. Before each payload a padding field (:data:`PAD_FIELD`, which readers skip as an
    unknown field) puts it on an ``align``-byte offset of the message (0: no padding), so that
    a reader's views of it are aligned for any dtype. ``wrap_key``: the key of the
    length-delimited field of an outer message that holds ``msg`` (the outer message is
    returned; offsets are then counted from its start)."""
    head = msg.SerializeToString()
    parts: list[Any] = [head]
    key = encode_varint((number << 3) | 2)
    views = []
    for payload in payloads:
        view = memoryview(payload)
        views.append(view.cast("B") if view.nbytes else memoryview(b""))
    # The outer key and length come first; the length's size depends on the padding, which
    # depends on it: the padding is laid out for a length varint of each size in turn.
    for outer_len_size in range(1, 11) if wrap_key else (0,):
        parts = [head]
        at = len(wrap_key) + outer_len_size + len(head)
        for view in views:
            if align:
                fixed = len(_PAD_KEY) + 1 + len(key) + len(encode_varint(view.nbytes))
                pad = (-(at + fixed)) % align
                parts.append(_PAD_KEY + bytes([pad]) + bytes(pad))
                at += len(_PAD_KEY) + 1 + pad
            parts += [key, encode_varint(view.nbytes), view]
            at += len(key) + len(encode_varint(view.nbytes)) + view.nbytes
        if not wrap_key:
            break
        size = sum(memoryview(x).nbytes for x in parts)
        if len(encode_varint(size)) == outer_len_size:
            parts[:0] = [wrap_key, encode_varint(size)]
            break
    return b"".join(parts)


def serialize_infer_request(req: pb.ModelInferRequest, payloads: Sequence[Any]) -> bytes:
    return serialize_with_payloads(req, payloads, RAW_INPUT_FIELD)


def serialize_infer_response(
    resp: pb.ModelInferResponse, payloads: Sequence[Any], wrap_key: bytes = b""
) -> bytes:
    return serialize_with_payloads(resp, payloads, RAW_OUTPUT_FIELD, wrap_key)


def set_parameter(p: pb.InferParameter, value: bool | float | str) -> None:
    """An InferParameter as tritonclient sets it from a Python value."""
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise TypeError(f"a parameter is a bool, int, float or str, not {type(value).__name__}")


def wire_array(x: Any, datatype: str | None = None) -> tuple[np.ndarray, str]:
    """``x`` (numpy) as its little-endian words and their OIP datatype; ``datatype="BF16"``
    rounds float32 to bfloat16 (as torch does) or takes uint16 words as they are."""
    arr = np.asarray(x)
    if datatype == "BF16":
        words = (
            arr if arr.dtype == np.uint16 else float32_to_bfloat16_bits(arr.astype(np.float32, copy=False))
        )
        return np.ascontiguousarray(words, dtype="<u2"), "BF16"
    if datatype is not None and NUMPY_OF_DATATYPE.get(datatype) is not None:
        arr = arr.astype(NUMPY_OF_DATATYPE[datatype], copy=False)
    name = DATATYPE_OF_NUMPY.get(arr.dtype.name)
    if name is None:
        raise ValueError(f"no OIP datatype for numpy {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")), name


def infer_request(
    model: str,
    inputs: Sequence[tuple[str, Any, str | None]],
    parameters: dict[str, bool | int | float | str] | None = None,
    request_id: str = "",
) -> tuple[pb.ModelInferRequest, list[np.ndarray]]:
    """The ModelInferRequest header for ``model`` with ``inputs`` as (name, array, datatype or
    None for the array's own), and the payloads for raw_input_contents, in order
    (:func:`serialize_infer_request` joins them)."""
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    for key, value in (parameters or {}).items():
        set_parameter(req.parameters[key], value)
    payloads = []
    for name, x, datatype in inputs:
        words, dt = wire_array(x, datatype)
        req.inputs.add(name=name, datatype=dt, shape=list(words.shape))
        payloads.append(words)
    return req, payloads


def output_array(resp: pb.ModelInferResponse, payloads: Sequence[Any], name: str = "output") -> np.ndarray:
    """The output ``name`` of a response as a read-only numpy view of its raw bytes (BF16 as
    uint16 words)."""
    for i, out in enumerate(resp.outputs):
        if out.name == name:
            if i >= len(payloads):
                raise ValueError(f"output {name!r} has no raw contents (written into shared memory?)")
            dtype = np.dtype(NUMPY_OF_DATATYPE[out.datatype]).newbyteorder("<")
            return np.frombuffer(payloads[i], dtype=dtype).reshape([int(s) for s in out.shape])
    raise ValueError(f"the response has no output {name!r}")


__all__ = [
    "MODEL_INFER",
    "SERVICE_NAME",
    "DecodeError",
    "infer_request",
    "output_array",
    "parse_infer_request",
    "parse_infer_response",
    "serialize_infer_request",
    "serialize_infer_response",
    "set_parameter",
    "split_bytes_field",
    "wire_array",
]
