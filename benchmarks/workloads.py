"""The standard workloads of docs/WORKLOADS.md as inputs: feature maps and boxes, seeded.

Shared by the kernel benchmark and the service benchmarks so that every tool measures the
same thing.

docs/WORKLOADS.md gives no shape for the position-sensitive ops or for rotated boxes, so three
extra workloads (``EXTRA_NAMES``, named ``extra-*`` so that no table mistakes them for standard
ones) reuse ``single-level``'s images, map size, stride and box draw:

* ``extra-ps-align`` / ``extra-ps-pool``: R-FCN's score maps for 21 classes (VOC) on a 7 x 7
  grid, 21 * 49 = 1029 channels; ps_roi_align (sampling_ratio 2) / ps_roi_pool, 7 x 7.
* ``extra-rotated``: the 256-channel map; each box keeps its centre and size and gets an angle
  uniform in [-90, 90) degrees; roi_align_rotated 7 x 7, sampling_ratio 2, aligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Workload:
    name: str
    # roi_align | roi_pool | multiscale_roi_align | ragged_roi_align (standard);
    # ps_roi_align | ps_roi_pool | roi_align_rotated (extra)
    op: str
    maps: list  # list of Tensor: [N, C, H, W] (one map or FPN levels) or [C, H, W] (ragged)
    boxes: torch.Tensor  # Tensor[K, 5] in image pixels; Tensor[K, 6] (cx, cy, w, h, angle) if rotated
    output_size: tuple[int, int]
    spatial_scale: float = 1.0  # single-map and ragged ops
    sampling_ratio: int = 2
    aligned: bool = True
    image_sizes: list = field(default_factory=list)  # multiscale: (h, w) per image

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def channels(self) -> int:
        m = self.maps[0]
        return int(m.shape[-3])

    @property
    def channels_out(self) -> int:
        """Channels of the output: the input's, or C / (PH * PW) for the position-sensitive ops."""
        if self.op.startswith("ps_"):
            return self.channels // (self.output_size[0] * self.output_size[1])
        return self.channels

    def input_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.maps) + self.boxes.numel() * 4

    def output_elements(self) -> int:
        return self.num_boxes * self.channels_out * self.output_size[0] * self.output_size[1]


