"""torchvision's Mask R-CNN and Faster R-CNN with their RoI poolers in process and on a
roi-server, side by side in one run.

    python benchmarks/bench_pipeline.py                          # both models, 2 images of 800 x 1066
    python benchmarks/bench_pipeline.py --models maskrcnn --size 512x683 --repeat 3
    python benchmarks/bench_pipeline.py --address host:50051     # a server started elsewhere

Each model (random weights, seeded; ``box_score_thresh=0`` so that random weights still yield
the standard 100 detections per image) runs one forward per variant per round, the variants
taking turns round by round:

  torchvision     the stock model (torchvision's MultiScaleRoIAlign, in process)
  roi_kernels     roi_kernels.MultiScaleRoIAlign in process
  remote          roi_client.nn.RemoteMultiScaleRoIAlign: the pyramid uploaded once per forward,
                  shared by the box and mask heads (the default)
  remote-unshared the same with share_uploads=False: each pooler uploads its own copy
  remote-shm      the default through shared memory (a client on the server's host)

For each: the median forward time and the median time spent inside the poolers (timed around
the box and mask poolers' forward), their ratios to torchvision's, the request bytes the server
received per forward (its roi_received_bytes_total: messages only, so a shared-memory upload
shows as its headers) and the map bytes the client uploaded per forward, each over the FPN
pyramid's bytes, and whether the detections equal the stock model's bit for bit. Prints a Markdown table; --json keeps every
figure. The server is started here (on free ports, --allow-shared-memory) unless --address is
given; it shares this host's cores with the model, as a same-host deployment would.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import torch
import torchvision
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roi_client import RoIClient
from roi_client.nn import RemoteMultiScaleRoIAlign, SharedUploads
from server_process import Server, start_server

import roi_kernels

OUT = Path(__file__).resolve().parent / "out"
LEVELS = ["0", "1", "2", "3"]
VARIANTS = ["torchvision", "roi_kernels", "remote", "remote-unshared", "remote-shm"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(name: str, size: tuple[int, int], seed: int):
    torch.manual_seed(seed)
    ctor = {
        "maskrcnn": torchvision.models.detection.maskrcnn_resnet50_fpn,
        "fasterrcnn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    }[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ctor(weights=None, weights_backbone=None, min_size=min(size), max_size=max(size), box_score_thresh=0.0)
    return model.eval()


class Timed(torch.nn.Module):
    """A pooler whose forward time is added to ``clock[0]``."""

    def __init__(self, inner: torch.nn.Module, clock: list[float]) -> None:
        super().__init__()
        self.inner = inner
        self.clock = clock

    def forward(self, *args):
        start = time.perf_counter()
        out = self.inner(*args)
        self.clock[0] += time.perf_counter() - start
        return out


def variant(model, kind: str, clients: dict[str, RoIClient], clock: list[float]):
    m = copy.deepcopy(model)
    heads = m.roi_heads
    poolers = ["box_roi_pool"] + (["mask_roi_pool"] if heads.has_mask() else [])
    for attr in poolers:
        stock = getattr(heads, attr)
        args = (stock.featmap_names, stock.output_size, stock.sampling_ratio)
        if kind == "torchvision":
            pooler = stock
        elif kind == "roi_kernels":
            pooler = roi_kernels.MultiScaleRoIAlign(*args)
        elif kind == "remote":
            pooler = RemoteMultiScaleRoIAlign(*args, client=clients["wire"])
        elif kind == "remote-unshared":
            pooler = RemoteMultiScaleRoIAlign(*args, client=clients["wire"], share_uploads=False)
        elif kind == "remote-shm":
            pooler = RemoteMultiScaleRoIAlign(*args, client=clients["shm"])
        else:
            raise ValueError(kind)
        setattr(heads, attr, Timed(pooler, clock))
    return m


def received_bytes(url: str | None) -> float | None:
    if url is None:
        return None
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "roi_received_bytes_total":
                return s.value
    return 0.0


def same(got: list[dict], want: list[dict]) -> bool:
    return all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in w) and len(got) == len(want)


def run_model(name: str, args, server: Server, clients: dict[str, RoIClient]) -> list[dict]:
    model = build(name, args.size, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    h, w = args.size
    images = [torch.rand(3, h, w, generator=gen) for _ in range(args.images)]
    with torch.no_grad():
        feats = model.backbone(model.transform(images)[0].tensors)
    pyramid = sum(v.numel() * v.element_size() for k, v in feats.items() if k in LEVELS)
    del feats
    kinds = [k for k in VARIANTS if k in args.variants]
    clocks = {k: [0.0] for k in kinds}
    models = {k: variant(model, k, clients, clocks[k]) for k in kinds}
    rows = {k: {"forward": [], "pool": [], "bytes": [], "uploaded": [], "equal": True} for k in kinds}
    shared = {c: SharedUploads.of(client) for c, client in clients.items()}
    with torch.no_grad():
        want = models["torchvision"](images) if "torchvision" in models else model(images)
        for round_ in range(args.warmup + args.repeat):
            for k in kinds:
                clocks[k][0] = 0.0
                before = received_bytes(server.metrics_url)
                uploaded = sum(u.bytes_uploaded for u in shared.values())
                start = time.perf_counter()
                got = models[k](images)
                elapsed = time.perf_counter() - start
                after = received_bytes(server.metrics_url)
                rows[k]["equal"] &= same(got, want)
                if round_ >= args.warmup:
                    rows[k]["forward"].append(elapsed)
                    rows[k]["pool"].append(clocks[k][0])
                    rows[k]["uploaded"].append(sum(u.bytes_uploaded for u in shared.values()) - uploaded)
                    if before is not None:
                        rows[k]["bytes"].append(after - before)
            log(f"  {name} round {round_ + 1}/{args.warmup + args.repeat}")
    base = rows[kinds[0]]
    out = []
    for k in kinds:
        r = rows[k]
        fwd, pool = statistics.median(r["forward"]), statistics.median(r["pool"])
        sent = statistics.median(r["bytes"]) if r["bytes"] else 0.0
        uploaded = statistics.median(r["uploaded"])
        out.append(
            {
                "model": name,
                "variant": k,
                "forward_s": fwd,
                "pool_s": pool,
                "forward_ratio": fwd / statistics.median(base["forward"]),
                "pool_ratio": pool / statistics.median(base["pool"]),
                "bytes_per_forward": sent,
                "bytes_over_pyramid": sent / pyramid,
                "uploaded_bytes_per_forward": uploaded,
                "uploaded_over_pyramid": uploaded / pyramid,
                "pyramid_bytes": pyramid,
                "equal": r["equal"],
            }
        )
    return out


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["maskrcnn", "fasterrcnn"], choices=["maskrcnn", "fasterrcnn"])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--images", type=int, default=2, help="images per forward (default 2)")
    p.add_argument("--size", type=parse_size, default=(800, 1066), help="image HxW (default 800x1066)")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", help="an existing server (needs --metrics-url for the byte counts)")
    p.add_argument("--metrics-url")
    p.add_argument("--server-args", default="", help="extra roi-server flags for the server started here")
    p.add_argument("--json", type=Path, default=OUT / "pipeline.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.address:
        server = Server(args.address, args.metrics_url)
    else:
        server = start_server(["--allow-shared-memory", *args.server_args.split()], OUT / "bench_pipeline_server.log")
    log(f"server at {server.address}")
    clients = {"wire": RoIClient(server.address, timeout=600)}
    if "remote-shm" in args.variants:
        clients["shm"] = RoIClient(server.address, timeout=600, shared_memory=True)
    try:
        rows = []
        for name in args.models:
            rows += run_model(name, args, server, clients)
    finally:
        for c in clients.values():
            c.close()
        server.stop()

    print(
        f"\n{args.images} images of {args.size[0]} x {args.size[1]}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, {args.threads} torch threads, {os.cpu_count()} cores ({platform.machine()}); "
        f"medians of {args.repeat} rounds after {args.warmup} warm-up\n"
    )
    print(
        "| model | poolers | forward (s) | / torchvision | pooling (s) | / torchvision "
        "| request bytes / pyramid | maps uploaded / pyramid | detections = stock |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        remote = r["variant"].startswith("remote")
        sent = f"{r['bytes_over_pyramid']:.3f}x ({r['bytes_per_forward'] / 1e6:.0f} MB)" if remote else "-"
        up = f"{r['uploaded_over_pyramid']:.2f}x" if remote else "-"
        print(
            f"| {r['model']} | {r['variant']} | {r['forward_s']:.3f} | {r['forward_ratio']:.2f}x | {r['pool_s']:.3f} | "
            f"{r['pool_ratio']:.2f}x | {sent} | {up} | {'yes' if r['equal'] else 'NO'} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
