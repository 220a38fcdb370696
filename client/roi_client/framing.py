"""roi.v1 messages with their tensors' bytes left where they are: zero-copy framing.

A ``roi.v1`` message that carries feature maps is almost all ``Tensor.data``. protobuf's
Python runtime copies every ``bytes`` field into its arena when it parses, again on each read
of the field, and once more when a message is built and serialised. This module keeps those
bytes out of protobuf's hands on both sides of a call, while the bytes on the wire stay an
ordinary ``roi.v1`` message that any generated client reads and writes:

* **Parsing** (:func:`parse`): a walker follows the message on the protobuf wire format down
  the fields that lead to a ``Tensor`` (taken from the .proto's descriptors, so new fields
  are followed as they are added) and notes where each ``Tensor.data`` lies in the buffer.
  It writes a *skeleton*: the same message with each ``data`` replaced by a short
  placeholder, and every enclosing length rewritten. protobuf parses the skeleton (a few
  hundred bytes), so every rule of the format (merged repeats of a field, the last member of
  a oneof winning, unknown fields, UTF-8 checks, ...) is protobuf's own.
  :meth:`Frame.data` then turns a placeholder into a ``memoryview`` of the received bytes.
* **Serialising** (:func:`serialize`): a skeleton built by protobuf with placeholders for the
  payloads is walked the same way, and the payloads' memory is written in its place in one
  ``bytes.join``: each payload is copied once, into the message gRPC sends. Before each
  payload a padding field (``Tensor``'s reserved field 15, which readers skip as unknown)
  puts it on a :data:`ALIGNMENT`-byte offset, so that the reader's views are aligned.

The walker is strict: a message it does not understand completely (an unknown wire type,
a group, a varint or length that runs past its end, a key or a length longer than five
bytes) makes
:func:`parse` hand the whole message to protobuf instead, which either parses it (with the
copies it always made) or refuses it. So the walker never decides what a message means, and
never reads outside its buffer (Python slices cannot, and every length is checked against
the end of its enclosing message first). tests/test_framing.py checks, on valid and hostile
messages, that this parse and protobuf's agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf import descriptor as _descriptor
from google.protobuf.message import Message

from ._proto.roi.v1 import roi_pb2

M = TypeVar("M", bound=Message)
# What the walker reads: the received bytes, or a byte view of another buffer.
Buffer = bytes | memoryview

# Payloads start on this offset in a message we write (a cache line: any dtype, any vector
# load). A reader of another encoder's message gets what that encoder wrote.
ALIGNMENT = 64
# Tensor's field for padding (reserved in roi.proto): a run of zero bytes, skipped by readers.
PAD_FIELD = 15
_PAD_KEY = bytes([(PAD_FIELD << 3) | 2])

TENSOR = "roi.v1.Tensor"
DATA_FIELD = 3

# Below these sizes protobuf's copies cost less than the walk (about 14 us) or the splice
# (about 35 us): a smaller message is parsed by protobuf whole, smaller payloads are set on
# the message and serialised by protobuf (benchmarks/NOTES.md, entry 13).
WALK_MIN_BYTES = 256 << 10
SPLICE_MIN_BYTES = 512 << 10

# A placeholder: this process's random tag, then the payload's index. A sender cannot forge
# one (it does not know the tag), so a placeholder in a parsed skeleton is always ours.
_TAG = os.urandom(12)
_PLACEHOLDER_LEN = len(_TAG) + 4


def placeholder(index: int) -> bytes:
    """What :func:`serialize` replaces with payload ``index``."""
    return _TAG + index.to_bytes(4, "little")


def _placeholder_index(data: bytes) -> int | None:
    if len(data) == _PLACEHOLDER_LEN and data[: len(_TAG)] == _TAG:
        return int.from_bytes(data[len(_TAG) :], "little")
    return None


class _Unwalkable(Exception):
    """The walker does not follow this message; protobuf parses all of it."""


# -- the schema: which fields lead to a Tensor ------------------------------------------------


def _tensor_paths(desc: _descriptor.Descriptor, memo: dict[str, dict[int, str] | None]) -> dict[int, str] | None:
    """{field number: message type} of ``desc``'s length-delimited fields whose type holds a
    Tensor (directly or further down); None when none does."""
    name = desc.full_name
    if name in memo:
        return memo[name]
    memo[name] = None  # a recursive type is not followed into itself
    children: dict[int, str] = {}
    for f in desc.fields:
        if f.message_type is None:
            continue
        if f.message_type.full_name == TENSOR or _tensor_paths(f.message_type, memo) is not None:
            children[f.number] = f.message_type.full_name
    memo[name] = children if children or name == TENSOR else None
    return memo[name]


def _schema() -> dict[str, dict[int, str]]:
    memo: dict[str, dict[int, str] | None] = {}
    for desc in roi_pb2.DESCRIPTOR.message_types_by_name.values():
        _tensor_paths(desc, memo)
    return {name: children for name, children in memo.items() if children is not None}


SCHEMA = _schema()
# The same fields by name, for walking a message object: (name, repeated).
_FIELDS = {
    name: [
        (f.name, f.is_repeated)
        for f in roi_pb2.DESCRIPTOR.pool.FindMessageTypeByName(name).fields
        if f.number in children
    ]
    for name, children in SCHEMA.items()
}


# -- the walker ---------------------------------------------------------------------------------


def _varint(buf: Buffer, pos: int, end: int, limit: int = 10) -> tuple[int, int]:
    value = shift = 0
    start = pos
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if pos - start >= limit:
            break
    raise _Unwalkable


@dataclass
class _Nested:
    """A length-delimited field the walker went into: its key's bytes and its contents."""

    key: bytes
    pieces: list
    size: int = 0


