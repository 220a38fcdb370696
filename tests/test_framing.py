"""roi_client.framing: the zero-copy parse agrees with protobuf's on every message, valid or
hostile, never reads outside its buffer, and the copies of a payload on each side of a call
are the ones the README counts.

The differential check (:func:`check_agrees`) parses a message both ways: protobuf's
``FromString``, and framing's walker + skeleton with each placeholder replaced by the bytes
its span points at. Either both refuse, or the two messages are equal field for field
(unknown fields included). Hostile messages come from the service fuzzer's request generator
and from byte-level damage aimed at what the walker itself reads (keys, lengths, wire types,
nesting), both in tests/fuzz_requests.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from fuzz_requests import hostile_framing_bytes, pool_requests, tensor_bytes, wire_field
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from roi_client import EncodedRequest, codec, framing
from roi_client._proto.roi.v1 import roi_pb2, roi_pb2_grpc
from roi_client.results import decode_response
from roi_server.codec import Limits, decode_request, output_payload
from roi_server.service import _parse
from test_service_support import assert_bitwise_equal, in_process_server

import roi_kernels

NODE_DIR = Path(__file__).resolve().parent / "node"
LIMITS = Limits(max_boxes=100_000, max_output_elements=1 << 30, max_message_bytes=1 << 30)


# -- the differential check ---------------------------------------------------------------------


def materialize(msg, frame: framing.Frame):
    """A copy of the skeleton ``msg`` with every placeholder replaced by its span's bytes."""
    out = type(msg)()
    out.CopyFrom(msg)

    def fix(m) -> None:
        if m.DESCRIPTOR.full_name == framing.TENSOR and frame.offset(m) is not None:
            m.data = bytes(frame.data(m))
        for fd, value in m.ListFields():
            if fd.message_type is None:
                continue
            for v in value if fd.is_repeated else [value]:
                fix(v)

    fix(out)
    return out


def check_agrees(message_class, raw: bytes, walk=None) -> str:
    """Raises AssertionError when framing's parse and protobuf's disagree on ``raw``; returns
    how the message went ("refused", "walked" or "whole")."""
    walk = walk or framing
    try:
        want = message_class.FromString(raw)
    except DecodeError:
        want = None
    try:
        got, frame = walk.parse(message_class, raw, min_bytes=0)
    except DecodeError:
        got = None
    except Exception as exc:
        raise AssertionError(f"the walker failed: {exc!r}") from exc
    assert (got is None) == (want is None), f"protobuf {'refused' if want is None else 'parsed'} it, framing did not"
    if want is None:
        return "refused"
    for start, length in frame.spans:
        assert 0 <= start and length >= 0 and start + length <= len(raw), f"span ({start}, {length}) outside {len(raw)} bytes"
    full = materialize(got, frame)
    assert full == want
    assert full.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    return "walked" if frame.spans else "whole"


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(raw=hostile_framing_bytes())
def test_walker_agrees_with_protobuf_on_hostile_requests(raw):
    check_agrees(roi_pb2.PoolRequest, raw)


@FUZZ
@given(case=pool_requests())
def test_walker_agrees_with_protobuf_on_the_service_fuzzer_requests(case):
    how = check_agrees(roi_pb2.PoolRequest, case.payload)
    if case.valid and any(
        t.data for t in [case.request.input, case.request.boxes.rois, *case.request.ragged.maps, *case.request.boxes.per_image.boxes]
    ) or (case.valid and any(lv.map.data for lv in case.request.pyramid.levels)):
        assert how == "walked", "a valid request was not walked (its tensors were copied by protobuf)"


@FUZZ
@given(body=st.lists(st.sampled_from(["id", "output", "timings", "junk"]), max_size=5), tensor=tensor_bytes(), stream=st.booleans(),
       cut=st.integers(0, 3))  # fmt: skip
