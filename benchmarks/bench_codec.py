"""Serialising and parsing roi.v1 messages: protobuf's own path against roi_client.framing,
side by side in one run, for each side of a call.

    python benchmarks/bench_codec.py                       # tiny, single-level, fpn-det; float32
    python benchmarks/bench_codec.py --workloads fpn-det --repeat 15

Four steps of one call, each timed both ways on the same tensors (median of --repeat runs
after a warm-up, the two ways alternating; glibc malloc set as the server sets it):
  client encode   protobuf: each array's bytes set on the message, SerializeToString;
                  framing: placeholders set on the message, framing.serialize with the arrays.
  server decode   protobuf: PoolRequest.FromString and the server's decode_request reading
                  each tensor's data from the message (a copy);
                  framing: framing.parse and decode_request (views of the bytes).
  server encode   protobuf: the output's bytes set on a PoolResponse, SerializeToString;
                  framing: codec.output_payload and framing.serialize.
  client decode   protobuf: PoolResponse.FromString, the output's data read once;
                  framing: framing.parse, the output a view.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from bench_service import as_loadtest
from roi_client import codec, framing, reuse_freed_memory
from roi_client._proto.roi.v1 import roi_pb2
from roi_client.loadtest.senders import encode
from roi_server.codec import Limits, decode_request, output_payload

LIMITS = Limits(max_boxes=1 << 20, max_output_elements=1 << 31, max_message_bytes=1 << 30)


def protobuf_request(payload: bytes) -> bytes:
    """The same request as our encoder's, built the way a protobuf client builds it."""
    req = roi_pb2.PoolRequest.FromString(payload)
    return req.SerializeToString()


def tensors(msg) -> list:
    found = []
    if msg.DESCRIPTOR.full_name == framing.TENSOR:
        return [msg]
    for fd, value in msg.ListFields():
        if fd.message_type is not None:
            for v in value if fd.is_repeated else [value]:
                found.extend(tensors(v))
    return found


def timed(fn, repeat: int) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def bench_workload(name: str, repeat: int) -> None:
    w = workloads.make(name, torch.float32)
    ours = encode(as_loadtest(w)).payload
    theirs = protobuf_request(ours)
    req, frame = framing.parse(roi_pb2.PoolRequest, ours)
    decoded = decode_request(req, LIMITS, None, frame)
    out = torch.randn(decoded.output_shape)
    resp_skeleton = roi_pb2.PoolResponse(id="x")
    payload = output_payload(out, resp_skeleton.output)
    response = framing.serialize(resp_skeleton, [payload])

    # A protobuf client's request: the small fields set, then each array's bytes.
    skeleton = roi_pb2.PoolRequest.FromString(theirs)
    arrays = [codec.decode_words(t.data, codec.WIRE_DTYPES[t.dtype], tuple(t.shape)).copy() for t in tensors(skeleton)]
    for t in tensors(skeleton):
        t.data = b""

    def pb_client_encode():
        msg = roi_pb2.PoolRequest()
        msg.CopyFrom(skeleton)
        for t, arr in zip(tensors(msg), arrays):
            t.data = arr.tobytes()
        return msg.SerializeToString()

    def pb_server_decode():
        return decode_request(roi_pb2.PoolRequest.FromString(theirs), LIMITS)

    def fr_client_encode():
        msg = roi_pb2.PoolRequest()
        msg.CopyFrom(skeleton)
        for i, t in enumerate(tensors(msg)):
            t.data = framing.placeholder(i)
        return framing.serialize(msg, arrays)

    def fr_server_decode():
        m, f = framing.parse(roi_pb2.PoolRequest, ours)
        return decode_request(m, LIMITS, None, f)

    def pb_server_encode():
        msg = roi_pb2.PoolResponse(id="x")
        msg.output.dtype = roi_pb2.DTYPE_FLOAT32
        msg.output.shape.extend(out.shape)
        msg.output.data = out.numpy().tobytes()
        return msg.SerializeToString()

    def fr_server_encode():
        msg = roi_pb2.PoolResponse(id="x")
        return framing.serialize(msg, [output_payload(out, msg.output)])

    def pb_client_decode():
        msg = roi_pb2.PoolResponse.FromString(response)
        return codec.decode_array(msg.output)

    def fr_client_decode():
        m, f = framing.parse(roi_pb2.PoolResponse, response)
        return codec.decode_array(m.output, data=f.data(m.output))

    steps = [
        ("client encode", pb_client_encode, fr_client_encode),
        ("server decode", pb_server_decode, fr_server_decode),
        ("server encode", pb_server_encode, fr_server_encode),
        ("client decode", pb_client_decode, fr_client_decode),
    ]
    for step, pb, fr in steps:
        a, b = [], []
        for _ in range(3):  # alternate the two ways, so that drifts hit both
            a.append(timed(pb, repeat))
            b.append(timed(fr, repeat))
        pa, pf = statistics.median(a), statistics.median(b)
        print(f"| {name} | {len(ours):,} / {len(response):,} | {step} | {pa:.3f} | {pf:.3f} | {pa / pf:.1f}x |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["tiny", "single-level", "fpn-det"])
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args()
    reuse_freed_memory()
    print(f"# bench_codec: torch {torch.__version__}; median of {args.repeat} after a warm-up; ms per message")
    print("| workload | bytes (request / response) | step | protobuf ms | framing ms | protobuf / framing |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name in args.workloads:
        bench_workload(name, args.repeat)


if __name__ == "__main__":
    main()
