"""Our RoI kernels against torchvision's on the standard workloads, side by side in one run.

    python benchmarks/bench_kernels.py                       # CPU, standard workloads, float32 + float16
    python benchmarks/bench_kernels.py --device cuda --dtypes float32 float16 bfloat16
    python benchmarks/bench_kernels.py --workloads fpn-det --repeat 11 --plot out.png
    python benchmarks/bench_kernels.py --extras               # also the ps and rotated ops
    python benchmarks/bench_kernels.py --backward             # the gradients (backward alone) instead

For each workload and dtype: the median of --repeat timed runs after a warm-up, for us and
for torchvision on the same inputs, their ratio, and our time over the workload's floor (its
bytes at the measured copy bandwidth, or its arithmetic at the measured multiply-add rate,
whichever is longer). Prints a Markdown table (and --json rows); progress goes to stderr.

The standard workloads are those of docs/WORKLOADS.md, which has no shape for ps_roi_align,
ps_roi_pool or roi_align_rotated: --extras adds workloads built on single-level for them
(benchmarks/workloads.py), in a table of their own, apart from the standard rows the
project's speed targets refer to. torchvision has no rotated op: that row has no contender.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.ops.poolers import LevelMapper

sys.path.insert(0, str(Path(__file__).resolve().parent))
if "--without-autograd" in sys.argv:
    # --registration-cost's baseline: roi_kernels imported without its autograd formulas
    # (roi_kernels/_autograd.py, stood in for by an empty module), as before they existed.
    import types

    sys.modules["roi_kernels._autograd"] = types.ModuleType("roi_kernels._autograd")
import workloads  # noqa: E402

import roi_kernels  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def machine_rates(device: str) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, float32 multiply-adds per second)."""
    n = 64 * 2**20  # 256 MB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, 5)
    bandwidth = 2 * src.numel() * 4 / (ms / 1e3)
    a = torch.randn(1024, 1024, device=device)
    ms = median_ms(lambda: a @ a, device, 5)
    fma_rate = 1024**3 / (ms / 1e3)
    return bandwidth, fma_rate


def ours(w: workloads.Workload):
    if w.op == "ps_roi_align":
        return lambda: roi_kernels.ps_roi_align(w.maps[0], w.boxes, w.output_size, w.spatial_scale, w.sampling_ratio)
    if w.op == "ps_roi_pool":
        return lambda: roi_kernels.ps_roi_pool(w.maps[0], w.boxes, w.output_size, w.spatial_scale)
    if w.op == "roi_align_rotated":
        return lambda: roi_kernels.roi_align_rotated(
            w.maps[0], w.boxes, w.output_size, w.spatial_scale, w.sampling_ratio, w.aligned
        )
    if w.op == "roi_pool":
        return lambda: roi_kernels.roi_pool(w.maps[0], w.boxes, w.output_size, w.spatial_scale)
    if w.op == "roi_align":
        return lambda: roi_kernels.roi_align(
            w.maps[0], w.boxes, w.output_size, w.spatial_scale, w.sampling_ratio, w.aligned
        )
    if w.op == "ragged_roi_align":
        return lambda: roi_kernels.roi_align(w.maps, w.boxes, w.output_size, w.spatial_scale, w.sampling_ratio, w.aligned)
    return lambda: roi_kernels.multiscale_roi_align(
        w.maps, w.boxes, w.image_sizes, w.output_size, w.sampling_ratio, w.aligned
    )