def test_walker_agrees_with_protobuf_on_responses(body, tensor, stream, cut):
    pieces = {
        "id": wire_field(1, 2, b"r1"),
        "output": wire_field(2, 2, tensor),
        "timings": wire_field(3, 2, wire_field(1, 1, np.float64(0.5).tobytes())),
        "junk": wire_field(7, 2, tensor),
    }
    raw = b"".join(pieces[b] for b in body)
    if stream:
        raw = wire_field(1, 2, b"s") + wire_field(2, 2, raw)
    if cut and raw:
        raw = raw[: len(raw) - cut]
    check_agrees(roi_pb2.PoolStreamResponse if stream else roi_pb2.PoolResponse, raw)


def test_the_differential_check_catches_a_walker_that_trusts_lengths(monkeypatch):
    """A planted defect: the walker without its checks that a length fits the message around
    it. The defect shows as a span past the end of the buffer, an index error, or a parse
    where protobuf refuses; the check must say so."""
    source = Path(framing.__file__).read_text()
    guards = (
        "            if length > end - body:\n                raise _Unwalkable\n",
        "        if pos > end:\n            raise _Unwalkable\n",
    )
    for guard in guards:
        assert guard in source
        source = source.replace(guard, "")
    broken = types.ModuleType("framing_without_length_check")
    monkeypatch.setitem(sys.modules, broken.__name__, broken)  # its dataclasses look it up
    source = source.replace("from ._proto.roi.v1 import", "from roi_client._proto.roi.v1 import")
    exec(compile(source, "framing_without_length_check", "exec"), broken.__dict__)  # noqa: S102
    truncated = EncodedRequest.roi_align(np.ones((1, 4, 8, 8), np.float32), np.array([[0, 1, 1, 5, 5]], np.float32), 2).payload[:-9]
    with pytest.raises(AssertionError):
        check_agrees(roi_pb2.PoolRequest, truncated, walk=broken)
    assert check_agrees(roi_pb2.PoolRequest, truncated) == "refused"


# -- what the encoder writes --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.uint16])
def test_serialize_writes_what_protobuf_would_with_payloads_aligned(seed, dtype):
    rng = np.random.default_rng(seed)
    levels = [rng.standard_normal((2, 3, 17 - i, 9 + i)).astype(dtype) for i in range(3)]
    boxes = [rng.standard_normal((k, 4)).astype(np.float32) for k in (3, 0, 5)]
    skeleton, full = roi_pb2.PoolRequest(id="x" * int(rng.integers(0, 200)), op=6), roi_pb2.PoolRequest()
    payloads = []
    for i, lv in enumerate(levels):
        t = skeleton.pyramid.levels.add().map
        payloads.append(codec.tensor_payload(lv, None if dtype != np.uint16 else roi_pb2.DTYPE_BFLOAT16, t, len(payloads)))
    for b in boxes:
        payloads.append(codec.tensor_payload(b, None, skeleton.boxes.per_image.boxes.add(), len(payloads)))
    raw = framing.serialize(skeleton, payloads, min_bytes=0)
    full.CopyFrom(skeleton)
    for t, p in zip([lv.map for lv in full.pyramid.levels] + list(full.boxes.per_image.boxes), payloads):
        t.data = p.tobytes()
    parsed = roi_pb2.PoolRequest.FromString(raw)  # protobuf reads it; the padding is an unknown field
    parsed.DiscardUnknownFields()
    assert parsed.pyramid == full.pyramid and parsed.boxes == full.boxes and parsed.id == full.id
    msg, frame = framing.parse(roi_pb2.PoolRequest, raw, min_bytes=0)
    offsets = [frame.offset(t) for t in [lv.map for lv in msg.pyramid.levels] + list(msg.boxes.per_image.boxes)]
    assert all(o is not None and o % framing.ALIGNMENT == 0 for o in offsets), offsets


def test_serialize_refuses_a_strided_payload():
    x = np.zeros((4, 4), np.float32)[:, ::2]
    msg = roi_pb2.PoolResponse()
    msg.output.data = framing.placeholder(0)
    with pytest.raises(ValueError, match="C-contiguous"):
        framing.serialize(msg, [x])


