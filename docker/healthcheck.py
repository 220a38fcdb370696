"""Container health probe: asks the server's ``grpc.health.v1`` service and exits 0 only on SERVING.

    python /opt/roi/healthcheck.py                          # 127.0.0.1:$ROI_PORT, roi.v1.RoIService
    python /opt/roi/healthcheck.py --target host:50051 --service ""

Docker's HEALTHCHECK and compose's ``healthcheck`` run it inside the container. Kubernetes does not
need it: its native ``grpc`` probe asks the same service. Exit codes: 0 SERVING, 1 anything else
(NOT_SERVING while the kernels warm up or the server drains, SERVICE_UNKNOWN, no answer in time).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        # The probe runs beside the server, so the server's own port setting tells where to ask.
        default=f"127.0.0.1:{os.environ.get('ROI_PORT', '50051')}",
        help="host:port of the gRPC server (default 127.0.0.1:$ROI_PORT or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--service",
        default="roi.v1.RoIService",
        help='service name to ask about; "" asks about the server as a whole',
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target} {args.service or '<server>'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
