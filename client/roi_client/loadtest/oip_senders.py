"""Targets driven through the Open Inference Protocol (``roi-loadtest --protocol oip``): the
workload as one ModelInferRequest of roi-server's ``inference.GRPCInferenceService``, built and
serialised once, sent by a raw-bytes ModelInfer call on one channel per target and
connection, as a Triton or KServe client would send it. numpy only: no torch, no tritonclient."""

from __future__ import annotations

import grpc

from .. import oip
from ..channel import call_metadata, channel_credentials, tls_options
from ..errors import RoIError
from .runner import Reply
from .workload import Workload

DATATYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float64": "FP64"}


def infer_request(w: Workload, wire_dtype: str | None = None) -> bytes:
    """The workload as one serialised ModelInferRequest, its maps as ``wire_dtype`` (default
    their own dtype)."""
    if w.op == "ragged_roi_align":
        raise ValueError(
            "the Open Inference Protocol has no ragged maps (one input per name): choose another workload or op"
        )
    datatype = DATATYPES[wire_dtype or w.dtype]
    ph, pw = w.output_size
    params: dict = {"pooled_height": int(ph), "pooled_width": int(pw)}
    if w.op != "multiscale_roi_align":
        params["spatial_scale"] = float(w.spatial_scale)
    if w.op in ("roi_align", "ps_roi_align", "roi_align_rotated", "multiscale_roi_align"):
        params["sampling_ratio"] = int(w.sampling_ratio)
    if w.op in ("roi_align", "roi_align_rotated", "multiscale_roi_align"):
        params["aligned"] = bool(w.aligned)
    if w.op in ("roi_align", "multiscale_roi_align"):
        params["pool_mode"] = w.pool_mode
    if w.op == "multiscale_roi_align":
        inputs = [(f"level_{i}", m, datatype) for i, m in enumerate(w.maps)]
        inputs += [("rois", w.boxes, None), ("image_sizes", [list(s) for s in w.image_sizes], "INT64")]
    else:
        inputs = [("input", w.maps[0], datatype), ("rois", w.boxes, None)]
    req, payloads = oip.infer_request(w.op, inputs, params)
    return oip.serialize_infer_request(req, payloads)


class OIPSender:
    """One connection to one target, sending the prepared ModelInferRequest."""

    def __init__(
        self, channel: grpc.aio.Channel, request: bytes, name: str, boxes: int, metadata, timeout: float
    ) -> None:
        self.channel = channel
        self.timeout = timeout
        self.name = name
        self.sent_bytes = len(request)
        self.boxes = boxes
        self._request = request
        self._metadata = metadata
        self._call = channel.unary_unary(oip.MODEL_INFER)

    async def send(self) -> Reply:
        try:
            raw = await self._call(self._request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RoIError.from_rpc_error(exc) from None
        resp, payloads = oip.parse_infer_response(raw)
        p = resp.parameters
        timings = {
            "queue_seconds": p["queue_seconds"].double_param,
            "compute_seconds": p["compute_seconds"].double_param,
            "total_seconds": p["total_seconds"].double_param,
            "batch_requests": p["batch_requests"].int64_param,
            "batch_boxes": p["batch_boxes"].int64_param,
        }
        return Reply(oip.output_array(resp, payloads), timings, len(raw))


async def open_oip_senders(
    targets: list[str],
    w: Workload,
    *,
    timeout: float,
    wire_dtype: str | None = None,
    connections: int = 1,
    max_message_bytes: int = (1 << 30) - (1 << 20),
    client_options: dict | None = None,
):
    """(senders, server descriptions, async close), as :func:`.senders.open_senders` gives
    them, through the Open Inference Protocol. ``client_options``: ``tls``, ``tls_ca``,
    ``tls_cert``, ``tls_key``, ``tls_server_name``, ``token`` (as for the roi.v1 clients)."""
    o = client_options or {}
    request = infer_request(w, wire_dtype)
    credentials = channel_credentials(
        o.get("tls"), o.get("tls_ca"), o.get("tls_cert"), o.get("tls_key"), None
    )
    metadata = call_metadata(o.get("token"))
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Each sender its own TCP connection, even to the same address.
        ("grpc.use_local_subchannel_pool", 1),
        *tls_options(o.get("tls_server_name")),
    ]
    channels, senders = [], []
    for target in targets:
        for _ in range(connections):
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=options)
            else:
                channel = grpc.aio.secure_channel(target, credentials, options=options)
            channels.append(channel)
            senders.append(OIPSender(channel, request, target, w.num_boxes, metadata, timeout))

    async def close() -> None:
        for c in channels:
            await c.close()

    servers = []
    for target, channel in zip(targets, channels[::connections]):
        try:
            meta = await channel.unary_unary(
                f"/{oip.SERVICE_NAME}/ServerMetadata",
                request_serializer=oip.pb.ServerMetadataRequest.SerializeToString,
                response_deserializer=oip.pb.ServerMetadataResponse.FromString,
            )(oip.pb.ServerMetadataRequest(), timeout=min(timeout, 30.0), metadata=metadata)
            ready = await channel.unary_unary(
                f"/{oip.SERVICE_NAME}/ModelReady",
                request_serializer=oip.pb.ModelReadyRequest.SerializeToString,
                response_deserializer=oip.pb.ModelReadyResponse.FromString,
            )(oip.pb.ModelReadyRequest(name=w.op), timeout=min(timeout, 30.0), metadata=metadata)
        except grpc.RpcError as exc:
            await close()
            raise ConnectionError(f"{target}: {RoIError.from_rpc_error(exc)}") from None
        if not ready.ready:
            await close()
            raise ConnectionError(f"{target}: model {w.op!r} is not ready")
        servers.append({"target": target, "version": meta.version, "protocol": "oip", "name": meta.name,
                        "extensions": list(meta.extensions)})  # fmt: skip
    return senders, servers, close
