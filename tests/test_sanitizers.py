"""Memory and race checks of the CUDA kernels, the CPU stand-ins for compute-sanitizer:

* every kernel (tests/emulated/sanitize_kernels.cpp drives each one through every path, with
  buffers of exactly the size their tensors span) under AddressSanitizer +
  UndefinedBehaviorSanitizer (memcheck: out-of-bounds reads of maps, box tables, map tables
  and shared tables; integer overflow; out-of-range float-to-integer casts) and under
  ThreadSanitizer (racecheck: shared memory touched by two threads with no barrier between);
* each checker shown to bite, on a tiny kernel (tests/emulated/tiny_kernel.cuh) with a
  one-line defect planted in a copy of it: an index changed (the bitwise comparison of the
  emulated tests fails), an off-by-one read of the shared table and of the input (reported by
  the sanitizers), a barrier removed (ThreadSanitizer reports the race) or made divergent
  (the executor refuses it);
* what the executor does not support fails to compile.

The programs are built with the host compiler from the same kernel headers nvcc compiles, and
run as real subprocesses (a sanitizer and a Python interpreter mix badly). ~2 minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.cuda_emulated

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "roi_kernels" / "csrc"
HERE = Path(__file__).resolve().parent / "emulated"
TORCH_INCLUDE = Path(torch.__file__).resolve().parent / "include"
CXX = os.environ.get("CXX", "g++")

SANITIZERS = {
    "asan": ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"],
    "tsan": ["-fsanitize=thread"],
    "none": [],
}
ENV = dict(
    os.environ,
    ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:abort_on_error=0",
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1",
)

if shutil.which(CXX) is None:
    pytest.skip(f"no host compiler ({CXX})", allow_module_level=True)


def compile_program(source: Path, out: Path, sanitizer: str, include: Path = HERE) -> Path:
    cmd = [
        CXX, "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", "-pthread",
        *SANITIZERS[sanitizer], "-DROI_KERNELS_CUDA_EMULATED", f"-I{include}", f"-I{CSRC}", f"-I{TORCH_INCLUDE}",
        str(source), "-o", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sanitizers")
    cache: dict[tuple, Path] = {}

    def get(source: Path, sanitizer: str, include: Path = HERE) -> Path:
        key = (source, sanitizer, include)
        if key not in cache:
            name = f"{source.stem}-{sanitizer}-{len(cache)}"
            cache[key] = compile_program(source, folder / name, sanitizer, include)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------
# The real kernels
# ---------------------------------------------------------------------------------------------


def run_kernels(program: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *args], capture_output=True, text=True, timeout=900, env=ENV)


def test_every_kernel_is_clean_under_address_and_undefined_behaviour_sanitizers(build):
    proc = run_kernels(build(HERE / "sanitize_kernels.cpp", "asan"))
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert "runtime error" not in proc.stderr and "AddressSanitizer" not in proc.stderr, proc.stderr[-8000:]
    cases = int(proc.stdout.strip().splitlines()[-1].split()[0])
    assert cases >= 280, proc.stdout[-2000:]
    for op in ("roi_align", "ragged x11", "multiscale_roi_align levels=10", "computed taps", "roi_pool",
               "ps_roi_align", "roi_align_rotated", "grid of 2", "empty map"):  # fmt: skip
        assert op in proc.stdout, f"no {op} case ran"


def test_every_kernel_is_clean_under_thread_sanitizer(build):
    proc = run_kernels(build(HERE / "sanitize_kernels.cpp", "tsan"), "quick")
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr[-8000:]
    assert int(proc.stdout.strip().splitlines()[-1].split()[0]) >= 90


# ---------------------------------------------------------------------------------------------
# Each checker bites: one-line defects planted in copies of a tiny kernel
# ---------------------------------------------------------------------------------------------

N = 1000  # 3 full slices of 256 and a partial one; 3 blocks, so the grid-stride loop wraps
REVERSED = "out[i] = tile[len - 1 - threadIdx.x];"
FIRST_BARRIER = "    __syncthreads();\n    if (threadIdx.x < len) {\n      out[i]"


def planted(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the tiny kernel with `old` replaced by `new` (exactly once)."""
    source = (HERE / "tiny_kernel.cuh").read_text()
    assert source.count(old) == 1, old
    folder = tmp_path / "planted"
    folder.mkdir()
    (folder / "tiny_kernel.cuh").write_text(source.replace(old, new))
    shutil.copy(HERE / "tiny_main.cpp", folder / "tiny_main.cpp")
    return folder


def run_tiny(program: Path, x: np.ndarray) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), str(len(x))], input=x.tobytes(), capture_output=True, timeout=300, env=ENV)


