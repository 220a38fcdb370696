"""Feature handles against inline maps: one detector forward pass's pooling through roi-server.

    python benchmarks/bench_features.py                       # starts a roi-server of its own
    python benchmarks/bench_features.py --runs 9 --dtype float16
    python benchmarks/bench_features.py --address 127.0.0.1:50051 --metrics-url http://127.0.0.1:9100/metrics

A forward pass pools one FPN pyramid (``fpn-det``'s four levels, docs/WORKLOADS.md) several
times: Mask R-CNN's box head (``fpn-det``: 1,000 boxes, 7 x 7) and mask head (``fpn-mask``: 100
boxes, 14 x 14), and Cascade R-CNN's three box stages plus the mask head. Each scenario runs
two ways, side by side in one process: ``inline``, every request carrying the pyramid, and
``handle``, the pyramid uploaded once (``client.features``) and every request naming it, then
released. Both are timed from the first byte sent to the last result received, several runs
after a warm-up; the median is kept, and the bytes the server received per forward pass
(``roi_received_bytes_total``) are read from its metrics. The results of the two ways are
checked equal bit for bit.
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from server_process import Server, start_server  # noqa: E402
from workloads import draw_boxes, make  # noqa: E402

from roi_client import RoIClient, reuse_freed_memory  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def received_bytes(url: str | None) -> float | None:
    if url is None:
        return None
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r"^roi_received_bytes_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def scenarios(dtype: torch.dtype, seed: int) -> dict[str, tuple[list, list, list[tuple]]]:
    """{name: (levels, image_sizes, [(boxes, output_size), ...])}: the pooling calls of one
    forward pass over one pyramid."""
    det = make("fpn-det", dtype, seed)
    mask = make("fpn-mask", dtype, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    stages = [draw_boxes(gen, 1000, det.image_sizes) for _ in range(2)]
    return {
        "mask-rcnn (box 1000 + mask 100)": (det.maps, det.image_sizes, [(det.boxes, 7), (mask.boxes, 14)]),
        "cascade (3 x box 1000 + mask 100)": (
            det.maps,
            det.image_sizes,
            [(det.boxes, 7), (stages[0], 7), (stages[1], 7), (mask.boxes, 14)],
        ),
    }


def forward_inline(client: RoIClient, levels, sizes, calls) -> list:
    return [client.multiscale_roi_align(levels, boxes, sizes, out, 2, True) for boxes, out in calls]


def forward_handle(client: RoIClient, levels, sizes, calls) -> list:
    with client.features(levels, image_sizes=sizes, keep=False) as fm:
        return [fm.multiscale_roi_align(boxes, out, 2, True) for boxes, out in calls]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="timed runs of each way (after one warm-up)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", help="a running roi-server instead of one started here")
    p.add_argument("--metrics-url", help="its /metrics (for the bytes received)")
    p.add_argument("--server-args", default="", help="flags for the roi-server this script starts")
    args = p.parse_args()
    reuse_freed_memory()
    if args.address:
        server = Server(args.address, args.metrics_url)
    else:
        server = start_server(shlex.split(args.server_args), ROOT / "out" / "bench_features_server.log")
    command = "python benchmarks/bench_features.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"`{command}` against {server.address}, {args.dtype}, median of {args.runs} runs after a warm-up\n")
    print("| scenario | way | forward pass (ms) | MB received per pass | inline / handle |")
    print("|---|---|---:|---:|---:|")
    try:
        with RoIClient(server.address, timeout=300) as client:
            for name, (levels, sizes, calls) in scenarios(DTYPES[args.dtype], args.seed).items():
                times: dict[str, list[float]] = {"inline": [], "handle": []}
                sent: dict[str, float | None] = {}
                outputs: dict[str, list] = {}
                ways = {"inline": forward_inline, "handle": forward_handle}
                for way, fn in ways.items():
                    outputs[way] = fn(client, levels, sizes, calls)  # warm-up
                for _ in range(args.runs):
                    # Alternated, so that the machine's noise falls on both ways alike.
                    for way, fn in ways.items():
                        before = received_bytes(server.metrics_url)
                        start = time.perf_counter()
                        fn(client, levels, sizes, calls)
                        times[way].append(time.perf_counter() - start)
                        after = received_bytes(server.metrics_url)
                        sent[way] = None if before is None or after is None else after - before
                for a, b in zip(outputs["inline"], outputs["handle"]):
                    if not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
                        raise AssertionError(f"{name}: the handle's result differs from the inline one")
                med = {way: statistics.median(t) for way, t in times.items()}
                for way in ways:
                    mb = f"{sent[way] / 1e6:.1f}" if sent[way] is not None else "-"
                    ratio = f"{med['inline'] / med['handle']:.2f}x" if way == "handle" else ""
                    spread = f" ({min(times[way]) * 1e3:.0f}-{max(times[way]) * 1e3:.0f})"
                    print(f"| {name} | {way} | {med[way] * 1e3:.0f}{spread} | {mb} | {ratio} |")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
