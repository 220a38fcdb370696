"""How fast the CPU executor runs a CUDA kernel (tests only; no GPU): roi_align launches of 1,
10 and 100 boxes through torch.ops.roi_kernels_emulated (one block per box, 256 threads,
4 barrier phases a block) beside our CPU kernel on the same inputs, median of --repeat runs
after a warm-up. The per-block cost is what the emulated tests' time is made of.

    python benchmarks/bench_executor.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import roi_kernels  # noqa: F401
from roi_kernels import _build


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    _build.load_emulated()
    emu, cpu = torch.ops.roi_kernels_emulated, torch.ops.roi_kernels
    x = torch.randn(1, 8, 10, 10)
    print("| boxes (blocks) | executor ms | per block ms | CPU kernel ms |")
    print("| ---: | ---: | ---: | ---: |")
    for boxes in (1, 10, 100):
        rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]]).repeat(boxes, 1)
        args_ = (rois, 1.0, 2, 2, 1, False, "avg")
        e = median_ms(lambda: emu.roi_align(x, *args_), args.repeat)
        c = median_ms(lambda: cpu.roi_align(x, *args_), args.repeat)
        print(f"| {boxes} | {e:.1f} | {e / boxes:.2f} | {c:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
