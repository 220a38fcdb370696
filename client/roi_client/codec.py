"""The wire format of tensors: raw little-endian bytes with a dtype and a shape.

numpy only (the client imports without torch); torch tensors are accepted and returned where
torch is installed, detected without importing it. numpy has no bfloat16: on the wire it is the
upper half of a float32 (uint16 words); :func:`float32_to_bfloat16_bits` rounds to nearest even
as torch does, and decoding bfloat16 to numpy widens it exactly to float32.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from . import framing
from ._proto.roi.v1 import roi_pb2

__all__ = [
    "DTYPE_NAMES",
    "WIRE_DTYPES",
    "dtype_from_name",
    "dtype_name",
    "is_torch_tensor",
    "float32_to_bfloat16_bits",
    "bfloat16_bits_to_float32",
    "encode_tensor",
    "decode_array",
    "wire_layout",
]

# Wire dtype -> (numpy dtype of the raw words, element size). bfloat16 travels as uint16 words.
WIRE_DTYPES: dict[int, np.dtype] = {
    roi_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    roi_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    roi_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
    roi_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
}

DTYPE_NAMES: dict[int, str] = {
    roi_pb2.DTYPE_FLOAT32: "float32",
    roi_pb2.DTYPE_FLOAT16: "float16",
    roi_pb2.DTYPE_BFLOAT16: "bfloat16",
    roi_pb2.DTYPE_FLOAT64: "float64",
}
_BY_NAME = {name: value for value, name in DTYPE_NAMES.items()}
_BY_NAME.update({"float": roi_pb2.DTYPE_FLOAT32, "half": roi_pb2.DTYPE_FLOAT16, "double": roi_pb2.DTYPE_FLOAT64})

_LITTLE = sys.byteorder == "little"


def dtype_name(wire: int) -> str:
    return DTYPE_NAMES.get(wire, f"<unknown dtype {wire}>")


def dtype_from_name(name: Any) -> int:
    """A wire dtype from "float32", "float16", "bfloat16", "float64", a numpy dtype or a
    torch dtype."""
    if isinstance(name, int) and name in DTYPE_NAMES:
        return name
    text = str(name)
    if text.startswith("torch."):
        text = text[len("torch.") :]
    else:
        try:
            text = np.dtype(name).name
        except TypeError:
            pass
    if text not in _BY_NAME:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, float64; got {name!r}")
    return _BY_NAME[text]


def is_torch_tensor(x: Any) -> bool:
    # Checked by module name so that numpy-only callers never import torch.
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 as uint16 words, rounding to nearest even (torch's conversion).

    NaN stays a quiet NaN of the same sign; values past bfloat16's range round to infinity.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 uint16 words -> float32 (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _torch_to_numpy(t: Any) -> tuple[np.ndarray, int]:
    """A torch tensor -> (contiguous CPU numpy array of its wire words, wire dtype)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), roi_pb2.DTYPE_BFLOAT16
    if t.dtype in (torch.float32, torch.float16, torch.float64):
        arr = t.numpy()
        return arr, dtype_from_name(arr.dtype)
    # Integer or other tensors: carried as float32 (boxes given as integers, say).
    return t.to(torch.float32).numpy(), roi_pb2.DTYPE_FLOAT32


def as_wire_array(x: Any, wire_dtype: int | None = None) -> tuple[np.ndarray, int]:
    """Any array-like -> (C-contiguous little-endian array of wire words, wire dtype).

    ``wire_dtype=None`` keeps float16/bfloat16/float64 as they are and sends anything else as
    float32. A float array asked to travel as bfloat16 is rounded to nearest even.
    """
    if is_torch_tensor(x):
        arr, have = _torch_to_numpy(x)
    else:
        arr = np.asarray(x)
        if arr.dtype in (np.float16, np.float32, np.float64):
            have = dtype_from_name(arr.dtype)
        else:
            arr, have = arr.astype(np.float32), roi_pb2.DTYPE_FLOAT32
    want = have if wire_dtype is None else wire_dtype
    if want != have:
        if have == roi_pb2.DTYPE_BFLOAT16:
            arr = bfloat16_bits_to_float32(arr)
        if want == roi_pb2.DTYPE_BFLOAT16:
            arr = float32_to_bfloat16_bits(arr.astype(np.float32, copy=False))
        else:
            arr = arr.astype(WIRE_DTYPES[want])
    words = WIRE_DTYPES[want]
    if arr.dtype != words:
        arr = arr.astype(words)
    return np.ascontiguousarray(arr), want


