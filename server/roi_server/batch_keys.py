"""Which requests may share one kernel launch (the dynamic batcher groups by this key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .codec import DecodedRequest


def batch_key(r: DecodedRequest) -> tuple:
    """Requests with equal keys can run in one kernel launch.

    roi_align pools any mix of map sizes in one launch (its ragged form), so its key leaves
    the spatial size out; the other ops concatenate maps along N, which needs equal sizes.
    """
    common = (r.op, r.dtype, r.channels, r.pooled_height, r.pooled_width, r.sampling_ratio, r.aligned, r.pool_mode)
    if r.op == "roi_align":
        return (*common, r.spatial_scale)
    if r.op == "multiscale_roi_align":
        shapes = tuple(tuple(t.shape[2:]) for t in r.maps)
        return (*common, r.scales, shapes, r.canonical_scale, r.canonical_level)
    return (*common, r.spatial_scale, tuple(r.maps[0].shape[2:]))
