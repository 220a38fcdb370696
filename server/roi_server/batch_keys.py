"""Which requests may share one kernel launch (the dynamic batcher groups by this key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .codec import DecodedRequest


def batch_key(r: DecodedRequest) -> tuple:
    """Requests with equal keys can run in one kernel launch.

    Every op has a ragged form that pools per-image maps of any sizes in one launch, so no key
    holds the maps' spatial sizes; an FPN batch needs the same levels (scales) throughout.
    """
    common = (r.op, r.dtype, r.channels, r.pooled_height, r.pooled_width, r.sampling_ratio, r.aligned, r.pool_mode)
    if r.op == "multiscale_roi_align":
        return (*common, r.scales, r.canonical_scale, r.canonical_level)
    return (*common, r.spatial_scale)