def torchvision_fn(w: workloads.Workload):
    """What a user has without us: torchvision's ops (its MultiScaleRoIAlign algorithm with the
    workload's `aligned`, which the module itself does not expose; a per-image loop for a
    ragged batch). None where torchvision has no such op."""
    ops = torchvision.ops
    if w.op == "roi_align_rotated":
        return None
    if w.op == "ps_roi_align":
        return lambda: ops.ps_roi_align(w.maps[0], w.boxes, w.output_size, w.spatial_scale, w.sampling_ratio)
    if w.op == "ps_roi_pool":
        return lambda: ops.ps_roi_pool(w.maps[0], w.boxes, w.output_size, w.spatial_scale)
    if w.op == "roi_pool":
        return lambda: ops.roi_pool(w.maps[0], w.boxes, w.output_size, w.spatial_scale)
    if w.op == "roi_align":
        return lambda: ops.roi_align(w.maps[0], w.boxes, w.output_size, w.spatial_scale, w.sampling_ratio, w.aligned)
    if w.op == "ragged_roi_align":

        def ragged():
            out = w.maps[0].new_empty(w.num_boxes, w.channels, *w.output_size)
            for i, m in enumerate(w.maps):
                sel = (w.boxes[:, 0] == i).nonzero().squeeze(1)
                b = w.boxes[sel].clone()
                b[:, 0] = 0
                out[sel] = ops.roi_align(m[None], b, w.output_size, w.spatial_scale, w.sampling_ratio, w.aligned)
            return out

        return ragged
    scales = roi_kernels.infer_scales(w.maps, w.image_sizes)
    k_min = int(-torch.log2(torch.tensor(scales[0])).item())
    k_max = int(-torch.log2(torch.tensor(scales[-1])).item())
    mapper = LevelMapper(k_min, k_max)

    def multiscale():
        levels = mapper([w.boxes[:, 1:]])
        out = w.maps[0].new_zeros(w.num_boxes, w.channels, *w.output_size)
        for lvl, (m, s) in enumerate(zip(w.maps, scales)):
            idx = torch.where(levels == lvl)[0]
            out[idx] = ops.roi_align(m, w.boxes[idx], w.output_size, s, w.sampling_ratio, w.aligned)
        return out

    return multiscale


def floor_ms(w: workloads.Workload, dtype: torch.dtype, bandwidth: float, fma_rate: float) -> float:
    size = torch.tensor([], dtype=dtype).element_size()
    moved = sum(m.numel() for m in w.maps) * size + w.output_elements() * size
    fmas = 4 * float(workloads.samples_per_box(w).sum()) * w.channels_out
    return max(moved / bandwidth, fmas / fma_rate) * 1e3


HEADER = (
    "| workload | op | dtype | device | threads | ours ms | torchvision ms | speed-up | floor ms | ours / floor "
    "| max abs diff |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"
)


def measure(name: str, dname: str, device: str, repeat: int, threads: int, bandwidth: float, fma_rate: float) -> dict:
    """One row: our op and torchvision's on the same inputs, side by side."""
    dtype = DTYPES[dname]
    w = workloads.make(name, dtype)
    w.maps = [m.to(device) for m in w.maps]
    w.boxes = w.boxes.to(device)
    f_ours, f_tv = ours(w), torchvision_fn(w)
    mine = f_ours()
    via = ""
    theirs = None
    if f_tv is not None:
        try:
            theirs = f_tv()
        except (RuntimeError, NotImplementedError):
            # torchvision has no kernel for this dtype on this device: a user would convert
            # the maps to float32 on every call and the result back, so that is what we time.
            w32 = workloads.make(name, torch.float32)
            w32.maps = [m.to(device) for m in w.maps]
            w32.boxes = w.boxes
            inner = torchvision_fn(w32)
            maps16 = w.maps

            def f_tv():
                w32.maps = [m.float() for m in maps16]
                return inner().to(dtype)

            theirs, via = f_tv(), " (via float32)"
    diff = None
    if theirs is not None:
        diff = (mine.float() - theirs.float()).abs().max().item() if mine.numel() else 0.0
    t_ours = median_ms(f_ours, device, repeat)
    t_tv = median_ms(f_tv, device, repeat) if f_tv is not None else None
    floor = floor_ms(w, dtype, bandwidth, fma_rate)
    return dict(
        workload=name,
        op=w.op,
        contender=("torchvision" + via) if f_tv is not None else None,
        dtype=dname,
        device=device,
        threads=threads,
        ours_ms=t_ours,
        torchvision_ms=t_tv,
        speedup=(t_tv / t_ours) if t_tv is not None else None,
        floor_ms=floor,
        over_floor=t_ours / floor,
        max_abs_diff=diff,
    )


