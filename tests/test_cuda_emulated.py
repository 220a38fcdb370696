"""The CUDA kernels, executed on the CPU: every op's CUDA kernel (cuda/*.cu, compiled by the host
compiler against emulator/executor.h) run with the grid and block its real launch uses, on CPU
tensors, bit for bit equal to our CPU kernels.

Both builds disable fused multiply-adds and the shared math calls its transcendental functions
precision-explicitly (roi_math.h, section 0), so any difference is a defect in what the CUDA
kernels add on top of the shared math: which thread computes what, which shared-memory entry
holds what and when a block may read it, how a job maps to a box and a channel chunk, how the
output is staged and written. What the executor cannot show (speed, coalescing, concurrency
between blocks, the device's own math library) is listed in benchmarks/RESULTS.md.

``pytest -m cuda_emulated`` runs these alone; the first run builds the test-only library
(about a minute) into ``ROI_KERNELS_BUILD_DIR`` or the cache folder, like the main build.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import edge_boxes, random_boxes

import roi_kernels  # noqa: F401  (loads the real ops: our CPU kernels are the reference)
from roi_kernels import _build

pytestmark = pytest.mark.cuda_emulated

CPU = torch.ops.roi_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "strided"]
THREADS = 256  # cuda::kThreads: the block of every launch


@pytest.fixture(scope="module")
def emu():
    _build.load_emulated()
    return torch.ops.roi_kernels_emulated


@pytest.fixture
def grid_cap(emu):
    """Caps the grid of the launches in a test (restored afterwards)."""
    previous = emu.set_max_blocks(0)
    yield emu.set_max_blocks
    emu.set_max_blocks(previous)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bitwise (NaN == NaN, -0.0 != 0.0)."""
    return t.contiguous().view(torch.uint8)


def assert_same_bits(emulated: torch.Tensor, cpu: torch.Tensor):
    assert emulated.shape == cpu.shape and emulated.dtype == cpu.dtype
    assert emulated.is_contiguous()
    if torch.equal(bits(emulated), bits(cpu)):
        return
    diff = (emulated.double() - cpu.double()).abs()
    where = torch.nonzero(diff.nan_to_num(float("inf")) > 0)
    raise AssertionError(
        f"the emulated CUDA kernel differs from the CPU kernel in {len(where)} of {cpu.numel()} "
        f"outputs; first at {tuple(where[0].tolist())}: CUDA {emulated[tuple(where[0])].item()!r} "
        f"vs CPU {cpu[tuple(where[0])].item()!r}; max abs difference {diff.nan_to_num(float('inf')).max().item()}"
    )


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout: channels_last, or a strided view (every
    other column of a wider map, and the channels reversed: negative strides are refused by
    torch, so a flipped copy sliced instead)."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
    wide[..., 1::2] = x
    view = wide[..., 1::2]
    assert not view.is_contiguous() and view.stride(-1) == 2
    return view


def feature_map(gen, n, c, h, w, dtype, kind="contiguous"):
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    return layout(x, kind)


def align_boxes(gen, k, h, w, n, scale, dtype):
    """Random boxes over the image, the edge boxes of conftest, and NaN / infinite ones."""
    boxes = random_boxes(gen, k, h / scale, w / scale, num_images=n, min_side=2, dtype=torch.float64)
    edges = edge_boxes(h / scale, w / scale, num_images=n, dtype=torch.float64)
    bad = torch.tensor(
        [
            [0, math.nan, 1.0, 5.0, 6.0],
            [0, 1.0, 2.0, math.inf, 7.0],
            [0, -math.inf, -math.inf, math.inf, math.inf],
            [0, 3.0, math.nan, math.nan, 9.0],
        ],
        dtype=torch.float64,
    )
    bad[:, 0] = torch.arange(len(bad)) % n
    return torch.cat([boxes, edges, bad]).to(dtype)


