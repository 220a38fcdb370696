"""Runs batches of decoded requests through the roi_kernels ops on one device.

One engine owns one device and one worker thread: every kernel call of the process goes
through that thread, so that all requests meet in one batcher and no two launches compete for
the device. On the CPU a batch is computed where it is launched. On CUDA a launch packs the
batch's tensors into one pinned host buffer, copies it to the device on a copy stream and
queues the kernel on a compute stream, then returns; a second thread waits for the result. The
worker is then free to stage the next batch, so its host-to-device copy overlaps the kernel of
the one before.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .codec import ALL_OPS, DecodedRequest

log = logging.getLogger(__name__)

# Each staged tensor starts on this boundary in the pinned buffer, so that the device views
# are aligned for any dtype (and for vectorised loads).
_ALIGN = 256


class DeviceError(RuntimeError):
    """The requested device cannot be used (no GPU, or kernels built without CUDA)."""


def cuda_kernels_registered() -> bool:
    """Whether the loaded extension has CUDA kernels (it may be a CPU-only build)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("roi_kernels::roi_align", "CUDA")


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks the first GPU when torch sees one and the kernels have CUDA code."""
    if spec == "auto":
        if torch.cuda.is_available() and cuda_kernels_registered():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec}: torch sees no CUDA device")
        if not cuda_kernels_registered():
            raise DeviceError(f"device {spec}: roi_kernels was built without CUDA (ROI_KERNELS_CUDA=0?)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def pack_layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of ``tensors`` packed one after another on ``_ALIGN`` boundaries, and the
    total size."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        nbytes = t.numel() * t.element_size()
        total += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets, total


def pack_into(buffer: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    """Copies each tensor into the uint8 ``buffer`` at its offset."""
    for t, off in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        if nbytes:
            buffer[off : off + nbytes].view(t.dtype).view(t.shape).copy_(t)


def carve(buffer: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> list[torch.Tensor]:
    """Views of the uint8 ``buffer`` shaped like ``tensors`` (the inverse of :func:`pack_into`)."""
    views = []
    for t, off in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        if nbytes:
            views.append(buffer[off : off + nbytes].view(t.dtype).view(t.shape))
        else:
            views.append(torch.empty(t.shape, dtype=t.dtype, device=buffer.device))
    return views


def _offset_rois(reqs: Sequence[DecodedRequest]) -> torch.Tensor:
    """The requests' rois in one tensor, each request's image indices shifted past the images
    of the requests before it. (In numpy: a handful of torch calls on such small tensors
    cost more than the kernel of a small batch.)"""
    if len(reqs) == 1:
        return reqs[0].rois
    rois = np.concatenate([r.rois.numpy() for r in reqs])
    starts = np.cumsum([0] + [r.num_images for r in reqs[:-1]])
    rois[:, 0] += np.repeat(starts, [r.num_boxes for r in reqs]).astype(rois.dtype)
    return torch.from_numpy(rois)


def call_op(reqs: Sequence[DecodedRequest], maps: Sequence[Sequence[torch.Tensor]], rois: torch.Tensor) -> torch.Tensor:
    """One op call for compatible requests (equal :attr:`DecodedRequest.key`).

    ``maps[i]`` are request i's maps and ``rois`` the offset rois, on the device. A single
    request is passed exactly as ``roi_kernels`` would pass it, so that the service's result
    is the in-process one; several go to the op's ragged form as per-image views of their
    maps: one launch for maps of any sizes, with no copy to join them.
    """
    ops = torch.ops.roi_kernels
    r = reqs[0]
    ph, pw = r.pooled_height, r.pooled_width
    single = len(reqs) == 1
    if r.op == "multiscale_roi_align":
        tail = (ph, pw, r.sampling_ratio, r.aligned, r.pool_mode, r.canonical_scale, r.canonical_level)
        if single:
            return ops.multiscale_roi_align(list(maps[0]), rois, list(r.scales), *tail)
        # Level-major: every image of level 0, then of level 1, ...
        images = [image for level in zip(*maps) for m in level for image in m.unbind(0)]
        return ops.multiscale_roi_align_ragged(images, rois, list(r.scales), *tail)
    args = {
        "roi_align": (r.spatial_scale, ph, pw, r.sampling_ratio, r.aligned, r.pool_mode),
        "roi_pool": (r.spatial_scale, ph, pw),
        "ps_roi_align": (r.spatial_scale, ph, pw, r.sampling_ratio),
        "ps_roi_pool": (r.spatial_scale, ph, pw),
        "roi_align_rotated": (r.spatial_scale, ph, pw, r.sampling_ratio, r.aligned),
    }.get(r.op)
    if args is None:
        raise ValueError(f"unknown op {r.op}")
    if single and r.layout == "dense":
        return getattr(ops, r.op)(maps[0][0], rois, *args)
    # A dense request's images are views of its map [N, C, H, W]; a ragged one's (roi_align
    # only) are its maps.
    images = [image for req, m in zip(reqs, maps) for image in (m[0].unbind(0) if req.layout == "dense" else m)]
    return getattr(ops, r.op + "_ragged")(images, rois, *args)


def output_region_tensor(reqs: Sequence[DecodedRequest]) -> torch.Tensor | None:
    """The client's output region as the tensor the kernel may write its result into, for a
    batch of one request that asked for its result there in the dtype it is computed in (the
    output of a larger batch holds several requests' results; one in another dtype is a
    conversion anyway). The CPU kernels then write straight into the region (the
    ``_place_output`` op)."""
    if len(reqs) != 1:
        return None
    r = reqs[0]
    if r.output_view is None or r.out_dtype != r.dtype or r.num_boxes == 0:
        return None
    return torch.frombuffer(r.output_view, dtype=torch.uint8).view(r.dtype)


def split_output(out: torch.Tensor, reqs: Sequence[DecodedRequest]) -> list[torch.Tensor]:
    parts = out.split([r.num_boxes for r in reqs], dim=0) if len(reqs) > 1 else [out]
    return [p if p.dtype == r.out_dtype else p.to(r.out_dtype) for p, r in zip(parts, reqs)]


@dataclass
class Launched:
    """A launched batch. On the CPU it is already done; on CUDA :meth:`wait` blocks until the
    results are on the host."""

    reqs: Sequence[DecodedRequest]
    outputs: list[torch.Tensor] | None = None
    compute_s: float = 0.0
    _host_out: torch.Tensor | None = None
    _start: torch.cuda.Event | None = None
    _done: torch.cuda.Event | None = None

    @property
    def done(self) -> bool:
        return self.outputs is not None

    def wait(self) -> None:
        if self.outputs is not None:
            return
        assert self._done is not None and self._start is not None and self._host_out is not None
        self._done.synchronize()
        self.compute_s = self._start.elapsed_time(self._done) / 1e3
        self.outputs = split_output(self._host_out, self.reqs)


class KernelEngine:
    """The device, its worker thread, and the ops that work on it."""

    def __init__(self, device: torch.device, threads: int = 0) -> None:
        self.device = device
        self.threads = threads
        self.available_ops: frozenset[str] = frozenset()
        self._is_cuda = device.type == "cuda"
        # A CUDA launch returns before the kernel ends, so the worker can stage the next batch
        # meanwhile; on the CPU a launch is the computation and a second batch would only wait.
        self.pipeline_depth = 2 if self._is_cuda else 1
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="roi-kernels", initializer=self._init_thread)
        self.waiter = ThreadPoolExecutor(1, thread_name_prefix="roi-results") if self._is_cuda else None
        self._copy_stream: torch.cuda.Stream | None = None
        self._compute_stream: torch.cuda.Stream | None = None
        self._lock = threading.Lock()

    def _init_thread(self) -> None:
        # torch's intra-op thread count is read per calling thread by OpenMP; set it where the
        # kernels run.
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        if self._is_cuda:
            torch.cuda.set_device(self.device)

    @property
    def num_threads(self) -> int:
        return self.threads if self.threads > 0 else torch.get_num_threads()

    # -- start-up -------------------------------------------------------------------------------

    def load_and_warm_up(self) -> frozenset[str]:
        """Runs on the worker thread: every op once per dtype on small inputs, so that the
        first request pays no one-time costs. An op that fails is left out (and logged)."""
        if self._is_cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._compute_stream = torch.cuda.Stream(self.device)
        gen = torch.Generator().manual_seed(0)
        available = set()
        for op in ALL_OPS:
            try:
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    for reqs in _warm_up_requests(op, dtype, gen):
                        launched = self.launch(reqs)
                        launched.wait()
                available.add(op)
            except Exception as exc:  # noqa: BLE001  (any failure means the op is unusable here)
                log.warning("op %s does not run on %s and is not served: %s", op, self.device, str(exc).splitlines()[0])
        self.available_ops = frozenset(available)
        return self.available_ops

    # -- batches ----------------------------------------------------------------------------

    def launch(self, reqs: Sequence[DecodedRequest]) -> Launched:
        """Runs on the worker thread (or for a small CPU batch, the event loop). Raises what the
        op raises."""
        # Inference mode: the ops' autograd formulas (roi_kernels._autograd) are not even
        # dispatched to, which saves 10-30 us of Python per call (benchmarks/RESULTS.md, the backward).
        with torch.inference_mode():
            return self._launch(reqs)

    def _launch(self, reqs: Sequence[DecodedRequest]) -> Launched:
        if not self._is_cuda:
            start = time.perf_counter()
            region = output_region_tensor(reqs)
            if region is not None:
                torch.ops.roi_kernels._place_output(region)
            try:
                out = call_op(reqs, [r.maps for r in reqs], _offset_rois(reqs))
            finally:
                if region is not None:
                    torch.ops.roi_kernels._place_output(None)
            outputs = split_output(out, reqs)
            return Launched(reqs, outputs=outputs, compute_s=time.perf_counter() - start)
        return self._launch_cuda(reqs)

    def _launch_cuda(self, reqs: Sequence[DecodedRequest]) -> Launched:
        copy_stream, compute_stream = self._copy_stream, self._compute_stream
        assert copy_stream is not None and compute_stream is not None
        rois = _offset_rois(reqs)
        # Maps of feature handles are on the device already (roi_server.features); the
        # others are staged.
        host_tensors = [t for r in reqs for t in r.maps if t.device.type == "cpu"] + [rois]
        offsets, total = pack_layout(host_tensors)
        # Pinned memory from torch's caching host allocator: reused across batches, and not
        # handed out again until the copy that reads it has finished.
        staging = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        pack_into(staging, host_tensors, offsets)
        start = torch.cuda.Event(enable_timing=True)
        done = torch.cuda.Event(enable_timing=True)
        copied = torch.cuda.Event()
        with torch.cuda.stream(compute_stream):
            # Allocated on the compute stream, which is the last to use it.
            on_device = torch.empty(total, dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(copy_stream):
            start.record(copy_stream)
            on_device.copy_(staging, non_blocking=True)
            copied.record(copy_stream)
        with torch.cuda.stream(compute_stream):
            compute_stream.wait_event(copied)
            views = carve(on_device, host_tensors, offsets)
            maps, at = [], 0
            for r in reqs:
                mine = []
                for t in r.maps:
                    if t.device.type == "cpu":
                        mine.append(views[at])
                        at += 1
                    else:
                        # Read on this stream: its memory is not reused before the kernel
                        # ends, even if the handle is dropped meanwhile.
                        t.record_stream(compute_stream)
                        mine.append(t)
                maps.append(mine)
            out = call_op(reqs, maps, views[-1])
            host_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host_out.copy_(out, non_blocking=True)
            done.record(compute_stream)
        return Launched(reqs, _host_out=host_out, _start=start, _done=done)

    def release_cached_memory(self) -> None:
        """After running out of device memory: hands the allocator's cached free blocks back,
        so that the smaller launches that retry the batch start from a clean pool."""
        if self._is_cuda:
            torch.cuda.empty_cache()

    def memory_allocated(self) -> float:
        return float(torch.cuda.memory_allocated(self.device)) if self._is_cuda else 0.0

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
        if self.waiter is not None:
            self.waiter.shutdown(wait=True, cancel_futures=True)


def _warm_up_requests(op: str, dtype: torch.dtype, gen: torch.Generator) -> list[list[DecodedRequest]]:
    """A single request and a batch of two, small, for ``op`` in ``dtype``."""
    from .batch_keys import batch_key

    def make(n_images: int, h: int, w: int, layout: str = "dense") -> DecodedRequest:
        ph = pw = 2
        channels = 4 * ph * pw if op.startswith("ps_") else 4
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        k = 3
        if op == "roi_align_rotated":
            rois = torch.tensor([[0, 4.0, 4.0, 3.0, 2.0, 30.0]] * k, dtype=acc)
        else:
            rois = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0]] * k, dtype=acc)
        rois[:, 0] = torch.arange(k) % n_images
        if op == "multiscale_roi_align":
            maps = [torch.randn(n_images, channels, h // s, w // s, generator=gen).to(dtype) for s in (1, 2)]
            scales: tuple[float, ...] = (0.25, 0.125)
        elif layout == "ragged":
            maps = [torch.randn(channels, h + i, w, generator=gen).to(dtype) for i in range(n_images)]
            scales = ()
        else:
            maps = [torch.randn(n_images, channels, h, w, generator=gen).to(dtype)]
            scales = ()
        r = DecodedRequest(
            id="warm-up",
            op=op,
            layout="pyramid" if op == "multiscale_roi_align" else layout,
            maps=maps,
            rois=rois,
            num_images=n_images,
            channels=channels,
            out_channels=channels // (ph * pw) if op.startswith("ps_") else channels,
            pooled_height=ph,
            pooled_width=pw,
            spatial_scale=1.0,
            sampling_ratio=2,
            aligned=op == "roi_align_rotated",
            pool_mode="avg",
            canonical_scale=224,
            canonical_level=4,
            scales=scales,
            dtype=dtype,
            out_dtype=dtype,
            map_bytes=sum(t.numel() * t.element_size() for t in maps),
        )
        r.key = batch_key(r)
        return r

    single = [make(1, 8, 8)]
    pair = [make(2, 8, 8), make(1, 8, 8)]
    batches = [single, pair]
    if op == "roi_align":
        batches.append([make(2, 8, 8), make(2, 9, 7, layout="ragged")])
    return batches