def measure_backward(
    name: str, dname: str, device: str, repeat: int, threads: int, bandwidth: float, fma_rate: float
) -> dict:
    """One --backward row: the gradient with respect to the maps (the backward alone, through
    the graph of one forward kept with retain_graph) for us and for torchvision, side by side,
    on the same inputs and upstream gradient."""
    dtype = DTYPES[dname]
    w = workloads.make(name, dtype)
    w.maps = [m.to(device).requires_grad_() for m in w.maps]
    w.boxes = w.boxes.to(device)
    maps = w.maps
    out = ours(w)()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    f_tv, via = torchvision_fn(w), ""
    theirs_out = None
    if f_tv is not None:
        try:
            theirs_out = f_tv()
        except (RuntimeError, NotImplementedError):
            # No torchvision kernel for this dtype: through float32 (differentiable casts).
            w32 = workloads.make(name, torch.float32)
            w32.boxes = w.boxes
            w32.maps = [m.float() for m in maps]
            theirs_out, via = torchvision_fn(w32)().to(dtype), " (via float32)"

    def grads(o):
        return torch.autograd.grad(o, maps, grad, retain_graph=True, allow_unused=True)

    mine = grads(out)
    diff = None
    if theirs_out is not None:
        theirs = grads(theirs_out)
        diff = max(
            (a.float() - (b if b is not None else torch.zeros_like(a)).float()).abs().max().item() if a.numel() else 0.0
            for a, b in zip(mine, theirs)
        )
    t_ours = median_ms(lambda: grads(out), device, repeat)
    t_tv = median_ms(lambda: grads(theirs_out), device, repeat) if theirs_out is not None else None
    floor = floor_ms(w, dtype, bandwidth, fma_rate)
    return {
        "workload": name,
        "op": w.op + " backward",
        "contender": ("torchvision" + via) if theirs_out is not None else None,
        "dtype": dname,
        "device": device,
        "threads": threads,
        "ours_ms": t_ours,
        "torchvision_ms": t_tv,
        "speedup": (t_tv / t_ours) if t_tv is not None else None,
        "floor_ms": floor,
        "over_floor": t_ours / floor,
        "max_abs_diff": diff,
    }


def forward_us(name: str, mode: str, repeat: int, calls: int) -> float:
    """Microseconds per forward call of our op on a workload (float32, CPU), the median of
    `repeat` timings of `calls` calls each; mode: "plain" (grad mode on, maps not requiring
    grad), "no_grad" or "inference_mode"."""
    w = workloads.make(name, torch.float32)
    fn = ours(w)
    context = {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]

    def batch():
        with context():
            for _ in range(calls):
                fn()

    return median_ms(batch, "cpu", repeat) * 1e3 / calls


def registration_cost(names: list[str], repeat: int) -> None:
    """Our forward with the autograd registration (this process) and without it (a child
    process that imports roi_kernels without roi_kernels/_autograd.py), side by side."""
    import subprocess

    calls = {"tiny": 200}
    print("\n## forward with and without the autograd registration (float32, CPU)\n")
    print("| workload | mode | registered us/call | unregistered us/call | registered / unregistered |")
    print("|---|---|---:|---:|---:|")
    for name in names:
        for mode in ("plain", "no_grad", "inference_mode"):
            n = calls.get(name, 3)
            argv = [sys.executable, __file__, "--without-autograd", "--threads", str(torch.get_num_threads())]
            argv += ["--_forward-us", name, mode, str(repeat), str(n)]
            child = subprocess.run(argv, capture_output=True, text=True, check=True)
            without = float(child.stdout.strip().splitlines()[-1])
            with_reg = forward_us(name, mode, repeat, n)
            print(f"| {name} | {mode} | {with_reg:.1f} | {without:.1f} | {with_reg / without:.2f} |", flush=True)


def table_row(r: dict) -> str:
    if r["torchvision_ms"] is None:
        tv, speedup, diff = "n/a (no such op)", "n/a", "n/a"
    else:
        tv = f"{r['torchvision_ms']:.2f}{r['contender'][len('torchvision'):]}"
        speedup, diff = f"{r['speedup']:.1f}x", f"{r['max_abs_diff']:.2g}"
    return (
        f"| {r['workload']} | {r['op']} | {r['dtype']} | {r['device']} | {r['threads']} | {r['ours_ms']:.2f} | "
        f"{tv} | {speedup} | {r['floor_ms']:.2f} | {r['over_floor']:.1f} | {diff} |"
    )