def box_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# roi_align: single map, avg and max
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 5])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align(emu, seed, dtype, kind, aligned, sampling_ratio, mode):
    gen = torch.Generator().manual_seed(seed)
    # 40 channels: two channels_last chunks of 32 lanes, the second one part-full; 9x8 bins:
    # two passes of the 64-bin output staging.
    c = 40 if kind == "channels_last" else int(torch.randint(3, 41, (1,), generator=gen))
    x = feature_map(gen, 2, c, 13, 17, dtype, kind)
    rois = align_boxes(gen, 9, 13, 17, 2, 1 / 4, box_dtype(dtype))
    ph, pw = (9, 8) if sampling_ratio != 5 else (3, 2)
    args = (rois, 1 / 4, ph, pw, sampling_ratio, aligned, mode)
    assert_same_bits(emu.roi_align(x, *args), CPU.roi_align(x, *args))


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_roi_align_computed_taps(emu, seed, mode, kind):
    """Huge boxes with adaptive sampling: their tap tables do not fit in shared memory, and the
    kernel computes each sample's taps in the thread (per box: the block mixes both paths
    over its jobs)."""
    gen = torch.Generator().manual_seed(seed)
    x = feature_map(gen, 1, 33, 11, 14, torch.float32, kind)
    huge = torch.tensor([[0, -900.0, -700.0, 1000.0, 800.0], [0, -2000.0, 3.0, 2000.0, 9.0]])
    small = random_boxes(gen, 3, 11, 14, min_side=1)
    rois = torch.cat([huge[:1], small[:2], huge[1:], small[2:]])
    args = (rois, 1.0, 7, 7, 0, False, mode)
    assert_same_bits(emu.roi_align(x, *args), CPU.roi_align(x, *args))


@pytest.mark.parametrize("op", ["roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated"])
def test_grid_stride_loops_wrap(emu, seed, grid_cap, op):
    """More jobs than blocks: with the grid capped at 3 blocks, every block's grid-stride loop
    takes several rounds, and the result is still the CPU's."""
    gen = torch.Generator().manual_seed(seed)
    c = 18 if op.startswith("ps_") else 37
    x = feature_map(gen, 2, c, 12, 15, torch.float32)
    rois = random_boxes(gen, 60, 48, 60, num_images=2, min_side=2)
    if op == "roi_align_rotated":
        rois = rotated_boxes(gen, 20, 12 * 4, 15 * 4, 2, torch.float32)
    args = {
        "roi_align": (rois, 0.25, 3, 3, 2, True, "avg"),
        "roi_pool": (rois, 0.25, 3, 3),
        "ps_roi_align": (rois, 0.25, 3, 3, 2),
        "ps_roi_pool": (rois, 0.25, 3, 3),
        "roi_align_rotated": (rois, 0.25, 3, 3, 2, True),
    }[op]
    expected = getattr(CPU, op)(x, *args)
    uncapped = getattr(emu, op)(x, *args)
    launch = emu.last_launch()
    requested = launch[1]
    assert launch[4] == requested, "without a cap the executor runs the grid the launch asked for"
    assert launch[7:10] == [THREADS, 1, 1]
    grid_cap(3)
    capped = getattr(emu, op)(x, *args)
    launch = emu.last_launch()
    assert launch[1] == requested and launch[4] == 3 and requested > 3, launch
    assert_same_bits(uncapped, expected)
    assert_same_bits(capped, expected)


def test_launch_uses_the_real_launch_shape(emu, seed):
    """roi_align's grid is (boxes x channel chunks) blocks of 256 threads, as the GPU launch."""
    gen = torch.Generator().manual_seed(seed)
    x = feature_map(gen, 1, 70, 9, 9, torch.float32, "channels_last")
    rois = random_boxes(gen, 5, 9, 9, min_side=1)
    emu.roi_align(x, rois, 1.0, 2, 2, 1, False, "avg")
    assert emu.last_launch()[1:] == [5 * 3, 1, 1, 5 * 3, 1, 1, THREADS, 1, 1]  # 70 channels: 3 chunks of 32
    x = x.contiguous()
    emu.roi_align(x, rois, 1.0, 2, 2, 1, False, "avg")
    assert emu.last_launch()[1] == 5  # NCHW: min(70, 2048 / 4) channels in one chunk