def draw_boxes(gen: torch.Generator, num: int, image_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """docs/WORKLOADS.md's box generator: log-uniform side in [16, 512], aspect in [0.5, 2]."""
    u = lambda: torch.rand(num, generator=gen, dtype=torch.float64)  # noqa: E731
    s = torch.exp(math.log(16) + u() * (math.log(512) - math.log(16)))
    a = torch.exp(math.log(0.5) + u() * (math.log(2) - math.log(0.5)))
    w, h = s * a.sqrt(), s / a.sqrt()
    idx = torch.randint(0, len(image_sizes), (num,), generator=gen)
    ih = torch.tensor([float(image_sizes[i][0]) for i in idx.tolist()], dtype=torch.float64)
    iw = torch.tensor([float(image_sizes[i][1]) for i in idx.tolist()], dtype=torch.float64)
    cx, cy = u() * iw, u() * ih
    x1 = torch.minimum(torch.clamp(cx - w / 2, min=0), iw)
    x2 = torch.minimum(torch.clamp(cx + w / 2, min=0), iw)
    y1 = torch.minimum(torch.clamp(cy - h / 2, min=0), ih)
    y2 = torch.minimum(torch.clamp(cy + h / 2, min=0), ih)
    return torch.stack([idx.to(torch.float64), x1, y1, x2, y2], dim=1).to(torch.float32)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(dtype)


NAMES = ("tiny", "single-level", "single-level-pool", "c4-small", "fpn-det", "fpn-mask", "ragged-8")
EXTRA_NAMES = ("extra-ps-align", "extra-ps-pool", "extra-rotated")


def make(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Workload:
    """Builds the named workload (``single-level-pool`` is single-level's roi_pool half; the
    ``extra-*`` workloads are described in the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if name == "tiny":
        return Workload(
            name, "roi_align", [_randn(gen, 1, 64, 16, 16, dtype=dtype)], draw_boxes(gen, 8, [(256, 256)]), (7, 7), 1 / 16
        )
    if name in ("single-level", "single-level-pool"):
        sizes = [(800, 1088)] * 2
        op = "roi_pool" if name.endswith("pool") else "roi_align"
        return Workload(
            name, op, [_randn(gen, 2, 256, 50, 68, dtype=dtype)], draw_boxes(gen, 512, sizes), (7, 7), 1 / 16
        )
    if name == "c4-small":
        return Workload(
            name,
            "roi_align",
            [_randn(gen, 1, 1024, 50, 68, dtype=dtype)],
            draw_boxes(gen, 128, [(800, 1088)]),
            (14, 14),
            1 / 16,
            sampling_ratio=0,
        )
    if name in ("fpn-det", "fpn-mask"):
        maps = [_randn(gen, 1, 256, 200 // 2**i, 272 // 2**i, dtype=dtype) for i in range(4)]
        num, out = (1000, (7, 7)) if name == "fpn-det" else (100, (14, 14))
        return Workload(
            name,
            "multiscale_roi_align",
            maps,
            draw_boxes(gen, num, [(800, 1088)]),
            out,
            image_sizes=[(800, 1088)],
        )
    if name == "ragged-8":
        sizes = [
            (int(torch.randint(480, 1334, (1,), generator=gen)), int(torch.randint(480, 1334, (1,), generator=gen)))
            for _ in range(8)
        ]
        maps = [_randn(gen, 256, -(-h // 16), -(-w // 16), dtype=dtype) for h, w in sizes]
        boxes = torch.cat([draw_boxes(gen, 256, [s]) for s in sizes])
        boxes[:, 0] = torch.arange(8).repeat_interleave(256).float()
        return Workload(name, "ragged_roi_align", maps, boxes, (7, 7), 1 / 16)
    if name in EXTRA_NAMES:
        sizes = [(800, 1088)] * 2
        if name == "extra-rotated":
            maps = [_randn(gen, 2, 256, 50, 68, dtype=dtype)]
            b = draw_boxes(gen, 512, sizes).double()
            angle = torch.rand(512, generator=gen, dtype=torch.float64) * 180 - 90
            cx, cy = (b[:, 1] + b[:, 3]) / 2, (b[:, 2] + b[:, 4]) / 2
            rois = torch.stack([b[:, 0], cx, cy, b[:, 3] - b[:, 1], b[:, 4] - b[:, 2], angle], 1).float()
            return Workload(name, "roi_align_rotated", maps, rois, (7, 7), 1 / 16)
        op = "ps_roi_align" if name == "extra-ps-align" else "ps_roi_pool"
        maps = [_randn(gen, 2, 21 * 49, 50, 68, dtype=dtype)]
        return Workload(name, op, maps, draw_boxes(gen, 512, sizes), (7, 7), 1 / 16)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(NAMES + EXTRA_NAMES)}")


def samples_per_box(w: Workload) -> torch.Tensor:
    """Bilinear samples each box takes (for the arithmetic floor), per the op's sampling rule."""
    ph, pw = w.output_size
    if w.op in ("roi_pool", "ps_roi_pool"):
        return torch.zeros(w.num_boxes)
    if w.sampling_ratio > 0:
        return torch.full((w.num_boxes,), float(w.sampling_ratio**2 * ph * pw))
    scale = w.spatial_scale
    bw = (w.boxes[:, 3] - w.boxes[:, 1]) * scale / pw
    bh = (w.boxes[:, 4] - w.boxes[:, 2]) * scale / ph
    return torch.ceil(bw).clamp(min=0) * torch.ceil(bh).clamp(min=0) * ph * pw