@dataclass
class _Data:
    """A Tensor.data field: its key's bytes and where its contents lie."""

    key: bytes
    start: int
    length: int


def _walk(buf: Buffer, pos: int, end: int, type_name: str) -> list:
    """The fields of one message in ``buf[pos:end]`` as pieces: ``(start, stop)`` ranges to
    copy as they are, :class:`_Nested` and :class:`_Data`."""
    children = SCHEMA[type_name]
    is_tensor = type_name == TENSOR
    pieces: list = []
    run = pos  # start of the current run of fields copied as they are
    while pos < end:
        key_start = pos
        key = buf[pos]  # one byte in the common case, read here; longer ones by _varint
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end, limit=5)
        key_end = pos
        number, wire_type = key >> 3, key & 7
        if number == 0 or key >> 32:
            raise _Unwalkable
        if wire_type == 0:
            _, pos = _varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, body = _varint(buf, pos, end, limit=5)
            if length > end - body:
                raise _Unwalkable
            pos = body + length
            if is_tensor and number == DATA_FIELD:
                if run < key_start:
                    pieces.append((run, key_start))
                pieces.append(_Data(bytes(buf[key_start:key_end]), body, length))
                run = pos
            elif number in children:
                if run < key_start:
                    pieces.append((run, key_start))
                key_bytes = bytes(buf[key_start:key_end])
                pieces.append(_Nested(key_bytes, _walk(buf, body, pos, children[number])))
                run = pos
        else:
            raise _Unwalkable  # groups (3, 4) and the undefined wire types 6, 7
        if pos > end:
            raise _Unwalkable
    if run < end:
        pieces.append((run, end))
    return pieces


def _varint_len(value: int) -> int:
    n = 1
    while value >= 0x80:
        value >>= 7
        n += 1
    return n


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# -- parsing ------------------------------------------------------------------------------------


@dataclass
class Frame:
    """Where the payloads of a parsed message lie in its buffer."""

    buffer: Any
    spans: list[tuple[int, int]] = field(default_factory=list)

    def data(self, tensor: roi_pb2.Tensor) -> Any:
        """``tensor``'s data: a read-only ``memoryview`` of the received buffer (no copy)
        when the walker replaced it, else the bytes protobuf holds."""
        data = tensor.data
        index = _placeholder_index(data) if self.spans else None
        if index is None:
            return data
        start, length = self.spans[index]
        return memoryview(self.buffer)[start : start + length]

    def offset(self, tensor: roi_pb2.Tensor) -> int | None:
        """The byte offset of ``tensor``'s data in the buffer (None: not a view)."""
        index = _placeholder_index(tensor.data) if self.spans else None
        return None if index is None else self.spans[index][0]


def _skeleton(buf: Buffer, pieces: list, spans: list[tuple[int, int]], out: list) -> int:
    """Appends the skeleton of ``pieces`` to ``out``; returns its length."""
    size = 0
    for p in pieces:
        if isinstance(p, tuple):
            out.append(buf[p[0] : p[1]])
            size += p[1] - p[0]
        elif isinstance(p, _Data):
            out.append(p.key)
            out.append(bytes([_PLACEHOLDER_LEN]))
            out.append(placeholder(len(spans)))
            spans.append((p.start, p.length))
            size += len(p.key) + 1 + _PLACEHOLDER_LEN
        else:
            inner: list = []
            n = _skeleton(buf, p.pieces, spans, inner)
            head = p.key + _encode_varint(n)
            out.append(head)
            out.extend(inner)
            size += len(head) + n
    return size


def parse(message_class: type[M], raw: Any, min_bytes: int = WALK_MIN_BYTES) -> tuple[M, Frame]:
    """Parses ``raw`` (bytes or any buffer) as ``message_class``; raises protobuf's
    ``DecodeError`` where protobuf would. Read each Tensor's data through the returned
    frame's :meth:`Frame.data`. Messages under ``min_bytes`` are parsed by protobuf alone."""
    name = message_class.DESCRIPTOR.full_name
    # bytes index faster than a memoryview; what the walker slices out of it is small.
    buf = raw if isinstance(raw, bytes) else memoryview(raw).cast("B")
    if name in SCHEMA and len(buf) >= min_bytes:
        try:
            pieces = _walk(buf, 0, len(buf), name)
        except _Unwalkable:
            pass
        else:
            spans: list[tuple[int, int]] = []
            out: list = []
            _skeleton(buf, pieces, spans, out)
            if spans:
                return message_class.FromString(b"".join(out)), Frame(raw, spans)
    return message_class.FromString(raw if isinstance(raw, bytes) else bytes(buf)), Frame(raw)


