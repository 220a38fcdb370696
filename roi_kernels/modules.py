"""``nn.Module`` wrappers with torchvision's constructor arguments.

They compile with ``torch.jit.script`` (alone or inside a scripted detector, e.g. as the
``box_roi_pool`` of torchvision's Faster R-CNN) and export with ``torch.export``; the forward
annotations are the types scripted callers pass (see :mod:`roi_kernels.ops`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import ops


class RoIAlign(nn.Module):
    """See :func:`roi_kernels.roi_align`."""

    def __init__(
        self,
        output_size: ops.SizeLike,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
        pool_mode: str = "avg",
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.pool_mode = pool_mode

    def forward(self, input: ops.MapsLike, rois: ops.BoxesLike) -> Tensor:
        return ops.roi_align(
            input,
            rois,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
            self.pool_mode,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, pool_mode={self.pool_mode!r}"
        )


class RoIPool(nn.Module):
    """See :func:`roi_kernels.roi_pool`."""

    def __init__(self, output_size: ops.SizeLike, spatial_scale: float) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: ops.MapsLike, rois: ops.BoxesLike) -> Tensor:
        return ops.roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class PSRoIAlign(nn.Module):
    """See :func:`roi_kernels.ps_roi_align`."""

    def __init__(self, output_size: ops.SizeLike, spatial_scale: float, sampling_ratio: int) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: ops.MapsLike, rois: ops.BoxesLike) -> Tensor:
        return ops.ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}"
        )


class PSRoIPool(nn.Module):
    """See :func:`roi_kernels.ps_roi_pool`."""

    def __init__(self, output_size: ops.SizeLike, spatial_scale: float) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: ops.MapsLike, rois: ops.BoxesLike) -> Tensor:
        return ops.ps_roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class RoIAlignRotated(nn.Module):
    """See :func:`roi_kernels.roi_align_rotated`."""

    def __init__(
        self, output_size: ops.SizeLike, spatial_scale: float, sampling_ratio: int, aligned: bool = True
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: ops.MapsLike, rois: ops.BoxesLike) -> Tensor:
        return ops.roi_align_rotated(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


class MultiScaleRoIAlign(nn.Module):
    """torchvision's ``MultiScaleRoIAlign``: pools each box on its FPN level, in one launch.

    ``forward(x, boxes, image_shapes)`` takes a dict of feature maps (the keys named by
    ``featmap_names`` are used, in that order, finest first), a list of ``Tensor[L_i, 4]``
    and the ``(height, width)`` of each image.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: ops.SizeLike,
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned

    def forward(self, x: ops.FeatureDict, boxes: ops.BoxesLike, image_shapes: ops.ImageSizes) -> Tensor:
        missing: list[str] = []
        for k in self.featmap_names:
            if k not in x:
                missing.append(k)
        if len(missing) > 0:
            raise KeyError(f"x has no feature map named {missing}")
        return ops.multiscale_roi_align(
            [x[k] for k in self.featmap_names],
            boxes,
            image_shapes,
            self.output_size,
            self.sampling_ratio,
            self.aligned,
            self.canonical_scale,
            self.canonical_level,
        )

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}"
        )
