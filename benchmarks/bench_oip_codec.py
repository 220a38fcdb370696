"""Parsing and serialising Open Inference Protocol messages on the server: protobuf's own path
against roi_client.oip's split (raw_input_contents as views of the received bytes) and join
(the output's memory joined once into raw_output_contents), side by side in one run.

    python benchmarks/bench_oip_codec.py                    # tiny, single-level, fpn-det; float32
    python benchmarks/bench_oip_codec.py --workloads fpn-det --repeat 15

Two steps of the server's side of a ModelInfer call, each timed both ways on the same
message (median of --repeat runs after a warm-up, the two ways alternating; glibc malloc set
as the server sets it):
  server decode   protobuf: ModelInferRequest.FromString (each raw input copied), translation
                  and decode_request;
                  split: roi_server.oip.parse_infer_request (views), translation and
                  decode_request.
  server encode   protobuf: the output's bytes appended to raw_output_contents, SerializeToString;
                  join: roi_client.oip.serialize_infer_response.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from bench_codec import timed
from bench_service import as_loadtest
from roi_client import oip as wire_oip
from roi_client import reuse_freed_memory
from roi_client._proto.inference import grpc_service_pb2 as pb
from roi_client.loadtest.oip_senders import infer_request
from roi_server import oip
from roi_server.codec import Limits, decode_request

LIMITS = Limits(max_boxes=1 << 20, max_output_elements=1 << 31, max_message_bytes=1 << 30)


def bench_workload(name: str, repeat: int) -> None:
    w = workloads.make(name, torch.float32)
    raw = infer_request(as_loadtest(w))
    req, views = oip.parse_infer_request(raw)
    pool_req, frame = oip.translate(req, views)
    decoded = decode_request(pool_req, LIMITS, None, frame)
    out = torch.randn(decoded.output_shape).numpy()
    header = pb.ModelInferResponse(model_name=w.op, model_version="1", id="x")
    header.outputs.add(name="output", datatype="FP32", shape=list(out.shape))

    def pb_decode():
        whole = pb.ModelInferRequest.FromString(raw)
        r, f = oip.translate(whole, list(whole.raw_input_contents))
        return decode_request(r, LIMITS, None, f)

    def split_decode():
        m, v = oip.parse_infer_request(raw)
        r, f = oip.translate(m, v)
        return decode_request(r, LIMITS, None, f)

    def pb_encode():
        msg = pb.ModelInferResponse()
        msg.CopyFrom(header)
        msg.raw_output_contents.append(out.tobytes())
        return msg.SerializeToString()

    def join_encode():
        return wire_oip.serialize_infer_response(header, [out])

    response = join_encode()
    ours = pb.ModelInferResponse.FromString(response)
    ours.DiscardUnknownFields()  # the padding field before the payload
    assert ours == pb.ModelInferResponse.FromString(pb_encode())
    for step, a_fn, b_fn in (
        ("server decode", pb_decode, split_decode),
        ("server encode", pb_encode, join_encode),
    ):
        a, b = [], []
        for _ in range(3):  # alternate the two ways, so that drifts hit both
            a.append(timed(a_fn, repeat))
            b.append(timed(b_fn, repeat))
        pa, pf = statistics.median(a), statistics.median(b)
        print(
            f"| {name} | {len(raw):,} / {len(response):,} | {step} | {pa:.3f} | {pf:.3f} | {pa / pf:.1f}x |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["tiny", "single-level", "fpn-det"])
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args()
    reuse_freed_memory()
    print(
        f"# bench_oip_codec: torch {torch.__version__}; median of {args.repeat} after a warm-up; ms per message"
    )
    print("| workload | bytes (request / response) | step | protobuf ms | split/join ms | protobuf / ours |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name in args.workloads:
        bench_workload(name, args.repeat)


if __name__ == "__main__":
    main()
