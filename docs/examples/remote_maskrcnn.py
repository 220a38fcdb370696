"""torchvision's Mask R-CNN with both RoI poolers on a roi-server, checked against the stock model.

    roi-server &                                    # the server, on localhost:50051
    python docs/examples/remote_maskrcnn.py         # or: --address host:port --size 800x1066

Random weights (nothing to download), so the detections mean nothing, but they are compared bit
for bit with the stock model's; the script prints how many bytes the server received for the
forward next to the FPN pyramid's size (the box and mask heads share one upload).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torchvision
from roi_client import RoIClient
from roi_client.nn import RemoteMultiScaleRoIAlign, SharedUploads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--size", default="320x427", help="image HxW (default 320x427)")
    p.add_argument("--images", type=int, default=2)
    args = p.parse_args()
    h, w = (int(s) for s in args.size.split("x"))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=min(h, w), max_size=max(h, w), box_score_thresh=0.0
        ).eval()
    images = [torch.rand(3, h, w) for _ in range(args.images)]

    client = RoIClient(args.address)
    remote = copy.deepcopy(model)
    # The three lines a pipeline author writes (with the client above):
    heads = remote.roi_heads
    heads.box_roi_pool = RemoteMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, client=client)
    heads.mask_roi_pool = RemoteMultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2, client=client)

    with torch.no_grad():
        start = time.perf_counter()
        want = model(images)
        stock_s = time.perf_counter() - start
        uploads = SharedUploads.of(client)
        sent_before = uploads.bytes_uploaded
        start = time.perf_counter()
        got = remote(images)
        remote_s = time.perf_counter() - start
    equal = all(torch.equal(g[k], v) for g, d in zip(got, want) for k, v in d.items())
    detections = sum(len(d["boxes"]) for d in want)
    print(f"{detections} detections over {len(images)} images; equal to the stock model's: {equal}")
    print(f"forward: stock {stock_s:.2f} s, remote poolers {remote_s:.2f} s")
    print(f"feature bytes uploaded: {(uploads.bytes_uploaded - sent_before) / 1e6:.1f} MB in {uploads.uploads} upload(s)")
    client.close()
    raise SystemExit(0 if equal else 1)


if __name__ == "__main__":
    main()
