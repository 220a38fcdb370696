"""The public RoI ops: torchvision-compatible signatures over ``torch.ops.roi_kernels``.

Boxes are ``(x1, y1, x2, y2)`` in input-image pixels. ``spatial_scale`` maps them onto the
feature map: for a stride-16 backbone map, ``spatial_scale=1/16`` sends the image box
``(160, 80, 320, 240)`` to the map box ``(10, 5, 20, 15)``.

``boxes`` is either ``Tensor[K, 5]`` whose first column is the image index, or a list of
``Tensor[L_i, 4]``, one per image (the torchvision convention). Results are contiguous
``Tensor[K, C, PH, PW]`` in the input's dtype (float16 and bfloat16 accumulate in float32).

Every op and module compiles with ``torch.jit.script`` and exports with ``torch.export``. In
eager mode the arguments may be any sequence (tuples, lists, 1-D tensors for sizes); scripted
code passes them as the annotations say: lists of tensors, ``int`` or ``(int, int)`` sizes,
``list[tuple[int, int]]`` image sizes (what torchvision's detectors pass).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _build

_build.load()

# The annotations are the TorchScript types of the arguments; eager calls take any sequence.
MapsLike = Tensor | list[Tensor]
BoxesLike = Tensor | list[Tensor]
SizeLike = int | list[int] | tuple[int, int]
ImageSizes = list[tuple[int, int]]
FeatureDict = dict[str, Tensor]

__all__ = [
    "roi_align",
    "roi_pool",
    "ps_roi_align",
    "ps_roi_pool",
    "roi_align_rotated",
    "multiscale_roi_align",
    "infer_scales",
    "convert_boxes_to_rois",
]

_ops = torch.ops.roi_kernels


def _int(name: str, value) -> int:
    """``value`` as an int: an int, or a float or 0-d tensor holding an integer."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not as_float.is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(as_float)


def _float(name: str, value) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None


def _pair(output_size: SizeLike) -> tuple[int, int]:
    if isinstance(output_size, (str, bytes)):
        raise TypeError(f"output_size must be an int or (height, width), got {output_size!r}")
    try:
        items = list(output_size)  # type: ignore[arg-type]  (a sequence, a 1-D array or tensor)
    except TypeError:
        items = [output_size]  # one number for both sides
    size = tuple(_int("output_size", s) for s in items)
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or (height, width), got {output_size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"output_size must be positive, got {size}")
    return size  # type: ignore[return-value]


def convert_boxes_to_rois(boxes: BoxesLike, name: str = "boxes", cols: int = 4) -> Tensor:
    """``list[Tensor[L_i, cols]]`` -> ``Tensor[K, cols + 1]`` with the image index first.

    A tensor is returned unchanged (the op checks its shape).
    """
    if torch.jit.is_scripting():
        return _rois_script(boxes, name, cols)
    if isinstance(boxes, Tensor):
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(
            f"{name} must be Tensor[K, {cols + 1}] or a list of Tensor[L, {cols}], "
            f"got {type(boxes).__name__}"
        )
    if len(boxes) == 0:
        raise ValueError(f"{name} is an empty list: give one Tensor[L, {cols}] per image")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != cols:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"{name}[{i}] must be Tensor[L, {cols}], got {shape}")
        if b.dtype != boxes[0].dtype or b.device != boxes[0].device:
            raise ValueError(f"{name}[{i}] must have the dtype and device of {name}[0]")
    concat = torch.cat(list(boxes), dim=0)
    ids = torch.cat(
        [torch.full((b.size(0), 1), i, dtype=concat.dtype, device=concat.device) for i, b in enumerate(boxes)]
    )
    return torch.cat([ids, concat], dim=1)


def _is_ragged(input) -> bool:
    """Whether ``input`` is a ragged batch (a list of ``Tensor[C, H_i, W_i]``) rather than one map."""
    if isinstance(input, Tensor):
        return False
    if not isinstance(input, (list, tuple)):
        raise TypeError(
            f"input must be Tensor[N, C, H, W] or a list of Tensor[C, H, W], got {type(input).__name__}"
        )
    return True


