"""Shared test helpers: fresh random seeds (printed on failure) and box generators."""

from __future__ import annotations

import math
import os
import random

import pytest

# Tests build the extension with CUDA only where a GPU is visible (or when told to): elsewhere
# tests/test_cuda_build.py compiles the CUDA sources in a folder of its own, and the session's
# build stays CPU-only, which compiles in half the time.
if "ROI_KERNELS_CUDA" not in os.environ:
    import torch

    os.environ["ROI_KERNELS_CUDA"] = "auto" if torch.cuda.is_available() else "0"


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test; its value is in the test's report (-rA) and in failures."""
    value = int(os.environ.get("ROI_TEST_SEED", random.SystemRandom().randrange(2**31)))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


def random_boxes(
    gen,
    num: int,
    image_h: float,
    image_w: float,
    num_images: int = 1,
    min_side: float = 16.0,
    max_side: float = 512.0,
    clip: bool = True,
    dtype=None,
):
    """Boxes as docs/WORKLOADS.md draws them: log-uniform side and aspect, uniform centre.

    Returns Tensor[num, 5] (image index, x1, y1, x2, y2) in image pixels.
    """
    import torch

    dtype = dtype or torch.float32
    u = lambda: torch.rand(num, generator=gen, dtype=torch.float64)  # noqa: E731
    s = torch.exp(math.log(min_side) + u() * (math.log(max_side) - math.log(min_side)))
    a = torch.exp(math.log(0.5) + u() * (math.log(2.0) - math.log(0.5)))
    w, h = s * a.sqrt(), s / a.sqrt()
    cx, cy = u() * image_w, u() * image_h
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if clip:
        x1, x2 = x1.clamp(0, image_w), x2.clamp(0, image_w)
        y1, y2 = y1.clamp(0, image_h), y2.clamp(0, image_h)
    idx = torch.randint(0, num_images, (num,), generator=gen).to(torch.float64)
    return torch.stack([idx, x1, y1, x2, y2], dim=1).to(dtype)


def edge_boxes(image_h: float, image_w: float, num_images: int = 1, dtype=None):
    """Boxes that break naive kernels: outside the map, zero-area, inverted, huge, sub-pixel."""
    import torch

    dtype = dtype or torch.float32
    rows = [
        (0, -50.0, -40.0, -10.0, -5.0),  # entirely outside (negative side)
        (0, image_w + 10, image_h + 10, image_w + 90, image_h + 70),  # outside (far side)
        (0, 10.0, 12.0, 10.0, 12.0),  # zero area
        (0, 30.0, 40.0, 30.0, 90.0),  # zero width
        (0, 60.0, 50.0, 20.0, 10.0),  # inverted
        (0, -1e5, -1e5, 1e5, 1e5),  # huge, covers everything
        (0, 0.0, 0.0, image_w, image_h),  # the whole image
        (0, 5.2, 7.9, 5.7, 8.1),  # sub-pixel
        (0, image_w - 1, image_h - 1, image_w + 1, image_h + 1),  # straddles the far corner
        (0, -3.0, -3.0, 2.0, 2.0),  # straddles the origin
    ]
    out = torch.tensor(rows, dtype=torch.float64)
    out[:, 0] = torch.arange(len(rows)) % num_images
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# Ragged batches: per-image maps, against the single-map ops
# ---------------------------------------------------------------------------------------------

RAGGED_DTYPES = ["float32", "float16", "bfloat16", "float64"]
RAGGED_LAYOUTS = ["contiguous", "channels_last", "strided"]


def in_layout(x, kind: str):
    """x ([N, C, H, W]) with the same values in another memory layout: contiguous,
    channels_last, or a strided view (every other column of a wider map)."""
    import torch

    if kind == "contiguous":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
    wide[..., 1::2] = x
    return wide[..., 1::2]


def ragged_maps(gen, sizes, channels: int, dtype, kind: str):
    """One map Tensor[C, H, W] per (H, W) of sizes, each in the layout `kind`."""
    import torch

    return [
        in_layout(torch.randn(1, channels, h, w, generator=gen, dtype=torch.float64).to(dtype), kind)[0]
        for h, w in sizes
    ]


def random_sizes(gen, n: int, lo: int, hi: int) -> list[tuple[int, int]]:
    import torch

    return [tuple(int(v) for v in torch.randint(lo, hi + 1, (2,), generator=gen)) for _ in range(n)]


def per_image(op, maps, rois, *args):
    """What a ragged op must give, bit for bit: the single-map op on each image alone (as
    Tensor[1, C, H, W], its boxes' image index 0), the results put back in the boxes' order.
    maps: one entry per image, each a list of its maps (the FPN levels) or one map."""
    import torch

    outs, order = [], []
    for i, m in enumerate(maps):
        sel = torch.nonzero(rois[:, 0].long() == i).flatten()
        r = rois[sel].clone()
        r[:, 0] = 0
        x = [level[None] for level in m] if isinstance(m, (list, tuple)) else m[None]
        outs.append(op(x, r, *args))
        order.append(sel)
    return torch.cat(outs)[torch.argsort(torch.cat(order))]


def assert_same_bits(got, want):
    """Equal bit for bit (NaN == NaN, -0.0 != 0.0), shape and dtype included."""
    import torch

    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)):
        return
    diff = (got.double() - want.double()).abs().nan_to_num(float("inf"))
    where = torch.nonzero(diff > 0)
    raise AssertionError(
        f"{len(where)} of {want.numel()} outputs differ; first at {tuple(where[0].tolist())}: "
        f"{got[tuple(where[0])].item()!r} vs {want[tuple(where[0])].item()!r}"
    )