# -- copies of a payload on each side -----------------------------------------------------------


def shares(arr, raw: bytes) -> bool:
    return np.shares_memory(np.asarray(arr), np.frombuffer(raw, np.uint8))


def _request(seed: int):
    # 983 KB of maps and 1.2 MB of output: above framing's thresholds for the walk and the
    # splice, where the copies below are the ones counted.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 64, 40, 48, generator=gen)
    boxes = torch.tensor([[0, 3.0, 4.0, 200.0, 300.0], [1, 10.0, 10.0, 500.0, 600.0]] * 48)
    return x, boxes


def test_client_request_copies_each_payload_once(seed):
    x, boxes = _request(seed)
    arr = x.numpy()
    msg = roi_pb2.Tensor()
    payload = codec.tensor_payload(arr, None, msg, 0)
    assert np.shares_memory(payload, arr), "tensor_payload copied the map"
    raw = EncodedRequest.roi_align(x, boxes, 7, 1 / 8, 2).payload
    req, frame = framing.parse(roi_pb2.PoolRequest, raw)
    # the join is the one copy: the map's bytes are in the message, aligned
    assert frame.offset(req.input) % framing.ALIGNMENT == 0
    assert bytes(frame.data(req.input)) == arr.tobytes()


def test_server_request_maps_are_views_of_the_received_bytes(seed):
    """0 copies of a map on the server (beyond gRPC's own) for our encoder's messages; one for
    a message whose payload lies off its element alignment."""
    x, boxes = _request(seed)
    raw = EncodedRequest.roi_align(x, boxes, 7, 1 / 8, 2).payload
    decoded = decode_request(*_parse(raw)[:1], LIMITS, None, _parse(raw)[1])
    assert shares(decoded.maps[0].numpy(), raw) and shares(decoded.rois.numpy(), raw)

    # The generated stubs' encoder: whatever offset the fields before put the data on.
    for pad in range(4):
        plain = roi_pb2.PoolRequest(id="p" * pad, op=roi_pb2.OP_ROI_ALIGN)
        plain.params.pooled_height = plain.params.pooled_width = 7
        codec.encode_tensor(x.numpy(), out=plain.input)
        codec.encode_tensor(boxes.numpy(), out=plain.boxes.rois)
        raw = plain.SerializeToString()
        req, frame = _parse(raw)
        decoded = decode_request(req, LIMITS, None, frame)
        aligned = frame.offset(req.input) % 4 == 0
        assert shares(decoded.maps[0].numpy(), raw) is aligned
        assert decoded.maps[0].numpy().flags.aligned
        assert torch.equal(decoded.maps[0], x)


def test_server_response_copies_the_output_once(seed):
    out = torch.randn(5, 8, 7, 7, generator=torch.Generator().manual_seed(seed))
    resp = roi_pb2.PoolResponse(id="r")
    payload = output_payload(out, resp.output)
    assert np.shares_memory(payload, out.numpy()), "output_payload copied the output"
    raw = framing.serialize(resp, [payload])
    assert not shares(out.numpy(), raw)  # the join: the one copy
    parsed = roi_pb2.PoolResponse.FromString(raw)
    assert parsed.output.data == out.numpy().tobytes() and list(parsed.output.shape) == [5, 8, 7, 7]


def test_a_real_server_answers_with_views_the_client_keeps(seed):
    x, boxes = _request(seed)
    request = EncodedRequest.roi_align(x.numpy(), boxes.numpy(), 7, 1 / 8, 2)
    with in_process_server() as srv, grpc.insecure_channel(srv.address) as channel:
        pool = channel.unary_unary("/roi.v1.RoIService/Pool")
        raw = pool(request.payload, timeout=60)
        result = decode_response(raw, request)
        assert shares(result.output, raw), "the client copied the output"
        assert_bitwise_equal(result.output, roi_kernels.roi_align(x, boxes, 7, 1 / 8, 2).numpy())
        # torch results are copied once, so that the caller gets a writable tensor
        as_torch = decode_response(raw, EncodedRequest.roi_align(x, boxes, 7, 1 / 8, 2))
        assert isinstance(as_torch.output, torch.Tensor) and not shares(as_torch.output.numpy(), raw)