def little_endian(arr: np.ndarray) -> np.ndarray:
    """``arr``'s words in the wire's byte order (``arr`` itself on little-endian hosts)."""
    return arr if _LITTLE else arr.byteswap()


def encode_tensor(x: Any, wire_dtype: int | None = None, out: roi_pb2.Tensor | None = None) -> roi_pb2.Tensor:
    """An array (numpy, torch, nested lists) -> ``roi.v1.Tensor`` (its data copied into the
    message: for messages built with :mod:`roi_client.framing`, see :func:`tensor_payload`)."""
    arr, wire = as_wire_array(x, wire_dtype)
    msg = out if out is not None else roi_pb2.Tensor()
    msg.dtype = wire
    del msg.shape[:]
    msg.shape.extend(arr.shape)
    msg.data = little_endian(arr).tobytes()
    return msg


def tensor_payload(x: Any, wire_dtype: int | None, msg: roi_pb2.Tensor, index: int) -> np.ndarray:
    """Sets ``msg``'s dtype and shape for ``x`` and its data to framing's placeholder
    ``index``; returns the array :func:`roi_client.framing.serialize` writes in its place
    (``x``'s own memory when it is contiguous and already of the wire dtype)."""
    arr, wire = as_wire_array(x, wire_dtype)
    msg.dtype = wire
    del msg.shape[:]
    msg.shape.extend(arr.shape)
    msg.data = framing.placeholder(index)
    return little_endian(arr)


def wire_layout(
    msg: roi_pb2.Tensor, field: str, nbytes: int, length_field: str | None = None
) -> tuple[np.dtype, tuple[int, ...]]:
    """The words dtype and shape of a wire tensor whose data is ``nbytes`` long.

    Raises ValueError naming ``field`` when the dtype is unknown, a dimension is negative, or
    the byte length does not match the shape and dtype (naming ``length_field``, default
    ``<field>.data``: ``<field>.shared_memory.byte_size`` for a tensor in shared memory). (The
    caller reads ``msg.data`` once and passes its length: each read of a bytes field copies it.)
    """
    words = WIRE_DTYPES.get(msg.dtype)
    if words is None:
        raise ValueError(f"{field}.dtype: unknown or unspecified dtype {msg.dtype}")
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{field}.shape: dimensions must be >= 0, got {list(shape)}")
    count = 1
    for s in shape:
        count *= s
    expected = count * words.itemsize
    if nbytes != expected:
        raise ValueError(
            f"{length_field or field + '.data'}: {nbytes} bytes do not match shape {list(shape)} of "
            f"{dtype_name(msg.dtype)} ({expected} bytes)"
        )
    return words, shape


def decode_words(data: Any, words: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only view of ``data`` (bytes or a memoryview; no copy) as ``shape`` in the
    native byte order."""
    arr = np.frombuffer(data, dtype=words).reshape(shape)
    if not _LITTLE:
        arr = arr.byteswap().view(words.newbyteorder("="))
    return arr


def decode_array(msg: roi_pb2.Tensor, field: str = "tensor", *, as_torch: bool = False, data: Any = None) -> Any:
    """``roi.v1.Tensor`` -> numpy array (bfloat16 widened to float32) or torch tensor (bfloat16
    kept). numpy results are read-only views of ``data`` (default: the message's bytes; a
    :class:`~roi_client.framing.Frame`'s view of the received buffer when given)."""
    if data is None:
        data = msg.data
    words, shape = wire_layout(msg, field, memoryview(data).nbytes)
    arr = decode_words(data, words, shape)
    if as_torch:
        import torch

        # torch warns on read-only buffers; the copy hands back a tensor the caller may modify.
        t = torch.from_numpy(arr.copy())
        return t.view(torch.bfloat16) if msg.dtype == roi_pb2.DTYPE_BFLOAT16 else t
    if msg.dtype == roi_pb2.DTYPE_BFLOAT16:
        return bfloat16_bits_to_float32(arr)
    return arr
