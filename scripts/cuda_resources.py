"""What each CUDA kernel instantiation uses on the GPU, from ptxas, without a GPU: registers,
static shared memory, stack frame and spills, and the theoretical occupancy that follows at
the kernel's block size (256 threads).

    python scripts/cuda_resources.py [--arch 9.0] [--build-log FILE]

Builds the extension with the CUDA sources (as ``roi-kernels-build --clean`` does, in a
temporary folder, with ``ROI_KERNELS_NVCC_FLAGS=--resource-usage``) and prints a Markdown
table; ``--build-log`` reads the verbose output of such a build instead. tests/test_cuda_build.py
reads its own build's output with :func:`parse` and fails on any spill, or on more than 48 KiB
of static shared memory per block.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

THREADS = 256  # cuda::kThreads

# Per-SM limits of compute capability 9.0 (the CUDA C++ Programming Guide's table).
SM90 = dict(threads=2048, blocks=32, warps=64, registers=65536, reg_unit=256, smem=233472, smem_reserved=1024)


@dataclass
class Kernel:
    name: str  # demangled
    arch: str
    registers: int = 0
    shared: int = 0  # static shared memory, bytes
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    barriers: int = 0

    @property
    def short(self) -> str:
        """roi_kernels::cuda::align::roi_align_kernel<float, true, false>(...) -> align::roi_align_kernel<float, true, false>"""
        n = self.name.split("(")[0]
        n = n[len("void ") :] if n.startswith("void ") else n
        return n.replace("roi_kernels::cuda::", "").replace("c10::", "")

    def occupancy(self, threads: int = THREADS, limits: dict = SM90) -> tuple[float, str]:
        """(active warps / max warps per SM, the limiting resource)."""
        warps = math.ceil(threads / 32)
        by = {"threads": limits["threads"] // threads, "blocks": limits["blocks"]}
        regs_per_warp = math.ceil(max(self.registers, 1) * 32 / limits["reg_unit"]) * limits["reg_unit"]
        by["registers"] = limits["registers"] // (regs_per_warp * warps)
        by["shared memory"] = limits["smem"] // (self.shared + limits["smem_reserved"])
        blocks = min(by.values())
        limiter = min(by, key=lambda k: by[k])
        return blocks * warps / limits["warps"], limiter


_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def parse(text: str) -> list[Kernel]:
    """The kernels of ptxas's --resource-usage output (``-Xptxas -v``), one per entry."""
    kernels: list[Kernel] = []
    current: Kernel | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = Kernel(m[1], m[2])
            kernels.append(current)
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = (int(v) for v in m.groups())
            continue
        m = _USED.search(line)
        if m:
            current.registers = int(m[1])
            b, smem = _BARRIERS.search(line), _SMEM.search(line)
            current.barriers = int(b[1]) if b else 0
            current.shared = int(smem[1]) if smem else 0
            current = None
    for k, name in zip(kernels, demangle([k.name for k in kernels])):
        k.name = name
    return kernels


def markdown(kernels: list[Kernel]) -> str:
    rows = [
        "| kernel | arch | registers | static shared memory | stack | spills (stores / loads) | barriers "
        "| occupancy at 256 threads | limited by |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for k in sorted(kernels, key=lambda k: k.short):
        occ, limiter = k.occupancy()
        rows.append(
            f"| `{k.short}` | {k.arch} | {k.registers} | {k.shared:,} B | {k.stack} B | "
            f"{k.spill_stores} / {k.spill_loads} B | {k.barriers} | {occ:.0%} | {limiter} |"
        )
    return "\n".join(rows)


def build_log(arch: str) -> str:
    """Compiles the extension with the CUDA sources and --resource-usage; its verbose output."""
    folder = tempfile.mkdtemp(prefix="roi-cuda-resources-")
    env = dict(
        os.environ,
        ROI_KERNELS_CUDA="1",
        ROI_KERNELS_BUILD_DIR=folder,
        ROI_KERNELS_NVCC_FLAGS="--resource-usage",
        ROI_KERNELS_VERBOSE="1",
        TORCH_CUDA_ARCH_LIST=arch,
    )
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "roi_kernels.build"], env=env, capture_output=True, text=True, timeout=3600
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"the CUDA build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST for the build (default 9.0)")
    parser.add_argument("--build-log", type=Path, help="read this verbose build output instead of building")
    args = parser.parse_args(argv)
    text = args.build_log.read_text() if args.build_log else build_log(args.arch)
    kernels = parse(text)
    if not kernels:
        raise SystemExit("no ptxas resource lines found (was the build made with --resource-usage?)")
    print(markdown(kernels))
    spills = [k for k in kernels if k.spill_stores or k.spill_loads]
    print(f"\n{len(kernels)} kernel instantiations; {len(spills)} with spills; "
          f"most static shared memory {max(k.shared for k in kernels):,} B")  # fmt: skip
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