def _check_pool_mode(pool_mode: str) -> None:
    if pool_mode not in ("avg", "max"):
        raise ValueError(f'pool_mode must be "avg" or "max", got {pool_mode!r}')


# ---------------------------------------------------------------------------------------------
# The same checks in TorchScript: the eager helpers above take any Python object (a tuple, a
# 0-d tensor, a numpy array), which TorchScript cannot express; inside ``torch.jit.script`` the
# arguments are typed, so these only check values. The public functions pick one set or the
# other with ``torch.jit.is_scripting()``, which TorchScript evaluates while compiling (the
# eager branch is never compiled).
# ---------------------------------------------------------------------------------------------


def _pair_script(output_size: SizeLike) -> tuple[int, int]:
    if isinstance(output_size, int):
        size = [output_size, output_size]
    elif isinstance(output_size, list):
        size = output_size
    else:
        size = [output_size[0], output_size[1]]
    if len(size) == 1:
        size = [size[0], size[0]]
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or (height, width), got {output_size}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"output_size must be positive, got {size}")
    return size[0], size[1]


def _check_pool_mode_script(pool_mode: str) -> None:
    if pool_mode != "avg" and pool_mode != "max":
        raise ValueError(f'pool_mode must be "avg" or "max", got "{pool_mode}"')


def _rois_script(boxes: BoxesLike, name: str, cols: int) -> Tensor:
    """:func:`convert_boxes_to_rois` for typed boxes."""
    if isinstance(boxes, Tensor):
        return boxes
    if len(boxes) == 0:
        raise ValueError(f"{name} is an empty list: give one Tensor[L, {cols}] per image")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.size(1) != cols:
            raise ValueError(f"{name}[{i}] must be Tensor[L, {cols}], got {b.shape}")
        if b.dtype != boxes[0].dtype or b.device != boxes[0].device:
            raise ValueError(f"{name}[{i}] must have the dtype and device of {name}[0]")
    concat = torch.cat(boxes, dim=0)
    ids: list[Tensor] = []
    for i, b in enumerate(boxes):
        ids.append(torch.full((b.size(0), 1), i, dtype=concat.dtype, device=concat.device))
    return torch.cat([torch.cat(ids), concat], dim=1)


def roi_align(
    input: MapsLike,
    boxes: BoxesLike,
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    pool_mode: str = "avg",
) -> Tensor:
    """RoIAlign (Mask R-CNN): bilinear samples on a regular grid in each bin, averaged
    (``pool_mode="avg"``, torchvision's op) or maxed (``"max"``, as in mmcv).

    Args:
        input: ``Tensor[N, C, H, W]``, or a list of ``Tensor[C, H_i, W_i]`` of different
            sizes (a ragged batch, pooled in one launch with no padding).
        boxes: ``Tensor[K, 5]`` or ``list[Tensor[L_i, 4]]`` in image pixels.
        output_size: ``(PH, PW)`` or one int.
        spatial_scale: feature-map size over image size, e.g. ``1/16``.
        sampling_ratio: samples per bin along each axis; ``<= 0`` for adaptive
            (``ceil(box size / output size)``).
        aligned: shift box corners by -0.5 pixel (pixel-centre alignment).
        pool_mode: ``"avg"`` or ``"max"``.

    Returns:
        ``Tensor[K, C, PH, PW]``.
    """
    if torch.jit.is_scripting():
        _check_pool_mode_script(pool_mode)
        ph, pw = _pair_script(output_size)
        scale, ratio = spatial_scale, sampling_ratio
        rois = _rois_script(boxes, "boxes", 4)
    else:
        _check_pool_mode(pool_mode)
        ph, pw = _pair(output_size)
        scale, ratio = _float("spatial_scale", spatial_scale), _int("sampling_ratio", sampling_ratio)
        rois = convert_boxes_to_rois(boxes)
        _is_ragged(input)
    if isinstance(input, Tensor):
        return _ops.roi_align(input, rois, scale, ph, pw, ratio, bool(aligned), pool_mode)
    return _ops.roi_align_ragged(list(input), rois, scale, ph, pw, ratio, bool(aligned), pool_mode)


