"""The standard workloads of docs/WORKLOADS.md as numpy arrays, and custom ones from the command line.

The client package does not depend on torch, so the boxes come from numpy's seeded generator
with the same distribution as the benchmarks' torch generator (log-uniform side in [16, 512],
log-uniform aspect in [0.5, 2], uniform centre, clipped to the image). Shapes, box counts and
costs match the benchmarks' workloads; the values differ. The service benchmark passes its own
arrays (``Workload.from_arrays``) so that every contender sees the very same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

OPS = (
    "roi_align",
    "roi_pool",
    "ps_roi_align",
    "ps_roi_pool",
    "roi_align_rotated",
    "multiscale_roi_align",
    "ragged_roi_align",
)

DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


@dataclass
class Workload:
    """One request's inputs and parameters.

    ``maps`` is ``[ndarray[N, C, H, W]]`` for the single-map ops, the FPN levels (finest first,
    each ``[N, C, H_l, W_l]``) for ``multiscale_roi_align``, or one ``[C, H_i, W_i]`` per image
    for ``ragged_roi_align``. ``boxes`` is ``float32[K, 5]`` (image index, x1, y1, x2, y2) in
    image pixels, ``[K, 6]`` (index, cx, cy, w, h, degrees) for ``roi_align_rotated``.
    """

    name: str
    op: str
    maps: list
    boxes: np.ndarray
    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = 2
    aligned: bool = True
    pool_mode: str = "avg"
    image_sizes: list = field(default_factory=list)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def dtype(self) -> str:
        return np.dtype(self.maps[0].dtype).name

    @property
    def out_channels(self) -> int:
        c = int(self.maps[0].shape[-3])
        if self.op.startswith("ps_"):
            return c // (self.output_size[0] * self.output_size[1])
        return c

    def input_bytes(self) -> int:
        """Tensor payload of a request (maps and boxes), without the message framing."""
        return sum(int(m.nbytes) for m in self.maps) + int(self.boxes.nbytes)

    def output_bytes(self) -> int:
        ph, pw = self.output_size
        return self.num_boxes * self.out_channels * ph * pw * self.maps[0].itemsize

    def describe(self) -> str:
        shapes = ", ".join("x".join(str(s) for s in m.shape) for m in self.maps[:4])
        if len(self.maps) > 4:
            shapes += f", ... ({len(self.maps)} maps)"
        ph, pw = self.output_size
        return (
            f"{self.name}: {self.op} {ph}x{pw}, {self.num_boxes} boxes, maps {shapes} {self.dtype}, "
            f"{self.input_bytes() / 1e6:.3g} MB sent / {self.output_bytes() / 1e6:.3g} MB received per request "
            "(tensor payloads)"
        )

    def astype(self, dtype: str) -> Workload:
        np_dtype = DTYPES[dtype]
        return replace(self, maps=[np.ascontiguousarray(m.astype(np_dtype)) for m in self.maps])

    @classmethod
    def from_arrays(cls, name: str, op: str, maps, boxes, **params) -> Workload:
        """Wraps arrays made elsewhere (e.g. ``benchmarks/workloads.py``'s tensors, through
        ``.numpy()``) so the load tester sends exactly those inputs."""
        return cls(name, op, [np.ascontiguousarray(m) for m in maps], np.ascontiguousarray(boxes, np.float32), **params)


def draw_boxes(rng: np.random.Generator, num: int, image_sizes: list[tuple[int, int]]) -> np.ndarray:
    """``float32[num, 5]``: docs/WORKLOADS.md's box generator, with numpy's generator."""
    s = np.exp(rng.uniform(math.log(16), math.log(512), num))
    a = np.exp(rng.uniform(math.log(0.5), math.log(2), num))
    w, h = s * np.sqrt(a), s / np.sqrt(a)
    idx = rng.integers(0, len(image_sizes), num)
    sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    ih, iw = sizes[idx, 0], sizes[idx, 1]
    cx, cy = rng.uniform(0, 1, num) * iw, rng.uniform(0, 1, num) * ih
    x1 = np.clip(cx - w / 2, 0, iw)
    x2 = np.clip(cx + w / 2, 0, iw)
    y1 = np.clip(cy - h / 2, 0, ih)
    y2 = np.clip(cy + h / 2, 0, ih)
    return np.stack([idx.astype(np.float64), x1, y1, x2, y2], axis=1).astype(np.float32)


def to_rotated(rng: np.random.Generator, boxes: np.ndarray) -> np.ndarray:
    """``[K, 6]`` rotated boxes with the same centres and sizes, angles uniform in [-90, 90)."""
    idx, x1, y1, x2, y2 = boxes.T.astype(np.float64)
    angle = rng.uniform(-90, 90, len(idx))
    out = np.stack([idx, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, angle], axis=1)
    return out.astype(np.float32)


def _randn(rng: np.random.Generator, *shape, dtype=np.float32) -> np.ndarray:
    # Random data, never zeros: zeros hide unwritten outputs and run faster than real data.
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)


NAMES = ("tiny", "single-level", "single-level-pool", "c4-small", "fpn-det", "fpn-mask", "ragged-8")


def make(name: str, dtype: str = "float32", seed: int = 0) -> Workload:
    """Builds a standard workload (``single-level-pool`` is single-level's roi_pool half)."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    if name == "tiny":
        return Workload(name, "roi_align", [_randn(rng, 1, 64, 16, 16, dtype=dt)], draw_boxes(rng, 8, [(256, 256)]),
                        (7, 7), 1 / 16)
    if name in ("single-level", "single-level-pool"):
        op = "roi_pool" if name.endswith("pool") else "roi_align"
        return Workload(name, op, [_randn(rng, 2, 256, 50, 68, dtype=dt)],
                        draw_boxes(rng, 512, [(800, 1088)] * 2), (7, 7), 1 / 16)
    if name == "c4-small":
        return Workload(name, "roi_align", [_randn(rng, 1, 1024, 50, 68, dtype=dt)],
                        draw_boxes(rng, 128, [(800, 1088)]), (14, 14), 1 / 16, sampling_ratio=0)
    if name in ("fpn-det", "fpn-mask"):
        maps = [_randn(rng, 1, 256, 200 // 2**i, 272 // 2**i, dtype=dt) for i in range(4)]
        num, out = (1000, (7, 7)) if name == "fpn-det" else (100, (14, 14))
        return Workload(name, "multiscale_roi_align", maps, draw_boxes(rng, num, [(800, 1088)]), out,
                        image_sizes=[(800, 1088)])
    if name == "ragged-8":
        sizes = [(int(rng.integers(480, 1334)), int(rng.integers(480, 1334))) for _ in range(8)]
        maps = [_randn(rng, 256, -(-h // 16), -(-w // 16), dtype=dt) for h, w in sizes]
        boxes = np.concatenate([draw_boxes(rng, 256, [s]) for s in sizes])
        boxes[:, 0] = np.repeat(np.arange(8), 256)
        return Workload(name, "ragged_roi_align", maps, boxes, (7, 7), 1 / 16, image_sizes=sizes)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(NAMES)}")


def customize(
    base: Workload,
    *,
    op: str | None = None,
    boxes: int | None = None,
    map_shape: tuple[int, ...] | None = None,
    images: int | None = None,
    levels: int | None = None,
    output_size: tuple[int, int] | None = None,
    spatial_scale: float | None = None,
    sampling_ratio: int | None = None,
    aligned: bool | None = None,
    pool_mode: str | None = None,
    seed: int = 0,
) -> Workload:
    """A workload derived from ``base`` with the given fields replaced; maps and boxes are drawn
    anew when their shape changes.

    ``map_shape`` is ``(C, H, W)`` of one image's map (the finest level for
    ``multiscale_roi_align``, whose ``levels`` maps halve H and W each); the image size is
    ``(H, W) / spatial_scale``.
    """
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    rng = np.random.default_rng(seed + 1)
    dt = base.maps[0].dtype
    new_op = op or base.op
    w = replace(
        base,
        name=base.name if all(v is None for v in (op, boxes, map_shape, images, levels)) else "custom",
        op=new_op,
        output_size=output_size or base.output_size,
        spatial_scale=base.spatial_scale if spatial_scale is None else spatial_scale,
        sampling_ratio=base.sampling_ratio if sampling_ratio is None else sampling_ratio,
        aligned=base.aligned if aligned is None else aligned,
        pool_mode=pool_mode or base.pool_mode,
    )
    reshape = map_shape is not None or images is not None or levels is not None or (
        op is not None and _layout(new_op) != _layout(base.op)
    )
    if reshape:
        if map_shape is None:
            m = base.maps[0]
            map_shape = tuple(int(s) for s in m.shape[-3:])
        c, h, wd = map_shape
        n = images or (len(base.maps) if _layout(base.op) == "ragged" else int(base.maps[0].shape[0]))
        if _layout(new_op) == "multiscale":
            nlev = levels or 4
            scale = 1 / 4 if spatial_scale is None and _layout(base.op) != "multiscale" else w.spatial_scale
            if _layout(base.op) == "multiscale" and spatial_scale is None:
                scale = _finest_scale(base)
            maps = [_randn(rng, n, c, max(h // 2**i, 1), max(wd // 2**i, 1), dtype=dt) for i in range(nlev)]
            img = (round(h / scale), round(wd / scale))
            w = replace(w, maps=maps, image_sizes=[img] * n, spatial_scale=scale)
        elif _layout(new_op) == "ragged":
            maps = [_randn(rng, c, h, wd, dtype=dt) for _ in range(n)]
            img = (round(h / w.spatial_scale), round(wd / w.spatial_scale))
            w = replace(w, maps=maps, image_sizes=[img] * n)
        else:
            maps = [_randn(rng, n, c, h, wd, dtype=dt)]
            img = (round(h / w.spatial_scale), round(wd / w.spatial_scale))
            w = replace(w, maps=maps, image_sizes=[img] * n)
    if reshape or boxes is not None or (op is not None and (new_op == "roi_align_rotated") != (base.op == "roi_align_rotated")):
        k = boxes if boxes is not None else base.num_boxes
        sizes = w.image_sizes or _image_sizes(w)
        b = draw_boxes(rng, k, sizes)
        if new_op == "roi_align_rotated":
            b = to_rotated(rng, b)
        w = replace(w, boxes=b)
    return w


def _layout(op: str) -> str:
    if op == "multiscale_roi_align":
        return "multiscale"
    if op == "ragged_roi_align":
        return "ragged"
    return "single"


def _finest_scale(w: Workload) -> float:
    h = max(s[0] for s in w.image_sizes)
    return 2.0 ** round(math.log2(w.maps[0].shape[-2] / h))


def _image_sizes(w: Workload) -> list[tuple[int, int]]:
    if _layout(w.op) == "ragged":
        return [(round(m.shape[-2] / w.spatial_scale), round(m.shape[-1] / w.spatial_scale)) for m in w.maps]
    m = w.maps[0]
    scale = _finest_scale(w) if _layout(w.op) == "multiscale" else w.spatial_scale
    return [(round(m.shape[-2] / scale), round(m.shape[-1] / scale))] * int(m.shape[0])
