"""The CUDA backward kernels (cuda/roi_backward.cu), executed on the CPU through our executor
(emulator/executor.h) with the grid and block of the real launch: the deterministic variant
(under ``torch.use_deterministic_algorithms(True)``) bit for bit equal to the CPU backward, the
atomic variant (the default) equal to it to rounding, for every backward op over dtypes,
layouts, avg and max, FPN levels and ragged batches, edge boxes and grids capped so that the
grid-stride loops wrap. ``pytest -m cuda_emulated`` runs these with the forward ones."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_bits, edge_boxes, in_layout, random_boxes

import roi_kernels  # noqa: F401  (the real ops: the CPU backward is the reference)
from roi_kernels import _build
from roi_kernels._autograd import channels_last

pytestmark = pytest.mark.cuda_emulated

CPU = torch.ops.roi_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "strided"]
ROUNDING = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}
H, W = 320, 400


@pytest.fixture(scope="module")
def emu():
    _build.load_emulated()
    return torch.ops.roi_kernels_emulated


@pytest.fixture
def deterministic():
    """Runs a test under torch.use_deterministic_algorithms(True) (restored afterwards)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def boxes(gen, n=20):
    e = edge_boxes(H, W, num_images=2)
    e[5, 1:] = e[5, 1:].clamp(-2000, 2000)
    return torch.cat([random_boxes(gen, n, H, W, num_images=2), e])


def rotated(b, gen):
    angle = torch.rand(len(b), 1, generator=gen) * 180 - 90
    return torch.cat([b[:, :1], (b[:, 1:3] + b[:, 3:5]) / 2, (b[:, 3:5] - b[:, 1:3]).abs(), angle], 1)