def reference(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    for base in range(0, len(x), 256):
        out[base : base + 256] = x[base : base + 256][::-1]
    return out


@pytest.fixture
def data(seed) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(N).astype(np.float32)


def test_the_tiny_kernel_is_right_and_clean(build, data):
    from test_cuda_emulated import assert_same_bits

    for sanitizer in ("none", "asan", "tsan"):
        proc = run_tiny(build(HERE / "tiny_main.cpp", sanitizer), data)
        assert proc.returncode == 0, proc.stderr.decode()[-4000:]
        assert_same_bits(torch.from_numpy(np.frombuffer(proc.stdout, np.float32).copy()), torch.from_numpy(reference(data)))


def test_a_changed_index_fails_the_bitwise_comparison(build, data, tmp_path):
    """The comparison the emulated tests make (test_cuda_emulated.assert_same_bits) catches a
    kernel that reads the right table at a wrong index: memory-safe, only the result is wrong."""
    from test_cuda_emulated import assert_same_bits

    folder = planted(tmp_path, REVERSED, "out[i] = tile[threadIdx.x];")
    proc = run_tiny(build(folder / "tiny_main.cpp", "none", folder), data)
    assert proc.returncode == 0, proc.stderr.decode()
    got = torch.from_numpy(np.frombuffer(proc.stdout, np.float32).copy())
    with pytest.raises(AssertionError, match="differs from the CPU kernel"):
        assert_same_bits(got, torch.from_numpy(reference(data)))


def test_an_off_by_one_read_of_the_shared_table_is_reported(build, data, tmp_path):
    folder = planted(tmp_path, REVERSED, "out[i] = tile[len - threadIdx.x];")
    proc = run_tiny(build(folder / "tiny_main.cpp", "asan", folder), data)
    err = proc.stderr.decode()
    assert proc.returncode != 0, "the sanitizer did not stop the program"
    assert "index 256 out of bounds for type 'float [256]'" in err or "global-buffer-overflow" in err, err[-4000:]
    assert "tiny_kernel.cuh:" in err, "the report names the kernel's line"


def test_an_off_by_one_read_of_the_input_is_reported(build, data, tmp_path):
    folder = planted(tmp_path, "tile[threadIdx.x] = in[i];", "tile[threadIdx.x] = in[i + 1];")
    proc = run_tiny(build(folder / "tiny_main.cpp", "asan", folder), data)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "heap-buffer-overflow" in err and "READ of size 4" in err, err[-4000:]
    assert "tiny_kernel.cuh:" in err


def test_a_missing_barrier_is_reported_as_a_race(build, data, tmp_path):
    folder = planted(tmp_path, FIRST_BARRIER, FIRST_BARRIER.replace("    __syncthreads();\n", "", 1))
    proc = run_tiny(build(folder / "tiny_main.cpp", "tsan", folder), data)
    err = proc.stderr.decode()
    assert proc.returncode == 66, err[-4000:]
    assert "WARNING: ThreadSanitizer: data race" in err and "tiny_kernel.cuh:" in err, err[-4000:]


def test_a_divergent_barrier_is_refused_by_the_executor(build, data, tmp_path):
    """A __syncthreads() that only some threads of a block reach hangs or corrupts on a GPU; the
    executor detects it at the barrier and fails the launch with the line."""
    folder = planted(tmp_path, FIRST_BARRIER, FIRST_BARRIER.replace("    __syncthreads();", "    if (threadIdx.x < len) __syncthreads();", 1))
    proc = run_tiny(build(folder / "tiny_main.cpp", "none", folder), data)
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert "a barrier in divergent code" in err and "lines 27 and 31" in err, err


# ---------------------------------------------------------------------------------------------
# What the executor does not support does not compile
# ---------------------------------------------------------------------------------------------

UNSUPPORTED = {
    "dynamic shared memory": "extern __shared__ float dyn[]; out[0] = dyn[0];",
    "warp shuffle": "out[0] = __shfl_sync(0xffffffffu, 1.0f, 0);",
    "warp vote": "out[0] = __ballot_sync(0xffffffffu, 1);",
    "warpSize": "out[0] = warpSize;",
    "__ldg": "out[0] = __ldg(out + 1);",
    "fast-math intrinsic": "out[0] = __expf(out[1]);",
    "__syncthreads_count": "out[0] = __syncthreads_count(1);",
    "half atomicAdd": "c10::Half h; atomicAdd(&h, h);",
    "writing threadIdx": "threadIdx.x = 3;",
}


@pytest.mark.parametrize("what", list(UNSUPPORTED))
def test_unsupported_features_fail_to_compile(tmp_path, what):
    source = tmp_path / "k.cpp"
    source.write_text(
        '#include <c10/util/Half.h>\n#include "cuda/device.cuh"\n'
        f"__global__ void k(float* out) {{ {UNSUPPORTED[what]} }}\n"
        "int main() { float o[2] = {0, 0}; roi_kernels::cuda::launch(&k, dim3(1), dim3(32), o); }\n"
    )
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-DROI_KERNELS_CUDA_EMULATED", f"-I{CSRC}", f"-I{TORCH_INCLUDE}", str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, f"{what} compiled against the executor"
    assert "error" in proc.stderr


def test_supported_features_compile_and_run(tmp_path):
    """The same harness accepts what the executor does support (so the test above is not
    failing for another reason): 3-D blocks, atomics, __syncthreads."""
    source = tmp_path / "k.cpp"
    source.write_text(
        '#include <cstdio>\n#include "cuda/device.cuh"\n'
        "__global__ void k(float* out, int* count) {\n"
        "  __shared__ int seen[4 * 2 * 3];\n"
        "  seen[threadIdx.x + 4 * (threadIdx.y + 2 * threadIdx.z)] = 1;\n"
        "  __syncthreads();\n"
        "  if (threadIdx.x + threadIdx.y + threadIdx.z == 0) { int s = 0; for (int v : seen) s += v; atomicAdd(count, s); }\n"
        "  atomicAdd(out, 0.5f);\n"
        "}\n"
        "int main() { float o = 0; int c = 0; roi_kernels::cuda::launch(&k, dim3(2, 3), dim3(4, 2, 3), &o, &c);\n"
        '  std::printf("%g %d\\n", o, c); }\n'
    )
    program = compile_program(source, tmp_path / "k", "tsan", include=tmp_path)
    proc = subprocess.run([str(program)], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == [str(0.5 * 24 * 6).rstrip("0").rstrip("."), str(24 * 6)]
