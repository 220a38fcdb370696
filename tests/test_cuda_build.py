"""The CUDA kernels.

1. Wherever nvcc is (CI has it; no GPU is needed), the extension is compiled WITH the CUDA
   sources, in a subprocess and a build folder of its own, and must register a CUDA kernel for
   every op: a compile error in a .cu file fails this test.
2. On a GPU (``@pytest.mark.cuda``; skipped elsewhere, and when the session's build has no CUDA
   kernels, e.g. ``ROI_KERNELS_CUDA=0``), every op on CUDA equals the CPU kernels (which share
   every line of per-sample math with it, roi_math.h) and torchvision's CUDA kernels where
   torchvision has the op.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import edge_boxes, random_boxes
from torchvision.ops import MultiScaleRoIAlign

import roi_kernels
from roi_kernels import _build, build

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
OPS = {
    "roi_align",
    "roi_align_ragged",
    "multiscale_roi_align",
    "multiscale_roi_align_ragged",
    "roi_pool",
    "roi_pool_ragged",
    "ps_roi_align",
    "ps_roi_align_ragged",
    "ps_roi_pool",
    "ps_roi_pool_ragged",
    "roi_align_rotated",
    "roi_align_rotated_ragged",
}
OPS |= {f"{op}_backward" for op in OPS}  # each op's gradient (cuda/roi_backward.cu on CUDA)

# ---------------------------------------------------------------------------------------------
# 1. The CUDA sources compile
# ---------------------------------------------------------------------------------------------

TOOLKIT = _build.cuda_toolkit()
needs_nvcc = pytest.mark.skipif(
    TOOLKIT is None or torch.version.cuda is None,
    reason="no CUDA toolkit (set CUDA_HOME to a folder with bin/nvcc and include/cuda_runtime.h)"
    if TOOLKIT is None
    else "this torch is a CPU-only build: the CUDA sources cannot be compiled against it",
)


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    """`roi-kernels-build --clean` with the CUDA sources into a fresh folder (a few minutes)."""
    folder = tmp_path_factory.mktemp("roi-cuda-build")
    env = dict(os.environ, ROI_KERNELS_CUDA="1", ROI_KERNELS_BUILD_DIR=str(folder), CUDA_HOME=str(TOOLKIT))
    env["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "9.0"
    # ptxas reports each kernel's registers, shared memory and spills (read by the resource test).
    env["ROI_KERNELS_NVCC_FLAGS"] = "--resource-usage"
    env["ROI_KERNELS_VERBOSE"] = "1"
    proc = subprocess.run(
        [str(BIN / "roi-kernels-build"), "--clean"], env=env, capture_output=True, text=True, timeout=1800
    )
    return proc, folder


@needs_nvcc
@pytest.mark.timeout(1800)  # its fixture compiles every .cu file (the subprocess's own limit)
def test_cuda_sources_compile_and_register_every_op(cuda_build):
    proc, folder = cuda_build
    log = folder / "build.log"
    assert proc.returncode == 0, (
        f"the CUDA build failed:\n{proc.stderr[-4000:]}\n{log.read_text()[-8000:] if log.exists() else ''}"
    )
    # A fresh folder: --clean has nothing to remove, and the compile is timed honestly.
    assert "removing" not in proc.stdout
    m = re.search(r"compiled roi_kernels \(CPU \+ CUDA\) into (\S+) in ([0-9.]+) s", proc.stdout)
    assert m, proc.stdout
    assert Path(m[1]) == folder
    assert float(m[2]) > 1.0, "compiling the CUDA sources takes more than a second"
    assert (folder / "roi_kernels_ext_cuda.so").exists()
    for device in ("CPU", "CUDA"):
        line = re.search(rf"^{device} kernels: (.*)$", proc.stdout, re.M)
        assert line, proc.stdout
        assert set(line[1].split(", ")) == OPS, f"{device} kernels: {line[1]}"


@needs_nvcc
def test_every_cuda_source_was_compiled(cuda_build):
    """Each .cu file went through nvcc (an object per source), for the architectures asked."""
    proc, folder = cuda_build
    assert proc.returncode == 0
    sources = sorted((Path(roi_kernels.__file__).parent / "csrc" / "cuda").glob("*.cu"))
    assert len(sources) >= 5
    for src in sources:
        assert (folder / f"{src.stem}.cuda.o").exists(), f"{src.name} was not compiled"
    ninja = (folder / "build.ninja").read_text()
    arch = (os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "9.0").split(";")[0].replace("+PTX", "")
    assert f"arch=compute_{arch.replace('.', '')}" in ninja
    assert "--fmad=false" in ninja, "the GPU must round the shared geometry as the CPU does"


# Every __global__ template instantiated by the .cu files: (kernel, instantiations).
KERNEL_INSTANTIATIONS = {
    "align::roi_align_kernel": 4 * 2 * 2,  # dtypes x (avg, max) x (NCHW, channels_last)
    # The one-map kernels: dtypes x (one map, ragged image table), and roi_pool's layouts.
    "pool::roi_pool_kernel": 4 * 2 * 2,
    "ps_align::ps_roi_align_kernel": 4 * 2,
    "ps_pool::ps_roi_pool_kernel": 4 * 2,
    "rotated::roi_align_rotated_kernel": 4 * 2,
    # The backward (roi_backward.cu): ops (roi_align avg / max, roi_pool, the ps ops, rotated)
    # x dtypes, for each of the atomic and the deterministic variant.
    "backward::backward_atomic_kernel": 6 * 4,
    "backward::backward_owned_kernel": 6 * 4,
}


@needs_nvcc
def test_no_kernel_spills_or_exceeds_48k_of_shared_memory(cuda_build):
    """ptxas's --resource-usage for every kernel instantiation (the CPU cannot show this):
    no spill stores or loads, and at most 48 KiB of static shared memory per block (the most
    a block may declare statically). The table with occupancies is in benchmarks/RESULTS.md
    (python scripts/cuda_resources.py)."""
    proc, _ = cuda_build
    assert proc.returncode == 0, proc.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("cuda_resources", ROOT / "scripts" / "cuda_resources.py")
    resources = importlib.util.module_from_spec(spec)
    sys.modules["cuda_resources"] = resources  # dataclasses look their module up there
    spec.loader.exec_module(resources)
    kernels = resources.parse(proc.stdout + proc.stderr)
    arch = (os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "9.0").split(";")
    for name, count in KERNEL_INSTANTIATIONS.items():
        found = [k for k in kernels if k.short.startswith(name + "<")]
        assert len(found) == count * len(arch), f"{name}: {len(found)} instantiations in ptxas's report"
    for k in kernels:
        assert k.spill_stores == 0 and k.spill_loads == 0, f"{k.short} ({k.arch}) spills: {k}"
        assert k.shared <= 48 * 1024, f"{k.short} ({k.arch}) uses {k.shared} bytes of static shared memory"
        assert 0 < k.registers <= 255, k


# ---------------------------------------------------------------------------------------------
# 2. On a GPU: CUDA equals the CPU kernels and torchvision's CUDA kernels
# ---------------------------------------------------------------------------------------------


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if set(build.registered_kernels("CUDA")) != OPS:
        return "the session's roi_kernels build has no CUDA kernels (run with ROI_KERNELS_CUDA=1 or auto)"
    return None


gpu = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=_cuda_skip_reason() or "")

F32 = dict(rtol=1e-6, atol=1e-6)  # CPU vs CUDA: the same arithmetic, no fused multiply-adds
TV32 = dict(rtol=1e-5, atol=1e-5)  # against torchvision's CUDA kernels
HALF = {torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
F64 = dict(rtol=1e-12, atol=1e-12)


def both(fn, x, boxes, *args, **kwargs):
    """fn on the CPU and on CUDA (same values); returns (cpu, cuda moved to the CPU)."""

    def to(v, device):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            return [t.to(device) for t in v]
        return v

    cpu = fn(x, boxes, *args, **kwargs)
    cuda = fn(to(x, "cuda"), to(boxes, "cuda"), *args, **kwargs)
    assert cuda.is_cuda and cuda.dtype == cpu.dtype and cuda.shape == cpu.shape
    assert cuda.is_contiguous()
    return cpu, cuda.cpu()


def nchw(gen, n, c, h, w, dtype=torch.float32, channels_last=False):
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def boxes_with_edges(gen, num, h, w, scale, num_images):
    b = random_boxes(gen, num, h / scale, w / scale, num_images=num_images, min_side=2)
    return torch.cat([b, edge_boxes(h / scale, w / scale, num_images=num_images)])


NON_FINITE = torch.tensor(
    [
        [0, float("nan"), 1, 5, 5],
        [0, 1, 1, float("inf"), 4],
        [0, -float("inf"), -float("inf"), float("inf"), float("inf")],
        [0, -1e30, -1e30, 1e30, 1e30],
    ]
)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2, 40])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_roi_align(seed, channels_last, aligned, sampling_ratio, pool_mode):
    gen = torch.Generator().manual_seed(seed)
    c = int(torch.randint(1, 80, (1,), generator=gen))
    x = nchw(gen, 2, c, 29, 37, channels_last=channels_last)
    # sampling_ratio 40: the box's taps do not fit the shared table (the per-thread path).
    boxes = torch.cat([boxes_with_edges(gen, 60, 29, 37, 1 / 16, 2), NON_FINITE])
    cpu, cuda = both(roi_kernels.roi_align, x, boxes, (7, 5), 1 / 16, sampling_ratio, aligned, pool_mode)
    torch.testing.assert_close(cuda, cpu, **F32)
    assert torch.isfinite(cuda).all()
    if pool_mode == "avg":
        # Finite boxes of sane size (torchvision samples all of a huge box); with aligned=True
        # and adaptive sampling torchvision raises on inverted boxes.
        keep = boxes[:, 1:].abs().amax(1) < 1e4
        if aligned and sampling_ratio <= 0:
            keep &= (boxes[:, 3] >= boxes[:, 1]) & (boxes[:, 4] >= boxes[:, 2])
        tv = torchvision.ops.roi_align(x.cuda(), boxes[keep].cuda(), (7, 5), 1 / 16, sampling_ratio, aligned)
        torch.testing.assert_close(cuda[keep], tv.cpu(), **TV32)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_dtypes(seed, dtype, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = nchw(gen, 2, 48, 25, 33, dtype=dtype, channels_last=channels_last)
    boxes = boxes_with_edges(gen, 50, 25, 33, 1 / 16, 2).to(dtype if dtype == torch.float64 else torch.float32)
    for mode in ("avg", "max"):
        cpu, cuda = both(roi_kernels.roi_align, x, boxes, 7, 1 / 16, 2, True, mode)
        torch.testing.assert_close(cuda, cpu, **(F64 if dtype == torch.float64 else HALF[dtype]))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("num_images", [3, 11])  # 11 > the 8 map descriptors passed by value
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_roi_align_ragged(seed, num_images, pool_mode):
    gen = torch.Generator().manual_seed(seed)
    maps = [
        torch.randn(24, int(torch.randint(5, 40, (1,), generator=gen)), int(torch.randint(5, 40, (1,), generator=gen)), generator=gen)
        for _ in range(num_images)
    ]
    boxes = random_boxes(gen, 120, 40 * 16, 40 * 16, num_images=num_images, min_side=4)
    cpu, cuda = both(roi_kernels.roi_align, maps, boxes, 7, 1 / 16, 2, True, pool_mode)
    torch.testing.assert_close(cuda, cpu, **F32)
    cl = [m[None].to(memory_format=torch.channels_last)[0] for m in maps]
    cpu_cl, cuda_cl = both(roi_kernels.roi_align, cl, boxes, 7, 1 / 16, 2, True, pool_mode)
    torch.testing.assert_close(cuda_cl, cpu, **F32)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("levels", [(2, 3, 4, 5), (3,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_multiscale_roi_align(seed, levels, dtype):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(320, 448), (288, 416)]
    maps = [
        torch.randn(2, 16, -(-320 // 2**k), -(-448 // 2**k), generator=gen, dtype=torch.float64).to(dtype)
        for k in levels
    ]
    boxes = [random_boxes(gen, 80, h, w, min_side=8, max_side=600)[:, 1:] for h, w in sizes]

    def op(m, b):
        return roi_kernels.multiscale_roi_align(m, b, sizes, 7, 2)

    cpu, cuda = both(op, maps, boxes)
    torch.testing.assert_close(cuda, cpu, **(F32 if dtype == torch.float32 else HALF[dtype]))
    if dtype == torch.float32:
        names = [f"p{k}" for k in levels]
        tv = MultiScaleRoIAlign(names, 7, 2)({n: m.cuda() for n, m in zip(names, maps)}, [b.cuda() for b in boxes], sizes)
        torch.testing.assert_close(cuda, tv.cpu(), **TV32)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("output_size", [(7, 7), (300, 2)])  # 300 rows: more than the shared table
def test_roi_pool(seed, channels_last, dtype, output_size):
    gen = torch.Generator().manual_seed(seed)
    x = nchw(gen, 2, 40, 29, 37, dtype=dtype, channels_last=channels_last)
    boxes = torch.cat([boxes_with_edges(gen, 60, 29, 37, 1 / 16, 2), NON_FINITE])
    cpu, cuda = both(roi_kernels.roi_pool, x, boxes, output_size, 1 / 16)
    assert torch.equal(cuda, cpu), "a max of input values is exact"
    if dtype in (torch.float32, torch.float64):
        tv = torchvision.ops.roi_pool(x.cuda(), boxes[:-4].to(dtype).cuda(), output_size, 1 / 16)
        assert torch.equal(cuda[:-4], tv.cpu()), "roi_pool equals torchvision's"


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_ps_ops(seed, channels_last, dtype, sampling_ratio):
    gen = torch.Generator().manual_seed(seed)
    c_out, ph, pw = 3, 3, 4
    x = nchw(gen, 2, c_out * ph * pw, 27, 35, dtype=dtype, channels_last=channels_last)
    boxes = torch.cat([boxes_with_edges(gen, 60, 27, 35, 1 / 16, 2), NON_FINITE])
    tol = {torch.float32: F32, torch.float64: F64}.get(dtype) or HALF[dtype]
    cpu, cuda = both(roi_kernels.ps_roi_align, x, boxes, (ph, pw), 1 / 16, sampling_ratio)
    torch.testing.assert_close(cuda, cpu, **tol)
    assert torch.isfinite(cuda).all()
    cpu_p, cuda_p = both(roi_kernels.ps_roi_pool, x, boxes, (ph, pw), 1 / 16)
    torch.testing.assert_close(cuda_p, cpu_p, **tol)
    if dtype == torch.float32:
        sane = boxes[:, 1:].abs().amax(1) < 1e4  # finite, and not millions of samples a bin
        tv = torchvision.ops.ps_roi_align(x.cuda(), boxes[sane].cuda(), (ph, pw), 1 / 16, sampling_ratio).cpu()
        # torchvision's ps_roi_align gives NaN on zero-width boxes with adaptive sampling.
        ok = ~torch.isnan(tv).flatten(1).any(1)
        torch.testing.assert_close(cuda[sane][ok], tv[ok], **TV32)
        tv_p = torchvision.ops.ps_roi_pool(x.cuda(), boxes[sane].cuda(), (ph, pw), 1 / 16).cpu()
        torch.testing.assert_close(cuda_p[sane], tv_p, **TV32)


def _rotated(gen, num, h, w, num_images):
    b = random_boxes(gen, num, h, w, num_images=num_images, min_side=4, clip=False, dtype=torch.float64)
    angle = torch.rand(num, generator=gen, dtype=torch.float64) * 360 - 180
    r = torch.stack([b[:, 0], (b[:, 1] + b[:, 3]) / 2, (b[:, 2] + b[:, 4]) / 2, b[:, 3] - b[:, 1], b[:, 4] - b[:, 2], angle], 1)
    extra = torch.tensor(
        [
            [0, 100.0, 120, 0, 0, 20],  # zero size
            [0, 50, 60, -30, 40, 10],  # negative width
            [0, 30, 20, 1e5, 1e5, 60],  # huge
            [0, float("nan"), 10, 20, 20, 0],
            [0, 10, 10, 20, 20, float("inf")],
        ],
        dtype=torch.float64,
    )
    return torch.cat([r, extra]).float()


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_roi_align_rotated(seed, channels_last, aligned, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, 25, 33, generator=gen, dtype=torch.float64)
    # Zero border rows and columns: the op is then continuous in the sample positions, and
    # CUDA's sinf/cosf (which may differ from the CPU's by an ulp) cannot move a sample across
    # the edge of the map, where the bilinear value jumps.
    x = torch.nn.functional.pad(x[:, :, 1:-1, 1:-1], (1, 1, 1, 1)).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rois = _rotated(gen, 50, 25 * 16, 33 * 16, 2).to(torch.float64 if dtype == torch.float64 else torch.float32)
    cpu, cuda = both(roi_kernels.roi_align_rotated, x, rois, 5, 1 / 16, -1, aligned)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}.get(dtype) or HALF[dtype]
    torch.testing.assert_close(cuda, cpu, **tol)
    assert torch.isfinite(cuda).all()


@pytest.mark.cuda
@gpu
def test_empty_and_non_contiguous_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 16, 30, 40, generator=gen)
    x, x_cuda = base[:, ::2, :, 3:], base.cuda()[:, ::2, :, 3:]  # strided, not contiguous
    assert not x_cuda.is_contiguous()
    boxes = random_boxes(gen, 20, 30 * 8, 37 * 8, num_images=2)
    rois = torch.cat([boxes[:, :3], boxes[:, 3:] - boxes[:, 1:3], torch.full((20, 1), 30.0)], 1)
    for fn, b in [(roi_kernels.roi_align, boxes), (roi_kernels.roi_pool, boxes), (roi_kernels.roi_align_rotated, rois)]:
        cpu, cuda = fn(x, b, 4, 1 / 8), fn(x_cuda, b.cuda(), 4, 1 / 8).cpu()
        torch.testing.assert_close(cuda, cpu, **(F32 if fn is not roi_kernels.roi_align_rotated else TV32))
    for fn, b in [(roi_kernels.roi_align, torch.zeros(0, 5)), (roi_kernels.roi_align_rotated, torch.zeros(0, 6))]:
        out = fn(x_cuda, b.cuda(), 3)
        assert out.shape == (0, 8, 3, 3) and out.is_cuda


@pytest.mark.cuda
@gpu
def test_device_mismatch_names_the_argument():
    x = torch.randn(1, 4, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="boxes must be on the same device as input"):
        roi_kernels.roi_pool(x, torch.tensor([[0.0, 0, 0, 4, 4]]), 2)
    with pytest.raises(RuntimeError, match=r"boxes\[:, 0\]"):
        roi_kernels.roi_align(x, torch.tensor([[3.0, 0, 0, 4, 4]], device="cuda"), 2)
    with pytest.raises(RuntimeError, match=r"input\[1\] must be on the device"):
        roi_kernels.roi_align([x[0], x[0].cpu()], torch.tensor([[0.0, 0, 0, 4, 4]], device="cuda"), 2)


@pytest.mark.cuda
@gpu
def test_runs_on_the_current_stream(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 30, 40, generator=gen).cuda()
    boxes = random_boxes(gen, 200, 30 * 16, 40 * 16, num_images=2).cuda()
    expected = roi_kernels.roi_align(x, boxes, 7, 1 / 16, 2, True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = roi_kernels.roi_align(x, boxes, 7, 1 / 16, 2, True)
    stream.synchronize()
    assert torch.equal(out, expected)
    assert math.isfinite(float(out.abs().sum()))
