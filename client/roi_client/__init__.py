"""roi-client: the RoI ops of a remote ``roi-server`` (``roi.v1.RoIService``), with numpy in
and out (torch where installed). Imports without torch.

    from roi_client import RoIClient
    with RoIClient("localhost:50051") as client:
        pooled = client.roi_align(features, boxes, 7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
"""

from .aio import AsyncRoIClient
from .client import RoIClient
from .errors import RoIError
from .features import AsyncFeatureMaps, FeatureHandleGone, FeatureMaps
from .memory import reuse_freed_memory
from .request import EncodedRequest, RequestDraft
from .results import PoolResult, ServerInfo, Timings

__version__ = "0.1.0"

__all__ = [
    "AsyncFeatureMaps",
    "AsyncRoIClient",
    "EncodedRequest",
    "FeatureHandleGone",
    "FeatureMaps",
    "PoolResult",
    "RequestDraft",
    "RoIClient",
    "RoIError",
    "ServerInfo",
    "Timings",
    "__version__",
    "reuse_freed_memory",
]
