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