def roi_pool(input: MapsLike, boxes: BoxesLike, output_size: SizeLike, spatial_scale: float = 1.0) -> Tensor:
    """RoIPool (Fast R-CNN): the box and its bins snapped to the grid, max over each bin.

    Args:
        input: ``Tensor[N, C, H, W]``, or a list of ``Tensor[C, H_i, W_i]`` (a ragged batch).
        boxes: ``Tensor[K, 5]`` or ``list[Tensor[L_i, 4]]`` in image pixels.
        output_size: ``(PH, PW)`` or one int.
        spatial_scale: feature-map size over image size, e.g. ``1/16``.

    Returns:
        ``Tensor[K, C, PH, PW]``; an empty bin gives 0.
    """
    if torch.jit.is_scripting():
        ph, pw = _pair_script(output_size)
        rois, scale = _rois_script(boxes, "boxes", 4), spatial_scale
    else:
        ph, pw = _pair(output_size)
        rois, scale = convert_boxes_to_rois(boxes), _float("spatial_scale", spatial_scale)
        _is_ragged(input)
    if isinstance(input, Tensor):
        return _ops.roi_pool(input, rois, scale, ph, pw)
    return _ops.roi_pool_ragged(list(input), rois, scale, ph, pw)


def ps_roi_align(
    input: MapsLike,
    boxes: BoxesLike,
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Tensor:
    """Position-sensitive RoIAlign (R-FCN).

    Args:
        input: ``Tensor[N, C_out * PH * PW, H, W]``, or a list of ``Tensor[C_out * PH * PW,
            H_i, W_i]`` (a ragged batch).
        boxes: ``Tensor[K, 5]`` or ``list[Tensor[L_i, 4]]``.

    Returns:
        ``Tensor[K, C_out, PH, PW]``: channel ``c`` of bin ``(ph, pw)`` reads input channel
        ``(c * PH + ph) * PW + pw``.
    """
    if torch.jit.is_scripting():
        ph, pw = _pair_script(output_size)
        rois, scale, ratio = _rois_script(boxes, "boxes", 4), spatial_scale, sampling_ratio
    else:
        ph, pw = _pair(output_size)
        rois, scale = convert_boxes_to_rois(boxes), _float("spatial_scale", spatial_scale)
        ratio = _int("sampling_ratio", sampling_ratio)
        _is_ragged(input)
    if isinstance(input, Tensor):
        return _ops.ps_roi_align(input, rois, scale, ph, pw, ratio)
    return _ops.ps_roi_align_ragged(list(input), rois, scale, ph, pw, ratio)


def ps_roi_pool(
    input: MapsLike, boxes: BoxesLike, output_size: SizeLike, spatial_scale: float = 1.0
) -> Tensor:
    """Position-sensitive RoIPool (R-FCN): the average of each bin's cells.

    Args:
        input: ``Tensor[N, C_out * PH * PW, H, W]``, or a list of ``Tensor[C_out * PH * PW,
            H_i, W_i]`` (a ragged batch).
        boxes: ``Tensor[K, 5]`` or ``list[Tensor[L_i, 4]]``.

    Returns:
        ``Tensor[K, C_out, PH, PW]``.
    """
    if torch.jit.is_scripting():
        ph, pw = _pair_script(output_size)
        rois, scale = _rois_script(boxes, "boxes", 4), spatial_scale
    else:
        ph, pw = _pair(output_size)
        rois, scale = convert_boxes_to_rois(boxes), _float("spatial_scale", spatial_scale)
        _is_ragged(input)
    if isinstance(input, Tensor):
        return _ops.ps_roi_pool(input, rois, scale, ph, pw)
    return _ops.ps_roi_pool_ragged(list(input), rois, scale, ph, pw)


def roi_align_rotated(
    input: MapsLike,
    rois: BoxesLike,
    output_size: SizeLike,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign over rotated boxes (detectron2's ``ROIAlignRotated``).

    Args:
        input: ``Tensor[N, C, H, W]``, or a list of ``Tensor[C, H_i, W_i]`` (a ragged batch).
        rois: ``Tensor[K, 6]`` as ``(image index, cx, cy, w, h, angle)``, or a list of
            ``Tensor[L_i, 5]``; the angle is in degrees, counter-clockwise on screen.
        aligned: ``True`` (detectron2): centre shifted by -0.5 pixel, no minimum size;
            ``False`` (mmcv legacy): no shift, width and height at least 1.

    Returns:
        ``Tensor[K, C, PH, PW]``.
    """
    if torch.jit.is_scripting():
        ph, pw = _pair_script(output_size)
        r = _rois_script(rois, "rois", 5)
        scale, ratio = spatial_scale, sampling_ratio
    else:
        ph, pw = _pair(output_size)
        r = convert_boxes_to_rois(rois, name="rois", cols=5)
        scale, ratio = _float("spatial_scale", spatial_scale), _int("sampling_ratio", sampling_ratio)
        _is_ragged(input)
    if isinstance(input, Tensor):
        return _ops.roi_align_rotated(input, r, scale, ph, pw, ratio, bool(aligned))
    return _ops.roi_align_rotated_ragged(list(input), r, scale, ph, pw, ratio, bool(aligned))


def infer_scales(features: list[Tensor], image_sizes: ImageSizes) -> list[float]:
    """Each level's ``spatial_scale`` as torchvision infers it: the power of two closest to
    ``map height / largest image height``."""
    if torch.jit.is_scripting():
        return _infer_scales_script(features, image_sizes)
    if not image_sizes:
        raise ValueError("image_sizes must list each image's (height, width)")
    max_h = max(int(s[0]) for s in image_sizes)
    if max_h <= 0:
        raise ValueError("image_sizes must be positive")
    scales = []
    for i, f in enumerate(features):
        if not isinstance(f, Tensor) or f.dim() != 4:
            raise ValueError(f"features[{i}] must be Tensor[N, C, H, W]")
        approx = float(f.shape[-2]) / float(max_h)
        if approx <= 0:
            raise ValueError(f"features[{i}] has an empty spatial size {tuple(f.shape[-2:])}")
        scales.append(2.0 ** float(torch.tensor(approx).log2().round()))
    return scales


def _infer_scales_script(features: list[Tensor], image_sizes: ImageSizes) -> list[float]:
    if len(image_sizes) == 0:
        raise ValueError("image_sizes must list each image's (height, width)")
    max_h = image_sizes[0][0]
    for s in image_sizes:
        max_h = max(max_h, s[0])
    if max_h <= 0:
        raise ValueError("image_sizes must be positive")
    scales: list[float] = []
    for i, f in enumerate(features):
        if f.dim() != 4:
            raise ValueError(f"features[{i}] must be Tensor[N, C, H, W]")
        approx = float(f.shape[-2]) / float(max_h)
        if approx <= 0:
            raise ValueError(f"features[{i}] has an empty spatial size {f.shape[-2:]}")
        scales.append(2.0 ** float(torch.tensor(approx).log2().round()))
    return scales


def _check_levels(scales: list[float]) -> None:
    """The levels' scales are consecutive powers of 1/2, finest first (as the kernel assumes)."""
    levels: list[int] = []
    for s in scales:
        if torch.jit.is_scripting():  # no math.log2 in TorchScript; exact for powers of 2
            levels.append(-int(torch.tensor(s, dtype=torch.float64).log2().round().item()))
        else:
            levels.append(-round(math.log2(s)))
    if levels != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(
            "features must be FPN levels whose scales are consecutive powers of 1/2, finest first: "
            f"their heights over the largest of image_sizes give scales {scales}"
        )


def multiscale_roi_align(
    features: list[Tensor],
    boxes: BoxesLike,
    image_sizes: ImageSizes,
    output_size: SizeLike,
    sampling_ratio: int = -1,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    pool_mode: str = "avg",
) -> Tensor:
    """Multi-scale (FPN) RoIAlign, as torchvision's ``MultiScaleRoIAlign``, in one launch.

    Each box goes to level ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)``,
    clamped to the levels given, and is pooled there with RoIAlign.

    Args:
        features: FPN maps ``Tensor[N, C, H_l, W_l]``, finest first (P2, P3, ...).
        boxes: ``Tensor[K, 5]`` or ``list[Tensor[L_i, 4]]`` in image pixels.
        image_sizes: ``(height, width)`` of each image; the level scales are inferred from
            them as torchvision does (``2 ** round(log2(map height / image height))``).

    Returns:
        ``Tensor[K, C, PH, PW]`` in the order of the boxes.
    """
    if torch.jit.is_scripting():
        _check_pool_mode_script(pool_mode)
        ph, pw = _pair_script(output_size)
        if len(features) == 0:
            raise ValueError("features must hold at least one map")
        scales = _infer_scales_script(features, image_sizes)
        _check_levels(scales)
        rois = _rois_script(boxes, "boxes", 4)
        ratio, canonical = sampling_ratio, (canonical_scale, canonical_level)
    else:
        _check_pool_mode(pool_mode)
        ph, pw = _pair(output_size)
        features = list(features)
        if not features:
            raise ValueError("features must hold at least one map")
        scales = infer_scales(features, image_sizes)
        _check_levels(scales)
        rois = convert_boxes_to_rois(boxes)
        ratio = _int("sampling_ratio", sampling_ratio)
        canonical = (_int("canonical_scale", canonical_scale), _int("canonical_level", canonical_level))
    return _ops.multiscale_roi_align(
        features, rois, scales, ph, pw, ratio, bool(aligned), pool_mode, canonical[0], canonical[1]
    )


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile and opcheck.
# ---------------------------------------------------------------------------------------------


def _empty_like_output(ref: Tensor, k: int, c, ph, pw) -> Tensor:
    return ref.new_empty((k, c, ph, pw))


def _check_rois_fake(rois: Tensor, ref: Tensor, cols: int, name: str = "boxes") -> None:
    """The kernels' checks that a fake can make: the shape and the device of the boxes."""
    torch._check(rois.dim() == 2 and rois.size(1) == cols, lambda: f"{name} must be Tensor[K, {cols}]")
    torch._check(
        rois.device == ref.device,
        lambda: f"{name} must be on the same device as input: {rois.device} vs {ref.device}",
    )


def _check_maps_fake(maps, name: str) -> None:
    for i, m in enumerate(maps[1:], 1):
        torch._check(m.device == maps[0].device, lambda: f"{name}[{i}] must be on the device of the first map")
        torch._check(m.dtype == maps[0].dtype, lambda: f"{name}[{i}] must have the dtype of the first map")


def _ragged_fake(features) -> Tensor:
    """The ragged ops' checks of their list of maps; returns the first map."""
    torch._check(len(features) > 0, lambda: "input must hold at least one map")
    _check_maps_fake(features, "input")
    return features[0]


@torch.library.register_fake("roi_kernels::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode):
    torch._check(input.dim() == 4, lambda: "input must be Tensor[N, C, H, W]")
    _check_rois_fake(rois, input, 5)
    return _empty_like_output(input, rois.size(0), input.size(1), pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::roi_align_ragged")
def _roi_align_ragged_fake(
    features, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, pool_mode
):
    first = _ragged_fake(features)
    _check_rois_fake(rois, first, 5)
    return _empty_like_output(first, rois.size(0), first.size(0), pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::multiscale_roi_align")
def _multiscale_fake(
    features,
    rois,
    spatial_scales,
    pooled_height,
    pooled_width,
    sampling_ratio,
    aligned,
    pool_mode,
    canonical_scale,
    canonical_level,
):
    torch._check(len(features) > 0, lambda: "features must hold at least one map")
    _check_maps_fake(features, "features")
    _check_rois_fake(rois, features[0], 5)
    return _empty_like_output(features[0], rois.size(0), features[0].size(1), pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::multiscale_roi_align_ragged")
def _multiscale_ragged_fake(
    features,
    rois,
    spatial_scales,
    pooled_height,
    pooled_width,
    sampling_ratio,
    aligned,
    pool_mode,
    canonical_scale,
    canonical_level,
):
    torch._check(len(spatial_scales) > 0, lambda: "spatial_scales must give the scale of at least one level")
    torch._check(
        len(features) > 0 and len(features) % len(spatial_scales) == 0,
        lambda: "features must hold one Tensor[C, H, W] per level and image (L * N maps)",
    )
    _check_maps_fake(features, "features")
    _check_rois_fake(rois, features[0], 5)
    return _empty_like_output(features[0], rois.size(0), features[0].size(0), pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::roi_pool")
def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    torch._check(input.dim() == 4, lambda: "input must be Tensor[N, C, H, W]")
    _check_rois_fake(rois, input, 5)
    return _empty_like_output(input, rois.size(0), input.size(1), pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::roi_pool_ragged")
def _roi_pool_ragged_fake(features, rois, spatial_scale, pooled_height, pooled_width):
    first = _ragged_fake(features)
    _check_rois_fake(rois, first, 5)
    return _empty_like_output(first, rois.size(0), first.size(0), pooled_height, pooled_width)


def _ps_fake(ref, channels, rois, pooled_height, pooled_width):
    _check_rois_fake(rois, ref, 5)
    bins = pooled_height * pooled_width
    torch._check(
        channels % bins == 0,
        lambda: "input channels must be a multiple of output_size[0] * output_size[1]",
    )
    return _empty_like_output(ref, rois.size(0), channels // bins, pooled_height, pooled_width)


def _ps_single_fake(input, rois, pooled_height, pooled_width):
    torch._check(input.dim() == 4, lambda: "input must be Tensor[N, C, H, W]")
    return _ps_fake(input, input.size(1), rois, pooled_height, pooled_width)


def _ps_ragged_fake(features, rois, pooled_height, pooled_width):
    first = _ragged_fake(features)
    return _ps_fake(first, first.size(0), rois, pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::ps_roi_align")
def _ps_roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    return _ps_single_fake(input, rois, pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::ps_roi_align_ragged")
def _ps_roi_align_ragged_fake(features, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    return _ps_ragged_fake(features, rois, pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::ps_roi_pool")
def _ps_roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    return _ps_single_fake(input, rois, pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::ps_roi_pool_ragged")
def _ps_roi_pool_ragged_fake(features, rois, spatial_scale, pooled_height, pooled_width):
    return _ps_ragged_fake(features, rois, pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::roi_align_rotated")
def _roi_align_rotated_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    torch._check(input.dim() == 4, lambda: "input must be Tensor[N, C, H, W]")
    _check_rois_fake(rois, input, 6, "rois")
    return _empty_like_output(input, rois.size(0), input.size(1), pooled_height, pooled_width)


@torch.library.register_fake("roi_kernels::roi_align_rotated_ragged")
def _roi_align_rotated_ragged_fake(features, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    first = _ragged_fake(features)
    _check_rois_fake(rois, first, 6, "rois")
    return _empty_like_output(first, rois.size(0), first.size(0), pooled_height, pooled_width)
