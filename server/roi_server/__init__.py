"""roi-server: RoI feature extraction over gRPC (``roi.v1.RoIService``), with dynamic batching,
health, reflection and Prometheus metrics. Start it with ``roi-server``; embed it with
:class:`~roi_server.server.BackgroundServer`."""

__version__ = "0.1.0"

__all__ = ["__version__"]
