"""Bad input to every op: an error that names the argument (docs/SEMANTICS.md, "Bad input"),
one test per op and case, through the Python API and, where the Python layer does not check
first, through ``torch.ops.roi_kernels`` directly.

The cases of docs/SEMANTICS.md: an image index outside [0, N), a box tensor of the wrong shape, a
non-positive output size, a non-positive spatial_scale, a dtype or device mismatch; and the
arguments each op adds (sampling_ratio, pool_mode, the ps channel count, FPN levels, ...).
"""

from __future__ import annotations

import re

import pytest
import torch

import roi_kernels

NAN, INF = float("nan"), float("inf")

X = torch.randn(2, 18, 8, 8)  # 18 = 2 * 3 * 3: also a ps input for output_size 3
BOX = torch.tensor([[0.0, 0, 0, 4, 4]])
ROT = torch.tensor([[0.0, 4, 4, 2, 2, 30]])
MAPS = [torch.randn(18, 8, 8), torch.randn(18, 6, 9)]
FPN = [torch.randn(2, 18, 16, 16), torch.randn(2, 18, 8, 8)]
SIZES = [(64, 64), (64, 64)]


def call(op: str, **changes):
    """op through the Python API with good arguments, except for ``changes``."""
    if op == "roi_align_rotated":
        a = dict(input=X, rois=ROT, output_size=3, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        a.update(changes)
        return roi_kernels.roi_align_rotated(**a)
    a = dict(input=X, boxes=BOX, output_size=3, spatial_scale=1.0)
    if op == "roi_align_ragged":
        a["input"] = MAPS
    if op == "multiscale_roi_align":
        a = dict(features=FPN, boxes=BOX, image_sizes=SIZES, output_size=3)
    a.update(changes)
    fn = {"roi_align_ragged": roi_kernels.roi_align}.get(op) or getattr(roi_kernels, op)
    return fn(**a)


ALL = ["roi_align", "roi_align_ragged", "multiscale_roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated"]
SAMPLED = ["roi_align", "roi_align_ragged", "multiscale_roi_align", "ps_roi_align", "roi_align_rotated"]
SCALED = [op for op in ALL if op != "multiscale_roi_align"]
POOL_MODE = ["roi_align", "roi_align_ragged", "multiscale_roi_align"]


def boxes_arg(op: str) -> str:
    return "rois" if op == "roi_align_rotated" else "boxes"


def box_with_index(op: str, index: float):
    b = (ROT if op == "roi_align_rotated" else BOX).clone()
    b[0, 0] = index
    return b


def raises(exc, pattern: str):
    return pytest.raises(exc, match=pattern)


# ---------------------------------------------------------------------------------------------
# The cases of docs/SEMANTICS.md, for every op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [2.0, -1.0, 2.5, NAN, INF, -INF])
@pytest.mark.parametrize("op", ALL)
def test_image_index_outside_the_batch(op, index):
    name = boxes_arg(op)
    with raises(RuntimeError, rf"{name}\[:, 0\] \(the image index\) must be in \[0, 2\)"):
        call(op, **{name: box_with_index(op, index)})


@pytest.mark.parametrize("op", ALL)
def test_box_tensor_of_the_wrong_shape(op):
    name = boxes_arg(op)
    cols = 6 if op == "roi_align_rotated" else 5
    for bad in (torch.zeros(3, cols - 1), torch.zeros(3, cols + 1), torch.zeros(cols), torch.zeros(1, 3, cols)):
        with raises(RuntimeError, rf"{name} must be Tensor\[K, {cols}\]"):
            call(op, **{name: bad})


@pytest.mark.parametrize("op", ALL)
def test_box_list_of_the_wrong_shape(op):
    name = boxes_arg(op)
    cols = 5 if op == "roi_align_rotated" else 4
    with raises(ValueError, rf"{name}\[1\] must be Tensor\[L, {cols}\]"):
        call(op, **{name: [torch.zeros(1, cols), torch.zeros(2, cols + 1)]})
    with raises(ValueError, rf"{name}\[0\] must be Tensor\[L, {cols}\]"):
        call(op, **{name: [torch.zeros(cols)]})
    with raises(ValueError, rf"{name} is an empty list"):
        call(op, **{name: []})
    with raises(ValueError, rf"{name}\[1\] must have the dtype and device of {name}\[0\]"):
        call(op, **{name: [torch.zeros(1, cols), torch.zeros(1, cols, dtype=torch.float64)]})
    with raises(TypeError, rf"{name} must be Tensor\[K, {cols + 1}\] or a list of Tensor\[L, {cols}\]"):
        call(op, **{name: (BOX if cols == 4 else ROT).numpy()})


@pytest.mark.parametrize("size", [0, -1, (0, 3), (3, -2)])
@pytest.mark.parametrize("op", ALL)
def test_non_positive_output_size(op, size):
    with raises(ValueError, r"output_size must be positive"):
        call(op, output_size=size)


@pytest.mark.parametrize("size", [(1, 2, 3), (), 2.5, "7", None])
@pytest.mark.parametrize("op", ALL)
def test_output_size_that_is_not_a_size(op, size):
    with raises((ValueError, TypeError), r"output_size must be"):
        call(op, output_size=size)


@pytest.mark.parametrize("scale", [0.0, -0.0625, NAN, INF])
@pytest.mark.parametrize("op", SCALED)
def test_non_positive_or_non_finite_spatial_scale(op, scale):
    with raises(RuntimeError, r"spatial_scale must be a positive finite number"):
        call(op, spatial_scale=scale)


@pytest.mark.parametrize("op", SCALED)
def test_spatial_scale_that_is_not_a_number(op):
    with raises(TypeError, r"spatial_scale must be a number"):
        call(op, spatial_scale="1/16")


@pytest.mark.parametrize("op", ALL)
def test_boxes_that_are_not_floating_point(op):
    name = boxes_arg(op)
    for dtype in (torch.int64, torch.int32, torch.bool, torch.complex64):
        with raises(RuntimeError, rf"{name} must be a floating-point tensor"):
            call(op, **{name: (ROT if op == "roi_align_rotated" else BOX).to(dtype)})


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("op", ALL)
def test_input_of_an_unsupported_dtype(op, dtype):
    if op == "roi_align_ragged":
        change, name = dict(input=[m.to(dtype) for m in MAPS]), r"input\[0\]"
    elif op == "multiscale_roi_align":
        change, name = dict(features=[m.to(dtype) for m in FPN]), r"features\[0\]"
    else:
        change, name = dict(input=X.to(dtype)), "input"
    with raises(RuntimeError, rf"{name} must be float32, float16, bfloat16 or float64"):
        call(op, **change)


def test_maps_of_different_dtypes():
    with raises(RuntimeError, r"input\[1\] must have the dtype of the first map"):
        call("roi_align_ragged", input=[MAPS[0], MAPS[1].double()])
    with raises(RuntimeError, r"features\[1\] must have the dtype of the first map"):
        call("multiscale_roi_align", features=[FPN[0], FPN[1].half()])


@pytest.mark.parametrize("op", ALL)
def test_boxes_on_another_device(op):
    """Without a GPU, the meta device stands in for another device (tests/test_cuda_build.py
    checks CUDA against the CPU)."""
    name = boxes_arg(op)
    b = (ROT if op == "roi_align_rotated" else BOX).to("meta")
    with raises(RuntimeError, rf"{name} must be on the same device as input"):
        call(op, **{name: b})


def test_maps_on_different_devices():
    with raises(RuntimeError, r"input\[1\] must be on the device of the first map"):
        call("roi_align_ragged", input=[MAPS[0], MAPS[1].to("meta")], boxes=BOX.to("meta"))
    with raises(RuntimeError, r"features\[1\] must be on the device of the first map"):
        call("multiscale_roi_align", features=[FPN[0], FPN[1].to("meta")], boxes=BOX.to("meta"))


@pytest.mark.parametrize("op", ["roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated"])
def test_input_of_the_wrong_rank(op):
    for bad in (X[0], X[None], torch.tensor(1.0)):
        with raises(RuntimeError, r"input must be a 4-D tensor \(Tensor\[N, C, H, W\]\)"):
            call(op, input=bad)


# ---------------------------------------------------------------------------------------------
# The arguments particular to some ops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", SAMPLED)
def test_sampling_ratio_too_large(op):
    with raises(RuntimeError, r"sampling_ratio must be <= 1024"):
        call(op, sampling_ratio=1025)
    assert call(op, sampling_ratio=-7).shape[0] == 1, "any ratio <= 0 means adaptive sampling"


@pytest.mark.parametrize("op", SAMPLED)
def test_sampling_ratio_that_is_not_an_integer(op):
    with raises(ValueError, r"sampling_ratio must be an integer"):
        call(op, sampling_ratio=1.5)
    with raises(TypeError, r"sampling_ratio must be an integer"):
        call(op, sampling_ratio="2")


@pytest.mark.parametrize("op", POOL_MODE)
def test_pool_mode(op):
    with raises(ValueError, r'pool_mode must be "avg" or "max"'):
        call(op, pool_mode="sum")


@pytest.mark.parametrize("op", ["ps_roi_align", "ps_roi_pool"])
def test_ps_channels_not_a_multiple_of_the_bins(op):
    with raises(RuntimeError, r"input has 18 channels, which is not a multiple of output_size\[0\] \* output_size\[1\] = 2 \* 2"):
        call(op, output_size=2)


def test_ragged_maps():
    with raises(RuntimeError, r"input must hold at least one Tensor\[C, H, W\]"):
        call("roi_align_ragged", input=[])
    with raises(RuntimeError, r"input\[1\] must have the channels of input\[0\] \(18\), got 5"):
        call("roi_align_ragged", input=[MAPS[0], torch.randn(5, 4, 4)])
    with raises(RuntimeError, r"input\[1\] must be a 3-D tensor"):
        call("roi_align_ragged", input=[MAPS[0], X])
    with raises(TypeError, r"input must be Tensor\[N, C, H, W\] or a list of Tensor\[C, H, W\]"):
        call("roi_align", input=X.numpy())


def test_multiscale_arguments():
    with raises(ValueError, r"features must hold at least one map"):
        call("multiscale_roi_align", features=[])
    with raises(ValueError, r"image_sizes must list each image's \(height, width\)"):
        call("multiscale_roi_align", image_sizes=[])
    with raises(ValueError, r"image_sizes must be positive"):
        call("multiscale_roi_align", image_sizes=[(0, 64)])
    with raises(ValueError, r"features\[1\] must be Tensor\[N, C, H, W\]"):
        call("multiscale_roi_align", features=[FPN[0], FPN[1][0]])
    with raises(RuntimeError, r"features\[1\] must have the batch size and channels of features\[0\]"):
        call("multiscale_roi_align", features=[FPN[0], FPN[1][:, :4]])
    with raises(RuntimeError, r"canonical_scale must be positive"):
        call("multiscale_roi_align", canonical_scale=0)
    with raises(ValueError, r"canonical_level must be an integer"):
        call("multiscale_roi_align", canonical_level=4.5)
    with raises(ValueError, r"features must be FPN levels whose scales are consecutive powers of 1/2"):
        call("multiscale_roi_align", features=[FPN[0], FPN[1][:, :, :4, :4]])
    with raises(ValueError, r"features must be FPN levels whose scales are consecutive powers of 1/2"):
        call("multiscale_roi_align", features=[FPN[1], FPN[0]])
    with raises(ValueError, r"features\[1\] has an empty spatial size"):
        call("multiscale_roi_align", features=[FPN[0], FPN[1][:, :, :0]])


def test_multiscale_scales_at_the_op_level():
    ms = torch.ops.roi_kernels.multiscale_roi_align
    with raises(RuntimeError, r"spatial_scales must give one scale per feature map: 2 maps, 1 scales"):
        ms(FPN, BOX, [0.25], 2, 2, 2, False, "avg", 224, 4)
    with raises(RuntimeError, r"spatial_scales must be consecutive powers of 1/2, finest first"):
        ms(FPN, BOX, [0.25, 0.0625], 2, 2, 2, False, "avg", 224, 4)
    with raises(RuntimeError, r"spatial_scales\[1\] must be a positive finite number"):
        ms(FPN, BOX, [0.25, NAN], 2, 2, 2, False, "avg", 224, 4)


# ---------------------------------------------------------------------------------------------
# torch.ops.roi_kernels: the kernels check for themselves what the Python layer checks first
# ---------------------------------------------------------------------------------------------

OPS = torch.ops.roi_kernels
DIRECT = {
    "roi_align": lambda ph, pw, s=1.0, mode="avg": OPS.roi_align(X, BOX, s, ph, pw, 2, False, mode),
    "roi_align_ragged": lambda ph, pw, s=1.0, mode="avg": OPS.roi_align_ragged(MAPS, BOX, s, ph, pw, 2, False, mode),
    "multiscale_roi_align": lambda ph, pw, s=1.0, mode="avg": OPS.multiscale_roi_align(
        FPN, BOX, [0.25 * s, 0.125], ph, pw, 2, False, mode, 224, 4
    ),
    "roi_pool": lambda ph, pw, s=1.0: OPS.roi_pool(X, BOX, s, ph, pw),
    "ps_roi_align": lambda ph, pw, s=1.0: OPS.ps_roi_align(X, BOX, s, ph, pw, 2),
    "ps_roi_pool": lambda ph, pw, s=1.0: OPS.ps_roi_pool(X, BOX, s, ph, pw),
    "roi_align_rotated": lambda ph, pw, s=1.0: OPS.roi_align_rotated(X, ROT, s, ph, pw, 2, True),
}


@pytest.mark.parametrize("op", ALL)
def test_op_level_output_size(op):
    for ph, pw in [(0, 3), (3, -1), (-5, -5)]:
        with raises(RuntimeError, re.escape(f"output_size must be positive, got ({ph}, {pw})")):
            DIRECT[op](ph, pw)


@pytest.mark.parametrize("op", ALL)
def test_op_level_spatial_scale(op):
    name = "spatial_scales\\[0\\]" if op == "multiscale_roi_align" else "spatial_scale"
    for s in (0.0, -1.0, NAN):
        with raises(RuntimeError, rf"{name} must be a positive finite number"):
            DIRECT[op](3, 3, s)


@pytest.mark.parametrize("op", POOL_MODE)
def test_op_level_pool_mode(op):
    with raises(RuntimeError, r'pool_mode must be "avg" or "max", got "median"'):
        DIRECT[op](3, 3, 1.0, "median")