def speedup_figure(rows: list[dict], device: str, threads: int):
    """A bar per (workload, dtype) with a contender: our kernel's speed-up over torchvision's,
    each bar labelled with its value and both times; titled with the device and threads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["speedup"] is not None]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.8))
    labels = [f"{r['workload']} {r['dtype']}" for r in ok]
    bars = ax.barh(labels, [r["speedup"] for r in ok], color="tab:blue")
    ax.bar_label(
        bars,
        labels=[f"{r['speedup']:.1f}x ({r['ours_ms']:.2f} vs {r['torchvision_ms']:.2f} ms)" for r in ok],
        padding=3,
        fontsize=8,
    )
    ax.axvline(1.0, color="grey", lw=1)
    ax.set_xlabel("speed-up over torchvision (its time / ours; > 1: ours is faster)")
    ax.set_title(f"roi_kernels vs torchvision, median of timed runs: {device}, {threads} threads")
    ax.set_xlim(0, max([r["speedup"] for r in ok] + [1.0]) * 1.45)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both contenders (default 2)")
    names = list(workloads.NAMES) + list(workloads.EXTRA_NAMES)
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=list(workloads.NAMES),
        choices=names,
        metavar="NAME",
        help=f"workloads to run (default: the standard ones). Choices: {', '.join(names)}",
    )
    parser.add_argument(
        "--extras", action="store_true", help=f"also run the extra workloads ({', '.join(workloads.EXTRA_NAMES)})"
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "float16"], choices=list(DTYPES), help="default: float32 float16"
    )
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per contender; the median is reported")
    parser.add_argument(
        "--backward",
        action="store_true",
        help="time the backward (the maps' gradient, given the output's) instead of the forward",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument("--plot", type=Path, help="write a bar chart of the speed-ups (PNG) to this file")
    parser.add_argument(
        "--registration-cost",
        action="store_true",
        help="time our forward on tiny and fpn-det with and without the autograd registration "
        "(plain, no_grad, inference_mode) instead of the table",
    )
    parser.add_argument(
        "--without-autograd", action="store_true", help="import roi_kernels without its autograd registrations"
    )
    parser.add_argument("--_forward-us", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args._forward_us:
        name, mode, repeat, calls = args._forward_us
        print(forward_us(name, mode, int(repeat), int(calls)))
        return 0
    if args.registration_cost:
        registration_cost(["tiny", "fpn-det"], args.repeat)
        return 0
    device = args.device
    chosen = list(dict.fromkeys(args.workloads + (list(workloads.EXTRA_NAMES) if args.extras else [])))
    groups = [
        ("standard workloads (docs/WORKLOADS.md)", [n for n in chosen if n in workloads.NAMES]),
        ("extra workloads (not in docs/WORKLOADS.md; built on single-level)", [n for n in chosen if n in workloads.EXTRA_NAMES]),
    ]
    total = len(chosen) * len(args.dtypes)
    print("measuring the copy bandwidth and multiply-add rate ...", file=sys.stderr, flush=True)
    bandwidth, fma_rate = machine_rates(device)
    print(
        f"# device={device} ({platform.processor() or platform.machine()}), threads={torch.get_num_threads()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}",
        flush=True,
    )
    print(f"# copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), {fma_rate / 1e9:.1f} G multiply-adds/s", flush=True)
    rows = []
    done = 0
    for title, group in groups:
        if not group:
            continue
        print(f"\n## {title}\n\n{HEADER}", flush=True)
        for name in group:
            for dname in args.dtypes:
                done += 1
                print(f"[{done}/{total}] {name} {dname} ...", file=sys.stderr, flush=True)
                run = measure_backward if args.backward else measure
                row = run(name, dname, device, args.repeat, torch.get_num_threads(), bandwidth, fma_rate)
                rows.append(row)
                print(table_row(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"# rows: {args.json}")
    if args.plot:
        fig = speedup_figure(rows, device, torch.get_num_threads())
        fig.savefig(args.plot, dpi=120)
        print(f"# plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
