"""grpcio's health service, with Watch streams that end once shutdown has been announced.

``grpc.aio.Server.stop(grace)`` lets every running call finish before it closes. A health Watch
never finishes on its own, so a watching client (a load balancer, a client-side health check)
would hold the stop for the whole grace period and then be cut off. Here each Watch ends, with
status OK, right after it has sent NOT_SERVING following :meth:`enter_graceful_shutdown`; the
stop then waits only for the RoI requests.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health, health_pb2

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Tap:
    """A servicer context whose ``write`` notes when the shutdown status has gone out."""

    def __init__(self, context: Any, servicer: DrainingHealthServicer, sent: asyncio.Event) -> None:
        self._context = context
        self._servicer = servicer
        self._sent = sent

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if self._servicer.shutting_down and message.status == NOT_SERVING:
            self._sent.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class DrainingHealthServicer(health.aio.HealthServicer):
    @property
    def shutting_down(self) -> bool:
        return self._gracefully_shutting_down

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        sent = asyncio.Event()
        watching = asyncio.ensure_future(super().Watch(request, _Tap(context, self, sent)))
        announced = asyncio.ensure_future(sent.wait())
        try:
            await asyncio.wait({watching, announced}, return_when=asyncio.FIRST_COMPLETED)
            if watching.done():
                watching.result()  # the client went away, or writing failed: let it show
        finally:
            watching.cancel()
            announced.cancel()