# -- clients that know nothing of framing -------------------------------------------------------


def test_generated_python_stubs_only(seed):
    """A client written from the .proto alone: protobuf encodes and decodes every byte."""
    x, boxes = _request(seed)
    req = roi_pb2.PoolRequest(id="stub", op=roi_pb2.OP_ROI_ALIGN, params=roi_pb2.PoolParams(pooled_height=5, pooled_width=6, spatial_scale=0.125, sampling_ratio=2))
    req.input.dtype = roi_pb2.DTYPE_FLOAT32
    req.input.shape.extend(x.shape)
    req.input.data = x.numpy().tobytes()
    req.boxes.rois.dtype = roi_pb2.DTYPE_FLOAT32
    req.boxes.rois.shape.extend(boxes.shape)
    req.boxes.rois.data = boxes.numpy().tobytes()
    with in_process_server() as srv, grpc.insecure_channel(srv.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        resp = roi_pb2_grpc.RoIServiceStub(ch).Pool(req, timeout=60)
        stream = list(roi_pb2_grpc.RoIServiceStub(ch).PoolStream(iter([req]), timeout=60))
    want = roi_kernels.roi_align(x, boxes, (5, 6), 0.125, 2).numpy()
    assert resp.id == "stub" and list(resp.output.shape) == list(want.shape)
    assert_bitwise_equal(np.frombuffer(resp.output.data, np.float32).reshape(want.shape), want)
    assert stream[0].response.output.data == resp.output.data


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_grpc_js_client(seed, tmp_path):
    """@grpc/grpc-js with @grpc/proto-loader (protobufjs) encodes the request and decodes the
    response: a client in another language, generated from the .proto at run time."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "proto-loader").is_dir():
        run = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR)], capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr
    gen = torch.Generator().manual_seed(seed)
    levels = [torch.randn(1, 8, 64 // s, 80 // s, generator=gen) for s in (4, 8, 16)]
    boxes = torch.tensor([[0, 5.0, 6.0, 40.0, 50.0], [0, 1.0, 2.0, 60.0, 63.0], [0, 20.0, 10.0, 30.0, 20.0]])
    b64 = lambda t: __import__("base64").b64encode(t.numpy().tobytes()).decode()
    request = {
        "id": "node",
        "op": "OP_MULTISCALE_ROI_ALIGN",
        "params": {"pooled_height": 7, "pooled_width": 7, "sampling_ratio": 2},
        "pyramid": {
            "levels": [{"map": {"dtype": "DTYPE_FLOAT32", "shape": list(lv.shape), "data": b64(lv)}} for lv in levels],
            "image_sizes": [{"height": 64, "width": 80}],
        },
        "boxes": {"rois": {"dtype": "DTYPE_FLOAT32", "shape": list(boxes.shape), "data": b64(boxes)}},
    }
    (tmp_path / "req.json").write_text(json.dumps(request))
    with in_process_server() as srv:
        run = subprocess.run(
            ["node", str(NODE_DIR / "pool.js"), "--address", srv.address, "--request", str(tmp_path / "req.json"),
             "--response", str(tmp_path / "resp.json")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    resp = json.loads((tmp_path / "resp.json").read_text())
    assert "code" not in resp, resp
    want = roi_kernels.multiscale_roi_align(levels, boxes, [(64, 80)], 7, 2).numpy()
    got = np.frombuffer(__import__("base64").b64decode(resp["output"]["data"]), np.float32).reshape(resp["output"]["shape"])
    assert resp["id"] == "node" and resp["output"]["dtype"] == "DTYPE_FLOAT32"
    assert_bitwise_equal(got, want)


def test_framing_module_imports_without_torch():
    code = "import sys, roi_client.framing; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

