"""The contender: the roi.v1 server a user would write in an afternoon instead of roi-server.

A ``grpc.aio`` server from the generated stubs: protobuf parses every request, numpy views
its tensors' bytes, torchvision's op computes the result, protobuf serialises it; one request
at a time (the handler never leaves the event loop), no batching, no validation beyond what
the ops check themselves, no metrics. It answers Pool and Describe (the load tester asks for
the limits), which is all ``roi-loadtest`` needs.

    python benchmarks/plain_server.py --port 0 --threads 2      # prints "listening on 127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign

from roi_client._proto.roi.v1 import roi_pb2, roi_pb2_grpc

NUMPY = {roi_pb2.DTYPE_FLOAT32: np.float32, roi_pb2.DTYPE_FLOAT16: np.float16, roi_pb2.DTYPE_FLOAT64: np.float64}
WIRE = {torch.float32: roi_pb2.DTYPE_FLOAT32, torch.float16: roi_pb2.DTYPE_FLOAT16, torch.float64: roi_pb2.DTYPE_FLOAT64}


def tensor(msg: roi_pb2.Tensor) -> torch.Tensor:
    arr = np.frombuffer(msg.data, NUMPY[msg.dtype]).reshape(tuple(msg.shape))
    return torch.from_numpy(arr.copy())


def compute(req: roi_pb2.PoolRequest) -> torch.Tensor:
    p = req.params
    size = (p.pooled_height, p.pooled_width)
    scale = p.spatial_scale if p.HasField("spatial_scale") else 1.0
    ratio = p.sampling_ratio if p.HasField("sampling_ratio") else -1
    rois = tensor(req.boxes.rois)
    ops = torchvision.ops
    if req.op == roi_pb2.OP_MULTISCALE_ROI_ALIGN:
        levels = {str(i): tensor(lv.map) for i, lv in enumerate(req.pyramid.levels)}
        sizes = [(s.height, s.width) for s in req.pyramid.image_sizes]
        pooler = MultiScaleRoIAlign(list(levels), size, ratio)
        boxes = [rois[rois[:, 0] == i, 1:] for i in range(len(sizes))]
        return pooler(levels, boxes, sizes)
    x = tensor(req.input)
    if req.op == roi_pb2.OP_ROI_ALIGN:
        return ops.roi_align(x, rois, size, scale, ratio, p.aligned)
    if req.op == roi_pb2.OP_ROI_POOL:
        return ops.roi_pool(x, rois, size, scale)
    if req.op == roi_pb2.OP_PS_ROI_ALIGN:
        return ops.ps_roi_align(x, rois, size, scale, ratio)
    if req.op == roi_pb2.OP_PS_ROI_POOL:
        return ops.ps_roi_pool(x, rois, size, scale)
    raise ValueError(f"op {req.op} is not served here")


class PlainServicer(roi_pb2_grpc.RoIServiceServicer):
    async def Pool(self, request, context):  # noqa: N802  (the generated stubs' names)
        try:
            with torch.inference_mode():
                out = compute(request)
        except Exception as exc:  # noqa: BLE001
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        resp = roi_pb2.PoolResponse(id=request.id)
        resp.output.dtype = WIRE[out.dtype]
        resp.output.shape.extend(out.shape)
        resp.output.data = out.numpy().tobytes()
        return resp

    async def Describe(self, request, context):  # noqa: N802
        return roi_pb2.DescribeResponse(version="plain", device="cpu", ops=["roi_align", "roi_pool"],
                                        limits=roi_pb2.Limits(max_message_bytes=1 << 30))


async def serve(host: str, port: int) -> None:
    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    server = grpc.aio.server(options=options)
    roi_pb2_grpc.add_RoIServiceServicer_to_server(PlainServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
