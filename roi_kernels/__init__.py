"""RoI feature-extraction kernels (C++ on the CPU, CUDA on the GPU) as PyTorch custom ops.

The extension is compiled on first import (see :mod:`roi_kernels._build` for the cache folder
and the switches) and registers ``torch.ops.roi_kernels.*``.
"""

from . import _autograd  # noqa: F401  (registers the ops' gradients)
from ._build import BuildError
from .modules import MultiScaleRoIAlign, PSRoIAlign, PSRoIPool, RoIAlign, RoIAlignRotated, RoIPool
from .ops import (
    convert_boxes_to_rois,
    infer_scales,
    multiscale_roi_align,
    ps_roi_align,
    ps_roi_pool,
    roi_align,
    roi_align_rotated,
    roi_pool,
)

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "MultiScaleRoIAlign",
    "PSRoIAlign",
    "PSRoIPool",
    "RoIAlign",
    "RoIAlignRotated",
    "RoIPool",
    "convert_boxes_to_rois",
    "infer_scales",
    "multiscale_roi_align",
    "ps_roi_align",
    "ps_roi_pool",
    "roi_align",
    "roi_align_rotated",
    "roi_pool",
]