# ---------------------------------------------------------------------------------------------
# roi_align: ragged batches and FPN levels, through the device table beyond kInlineMaps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_maps", [3, 8, 11])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_roi_align_ragged(emu, seed, dtype, num_maps, mode, kind):
    """11 images: more maps than the kernel's inline table (8) holds, so the descriptors go
    through the device buffer."""
    gen = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(num_maps):
        h, w = (int(v) for v in torch.randint(1, 16, (2,), generator=gen))
        maps.append(feature_map(gen, 1, 35, h, w, dtype, kind)[0])
    rois = align_boxes(gen, 2 * num_maps, 15, 15, num_maps, 0.5, box_dtype(dtype))
    args = (rois, 0.5, 4, 3, -1, True, mode)
    assert_same_bits(emu.roi_align_ragged(maps, *args), CPU.roi_align_ragged(maps, *args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("levels", [1, 4, 10])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_multiscale_roi_align(emu, seed, dtype, levels, sampling_ratio, kind):
    """FPN levels 2..(levels + 1); 10 levels use the device table. Boxes of every size, so that
    every level is chosen, and the edge boxes (inverted ones have no level and pool to 0)."""
    gen = torch.Generator().manual_seed(seed)
    size = 512
    feats = [feature_map(gen, 2, 6, math.ceil(size / 2**k), math.ceil(size / 2**k), dtype, kind) for k in range(2, 2 + levels)]
    scales = [2.0**-k for k in range(2, 2 + levels)]
    rois = torch.cat(
        [
            random_boxes(gen, 30, size, size, num_images=2, min_side=2, max_side=4000, clip=False, dtype=torch.float64),
            edge_boxes(size, size, num_images=2, dtype=torch.float64),
        ]
    ).to(box_dtype(dtype))
    args = (rois, scales, 5, 4, sampling_ratio, False, "avg", 224, 4)
    assert_same_bits(emu.multiscale_roi_align(feats, *args), CPU.multiscale_roi_align(feats, *args))


# ---------------------------------------------------------------------------------------------
# roi_pool, ps_roi_align, ps_roi_pool
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("output_size", [(7, 7), (9, 8), (300, 1)])
def test_roi_pool(emu, seed, dtype, kind, output_size):
    """(300, 1): more bin rows than the shared bin table holds (256): computed per thread."""
    gen = torch.Generator().manual_seed(seed)
    c = 40 if kind == "channels_last" else int(torch.randint(1, 41, (1,), generator=gen))
    x = feature_map(gen, 2, c, 14, 19, dtype, kind)
    rois = align_boxes(gen, 9, 14, 19, 2, 0.5, box_dtype(dtype))
    args = (rois, 0.5, *output_size)
    assert_same_bits(emu.roi_pool(x, *args), CPU.roi_pool(x, *args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("sampling_ratio", [0, 1, 6])
def test_ps_roi_align(emu, seed, dtype, kind, sampling_ratio):
    gen = torch.Generator().manual_seed(seed)
    ph, pw = 3, 2
    x = feature_map(gen, 2, 5 * ph * pw, 12, 16, dtype, kind)
    rois = align_boxes(gen, 8, 12, 16, 2, 0.5, box_dtype(dtype))
    args = (rois, 0.5, ph, pw, sampling_ratio)
    assert_same_bits(emu.ps_roi_align(x, *args), CPU.ps_roi_align(x, *args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("output_size", [(3, 3), (3, 2)])
def test_ps_roi_pool(emu, seed, dtype, kind, output_size):
    """(3, 2): a kernel that mixes up the output's height and width fails."""
    gen = torch.Generator().manual_seed(seed)
    ph, pw = output_size
    x = feature_map(gen, 2, 4 * ph * pw, 12, 16, dtype, kind)
    rois = align_boxes(gen, 8, 12, 16, 2, 0.5, box_dtype(dtype))
    args = (rois, 0.5, ph, pw)
    assert_same_bits(emu.ps_roi_pool(x, *args), CPU.ps_roi_pool(x, *args))


# ---------------------------------------------------------------------------------------------
# roi_align_rotated
# ---------------------------------------------------------------------------------------------


def rotated_boxes(gen, k, h, w, n, dtype):
    u = lambda: torch.rand(k, generator=gen, dtype=torch.float64)  # noqa: E731
    boxes = torch.stack(
        [
            torch.randint(0, n, (k,), generator=gen).double(),
            u() * w,
            u() * h,
            1 + u() * w,
            1 + u() * h,
            (u() - 0.5) * 720,
        ],
        dim=1,
    )
    edges = torch.tensor(
        [
            [0, -40.0, -30.0, 10.0, 8.0, 30.0],  # outside the map
            [0, w / 2, h / 2, 1e5, 1e5, 45.0],  # huge: covers everything
            [0, 5.0, 5.0, 0.0, 0.0, 10.0],  # empty
            [0, 5.0, 5.0, -4.0, 6.0, 0.0],  # negative width
            [0, 3.0, 4.0, 6.0, 6.0, math.nan],  # NaN angle
            [0, 3.0, 4.0, 6.0, 6.0, 90.0],
            [0, 3.0, 4.0, 6.0, 6.0, 1e9],
        ],
        dtype=torch.float64,
    )
    edges[:, 0] = torch.arange(len(edges)) % n
    return torch.cat([boxes, edges]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 4])
def test_roi_align_rotated(emu, seed, dtype, kind, aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(seed)
    x = feature_map(gen, 2, 7, 11, 13, dtype, kind)
    rois = rotated_boxes(gen, 8, 11 * 2, 13 * 2, 2, box_dtype(dtype))
    args = (rois, 0.5, 4, 3, sampling_ratio, aligned)
    assert_same_bits(emu.roi_align_rotated(x, *args), CPU.roi_align_rotated(x, *args))


# ---------------------------------------------------------------------------------------------
# Ragged batches of the one-map ops and FPN levels per image, through the image table beyond
# kInlineImages / kInlineMaps
# ---------------------------------------------------------------------------------------------


def ragged_case(gen, op, num_images, dtype, kind):
    """Per-image maps of random sizes (one of them empty), boxes over all of them, and the op's
    arguments after the boxes."""
    ph, pw = 3, 2
    c = 2 * ph * pw if op.startswith("ps_") else 35
    maps = []
    for i in range(num_images):
        h, w = (int(v) for v in torch.randint(2, 14, (2,), generator=gen))
        maps.append(torch.zeros(c, 0, w, dtype=dtype) if i == 1 else feature_map(gen, 1, c, h, w, dtype, kind)[0])
    if op == "roi_align_rotated":
        return maps, rotated_boxes(gen, 2 * num_images, 26, 26, num_images, box_dtype(dtype)), (0.5, ph, pw, -1, True)
    rois = align_boxes(gen, 2 * num_images, 13, 13, num_images, 0.5, box_dtype(dtype))
    extra = {"roi_pool": (), "ps_roi_align": (2,), "ps_roi_pool": ()}[op]
    return maps, rois, (0.5, ph, pw, *extra)


ONE_MAP_OPS = ["roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("op", ONE_MAP_OPS)
def test_one_map_ops_ragged(emu, seed, op, kind, dtype):
    """11 images: more than the kernels' inline image table (8) holds, so the descriptors go
    through the device buffer; 3 fit inline."""
    gen = torch.Generator().manual_seed(seed)
    for num_images in (3, 11):
        maps, rois, args = ragged_case(gen, op, num_images, dtype, kind)
        name = op + "_ragged"
        assert_same_bits(getattr(emu, name)(maps, rois, *args), getattr(CPU, name)(maps, rois, *args))


@pytest.mark.parametrize("op", ONE_MAP_OPS)
def test_one_map_ops_ragged_grid_wraps(emu, seed, grid_cap, op):
    gen = torch.Generator().manual_seed(seed)
    maps, rois, args = ragged_case(gen, op, 9, torch.float32, "contiguous")
    grid_cap(2)
    name = op + "_ragged"
    assert_same_bits(getattr(emu, name)(maps, rois, *args), getattr(CPU, name)(maps, rois, *args))
    assert_same_bits(getattr(emu, name)(maps, rois[:0], *args), getattr(CPU, name)(maps, rois[:0], *args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("levels", [1, 4])
def test_multiscale_roi_align_ragged(emu, seed, dtype, kind, levels):
    """FPN levels 2..(levels + 1) of 3 images of different sizes, level-major; 4 levels make 12
    maps, through the device table."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(128, 96), (70, 128), (33, 40)]
    maps = [
        feature_map(gen, 1, 6, math.ceil(h / 2**k), math.ceil(w / 2**k), dtype, kind)[0]
        for k in range(2, 2 + levels)
        for h, w in sizes
    ]
    scales = [2.0**-k for k in range(2, 2 + levels)]
    rois = torch.cat(
        [
            random_boxes(gen, 24, 128, 128, num_images=3, min_side=2, max_side=600, clip=False, dtype=torch.float64),
            edge_boxes(128, 128, num_images=3, dtype=torch.float64),
        ]
    ).to(box_dtype(dtype))
    for mode in ("avg", "max"):
        args = (rois, scales, 4, 3, 2, True, mode, 224, 4)
        assert_same_bits(emu.multiscale_roi_align_ragged(maps, *args), CPU.multiscale_roi_align_ragged(maps, *args))


# ---------------------------------------------------------------------------------------------
# Empty inputs
# ---------------------------------------------------------------------------------------------


def _empty_cases():
    boxes = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0], [0, -3.0, 2.0, 4.0, 9.0]])
    rot = torch.tensor([[0, 3.0, 3.0, 4.0, 2.0, 30.0]])
    none5, none6 = torch.zeros(0, 5), torch.zeros(0, 6)
    x = torch.randn(1, 8, 6, 7)
    for name, r, r0 in [
        ("roi_align", boxes, none5),
        ("roi_pool", boxes, none5),
        ("ps_roi_align", boxes, none5),
        ("ps_roi_pool", boxes, none5),
        ("roi_align_rotated", rot, none6),
    ]:
        extra = {
            "roi_align": (0.5, 2, 2, 0, False, "avg"),
            "roi_pool": (0.5, 2, 2),
            "ps_roi_align": (0.5, 2, 2, 0),
            "ps_roi_pool": (0.5, 2, 2),
            "roi_align_rotated": (0.5, 2, 2, 0, False),
        }[name]
        yield pytest.param(name, x, r0, extra, id=f"{name}-no-boxes")
        yield pytest.param(name, x[:, :0], r, extra, id=f"{name}-no-channels")
        yield pytest.param(name, x[:, :, :0], r, extra, id=f"{name}-no-rows")
        yield pytest.param(name, x[:, :, :, :0], r, extra, id=f"{name}-no-columns")


@pytest.mark.parametrize("name, x, rois, extra", list(_empty_cases()))
def test_empty_inputs(emu, name, x, rois, extra):
    expected = getattr(CPU, name)(x, rois, *extra)
    assert_same_bits(getattr(emu, name)(x, rois, *extra), expected)


def test_empty_ragged_and_levels(emu):
    maps = [torch.randn(4, 0, 5), torch.randn(4, 3, 3)]
    rois = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [1, 0.0, 0.0, 2.0, 2.0]])
    args = (rois, 1.0, 2, 2, 0, False, "avg")
    assert_same_bits(emu.roi_align_ragged(maps, *args), CPU.roi_align_ragged(maps, *args))
    feats = [torch.randn(1, 3, 0, 8), torch.randn(1, 3, 4, 4)]
    args = (rois[:1], [0.5, 0.25], 2, 2, 0, False, "max", 224, 4)
    assert_same_bits(emu.multiscale_roi_align(feats, *args), CPU.multiscale_roi_align(feats, *args))


def test_bad_arguments_name_the_argument_as_on_the_cpu(emu):
    """The entry points are the CUDA ones, so their checks are too."""
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match=r"boxes\[:, 0\] \(the image index\) must be in \[0, 1\)"):
        emu.roi_align(x, torch.tensor([[1.0, 0, 0, 2, 2]]), 1.0, 2, 2, 0, False, "avg")
    with pytest.raises(RuntimeError, match="pool_mode must be"):
        emu.roi_align(x, torch.tensor([[0.0, 0, 0, 2, 2]]), 1.0, 2, 2, 0, False, "median")
    with pytest.raises(RuntimeError, match="not a multiple of output_size"):
        emu.ps_roi_align(x, torch.tensor([[0.0, 0, 0, 2, 2]]), 1.0, 3, 3, 0)