def cases(gen, dtype, lay):
    """(backward op name, args) for every backward op, from a forward sample."""
    x = in_layout(torch.randn(2, 18, 20, 25, generator=gen, dtype=torch.float64), lay).to(dtype)
    images = [in_layout(x[:1], lay)[0], in_layout(x[1:, :, :13, :9], lay)[0]]
    b = boxes(gen)
    r = rotated(b, gen)
    fpn = [
        in_layout(torch.randn(2, 6, 80 // 2**i, 100 // 2**i, generator=gen), lay).to(dtype) for i in range(3)
    ]
    fpn_scales = [0.25, 0.125, 0.0625]
    per_image = [level[i] for level in fpn for i in range(2)]

    def grad(k, c, ph, pw):
        return torch.randn(k, c, ph, pw, generator=gen).to(dtype)

    def sizes(maps):
        return [s for m in maps for s in m.shape], [channels_last(m) for m in maps]

    out = []
    for mode in ("avg", "max"):
        values = x if mode == "max" else None
        out.append(
            (
                "roi_align_backward",
                (
                    grad(len(b), 18, 3, 4),
                    b,
                    values,
                    list(x.shape),
                    channels_last(x),
                    1 / 16,
                    3,
                    4,
                    2,
                    True,
                    mode,
                ),
            )
        )
        s, lays = sizes(images)
        out.append(
            (
                "roi_align_ragged_backward",
                (
                    grad(len(b), 18, 3, 3),
                    b,
                    images if mode == "max" else [],
                    s,
                    lays,
                    1 / 16,
                    3,
                    3,
                    -1,
                    False,
                    mode,
                ),
            )
        )
        s, lays = sizes(fpn)
        out.append(
            (
                "multiscale_roi_align_backward",
                (
                    grad(len(b), 6, 3, 3),
                    b,
                    fpn if mode == "max" else [],
                    s,
                    lays,
                    fpn_scales,
                    3,
                    3,
                    2,
                    True,
                    mode,
                    224,
                    4,
                ),
            )
        )
        s, lays = sizes(per_image)
        out.append(
            (
                "multiscale_roi_align_ragged_backward",
                (
                    grad(len(b), 6, 3, 3),
                    b,
                    per_image if mode == "max" else [],
                    s,
                    lays,
                    fpn_scales,
                    3,
                    3,
                    0,
                    False,
                    mode,
                    224,
                    4,
                ),
            )
        )
    out.append(("roi_pool_backward", (grad(len(b), 18, 3, 2), b, x, 1 / 16, 3, 2)))
    out.append(("roi_pool_ragged_backward", (grad(len(b), 18, 2, 3), b, images, 1 / 16, 2, 3)))
    s, lays = sizes(images)
    out.append(
        (
            "ps_roi_align_backward",
            (grad(len(b), 2, 3, 3), b, list(x.shape), channels_last(x), 1 / 16, 3, 3, 2),
        )
    )
    out.append(("ps_roi_align_ragged_backward", (grad(len(b), 3, 2, 3), b, s, lays, 1 / 16, 2, 3, -1)))
    out.append(
        ("ps_roi_pool_backward", (grad(len(b), 2, 3, 3), b, list(x.shape), channels_last(x), 1 / 16, 3, 3))
    )
    out.append(("ps_roi_pool_ragged_backward", (grad(len(b), 3, 3, 2), b, s, lays, 1 / 16, 3, 2)))
    out.append(
        (
            "roi_align_rotated_backward",
            (grad(len(r), 18, 3, 3), r, list(x.shape), channels_last(x), 1 / 16, 3, 3, 2, True),
        )
    )
    out.append(
        ("roi_align_rotated_ragged_backward", (grad(len(r), 18, 2, 2), r, s, lays, 1 / 16, 2, 2, 0, False))
    )
    return out


def as_list(t):
    return list(t) if isinstance(t, (list, tuple)) else [t]


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_variant_equals_cpu_bit_for_bit(emu, deterministic, seed, dtype, lay):
    gen = torch.Generator().manual_seed(seed)
    for name, args in cases(gen, dtype, lay):
        want = as_list(getattr(CPU, name)(*args))
        got = as_list(getattr(emu, name)(*args))
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            assert g.stride() == w.stride(), (name, g.stride(), w.stride())
            assert_same_bits(g, w)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_atomic_variant_equals_cpu_to_rounding(emu, seed, dtype, lay):
    assert not torch.are_deterministic_algorithms_enabled()
    gen = torch.Generator().manual_seed(seed)
    for name, args in cases(gen, dtype, lay):
        want = as_list(getattr(CPU, name)(*args))
        got = as_list(getattr(emu, name)(*args))
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.stride() == w.stride(), name
            torch.testing.assert_close(g.double(), w.double(), **ROUNDING[dtype], msg=name)


@pytest.mark.parametrize("variant", ["atomic", "deterministic"])
def test_grid_stride_loops_wrap(emu, seed, variant):
    """A grid capped at 3 blocks: the atomic kernel's threads each run many output elements
    (the deterministic one launches a block per 256 (plane, channel) pairs, here one)."""
    gen = torch.Generator().manual_seed(seed)
    previous_cap = emu.set_max_blocks(3)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(variant == "deterministic")
    try:
        for name, args in cases(gen, torch.float32, "contiguous"):
            want = as_list(getattr(CPU, name)(*args))
            got = as_list(getattr(emu, name)(*args))
            for g, w in zip(got, want):
                if variant == "deterministic":
                    assert_same_bits(g, w)
                else:
                    torch.testing.assert_close(g, w, **ROUNDING[torch.float32], msg=name)
        launch = emu.last_launch()  # [launches, requested grid x, y, z, executed grid x, y, z, ...]
        assert launch[4] == min(launch[1], 3)
    finally:
        emu.set_max_blocks(previous_cap)
        torch.use_deterministic_algorithms(previous)


def test_no_boxes_gives_zeros(emu, seed):
    gen = torch.Generator().manual_seed(seed)
    got = emu.roi_align_backward(
        torch.zeros(0, 4, 3, 3), torch.zeros(0, 5), None, [2, 4, 9, 7], False, 0.5, 3, 3, 2, True, "avg"
    )
    assert torch.equal(got, torch.zeros(2, 4, 9, 7))
    x = torch.randn(2, 4, 9, 7, generator=gen)
    got = emu.roi_pool_backward(torch.zeros(0, 4, 3, 3), torch.zeros(0, 5), x, 0.5, 3, 3)
    assert torch.equal(got, torch.zeros_like(x))