# -- serialising --------------------------------------------------------------------------------


def _layout(pieces: list, src: bytes, sizes: Sequence[int], pads: dict[int, int], at: int, found: list) -> int:
    """Lays ``pieces`` out from offset ``at`` with the given pads, each nested length taken
    from the previous pass (:attr:`_Nested.size`, updated here); records ``(piece, offset of
    its payload)`` in ``found``. Returns the end offset."""
    for p in pieces:
        if isinstance(p, tuple):
            at += p[1] - p[0]
        elif isinstance(p, _Data):
            index = _placeholder_index(bytes(src[p.start : p.start + p.length]))
            if index is None:  # a data field that holds no placeholder travels as it is
                at += len(p.key) + _varint_len(p.length) + p.length
                continue
            at += 2 + pads.get(id(p), 0) + len(p.key) + _varint_len(sizes[index])
            found.append((p, at))
            at += sizes[index]
        else:
            at += len(p.key) + _varint_len(p.size)
            body = at
            at = _layout(p.pieces, src, sizes, pads, at, found)
            p.size = at - body
    return at


def _emit(pieces: list, src: bytes, payloads: Sequence[memoryview], pads: dict[int, int], out: list) -> int:
    """Appends the message to ``out``; returns its length (computed here, exactly, whatever
    the layout passes guessed)."""
    size = 0
    for p in pieces:
        if isinstance(p, tuple):
            out.append(src[p[0] : p[1]])
            size += p[1] - p[0]
        elif isinstance(p, _Data):
            index = _placeholder_index(bytes(src[p.start : p.start + p.length]))
            data = memoryview(src)[p.start : p.start + p.length] if index is None else payloads[index]
            pad = pads.get(id(p), 0) if index is not None else None
            head = (b"" if pad is None else _PAD_KEY + bytes([pad]) + bytes(pad)) + p.key + _encode_varint(data.nbytes)
            out.append(head)
            out.append(data)
            size += len(head) + data.nbytes
        else:
            inner: list = []
            n = _emit(p.pieces, src, payloads, pads, inner)
            head = p.key + _encode_varint(n)
            out.append(head)
            out.extend(inner)
            size += len(head) + n
    return size


def _as_bytes_view(x: Any) -> memoryview:
    view = memoryview(x)
    if not view.c_contiguous:
        raise ValueError("a payload must be C-contiguous")
    if view.nbytes == 0:
        return memoryview(b"")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def serialize(skeleton: Message, payloads: Sequence[Any], min_bytes: int = SPLICE_MIN_BYTES) -> bytes:
    """``skeleton`` serialised, with each Tensor.data that holds :func:`placeholder` (i)
    replaced by ``payloads[i]`` (any C-contiguous buffer: numpy arrays, bytes, memoryviews).
    Each payload is copied once, into the result, on an :data:`ALIGNMENT`-byte offset (below
    ``min_bytes`` of payloads in all, protobuf serialises them, unaligned, and the skeleton's
    placeholders are replaced in place)."""
    views = [_as_bytes_view(p) for p in payloads]
    if sum(v.nbytes for v in views) < min_bytes:
        return _serialize_small(skeleton, views)
    src = skeleton.SerializeToString()
    pieces = _walk(src, 0, len(src), skeleton.DESCRIPTOR.full_name)
    sizes = [v.nbytes for v in views]
    pads: dict[int, int] = {}
    # Each pad puts its payload on the boundary given the lengths before it; a pad changes
    # the lengths of the messages around it, whose varints may grow: repeat until nothing
    # moves (two passes, in practice). Lengths are written exactly by _emit in any case.
    for _ in range(8):
        found: list = []
        before = _sizes(pieces)
        _layout(pieces, src, sizes, pads, 0, found)
        moved = before != _sizes(pieces)
        for piece, at in found:
            pad = pads.get(id(piece), 0)
            want = (pad - at) % ALIGNMENT
            if want != pad:
                pads[id(piece)] = want
                moved = True
        if not moved:
            break
    out: list = []
    _emit(pieces, src, views, pads, out)
    return b"".join(out)


def _serialize_small(skeleton: Message, payloads: Sequence[memoryview]) -> bytes:
    """:func:`serialize` by protobuf: each placeholder replaced by its payload's bytes, in
    place."""
    _fill(skeleton, payloads)
    return skeleton.SerializeToString()


def _fill(msg: Message, payloads: Sequence[memoryview]) -> None:
    name = msg.DESCRIPTOR.full_name
    if name == TENSOR:
        index = _placeholder_index(msg.data)
        if index is not None:
            msg.data = payloads[index].tobytes()
        return
    for field_name, repeated in _FIELDS[name]:
        if repeated:
            for m in getattr(msg, field_name):
                _fill(m, payloads)
        elif msg.HasField(field_name):
            _fill(getattr(msg, field_name), payloads)


def _sizes(pieces: list) -> list[int]:
    sizes = []
    for p in pieces:
        if isinstance(p, _Nested):
            sizes.append(p.size)
            sizes.extend(_sizes(p.pieces))
    return sizes
