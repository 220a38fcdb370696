"""Shared pieces of the service and client tests: random requests with their in-process
reference results, servers (in process and as a roi-server subprocess), metric scraping.

The tests here check those pieces themselves, so that a failure elsewhere is not a fault of
the harness.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_boxes
from prometheus_client.parser import text_string_to_metric_families

import roi_kernels
from roi_client import EncodedRequest
from roi_server.server import BackgroundServer
from roi_server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
OPS = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated", "multiscale_roi_align")
LISTENING = re.compile(r"listening on (\S+):(\d+)")
METRICS_ON = re.compile(r"metrics on :(\d+)")

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# ---------------------------------------------------------------------------------------------
# Requests and their references


@dataclass
class Case:
    """A request and the in-process ``roi_kernels`` result on the same inputs."""

    name: str
    request: EncodedRequest
    reference: torch.Tensor

    def expected(self):
        """The reference as the client returns it: torch for torch maps, numpy otherwise
        (bfloat16 widened to float32)."""
        ref = self.reference
        if self.request.as_torch:
            return ref
        return (ref.float() if ref.dtype == torch.bfloat16 else ref).numpy()


def assert_bitwise_equal(got, want) -> None:
    """Equal bit for bit (so 0.0 and -0.0 differ, and NaNs must match)."""
    got_t = got if isinstance(got, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(got))
    want_t = want if isinstance(want, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(want))
    assert got_t.shape == want_t.shape, (got_t.shape, want_t.shape)
    assert got_t.dtype == want_t.dtype, (got_t.dtype, want_t.dtype)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got_t.element_size()]
    same = got_t.contiguous().view(bits) == want_t.contiguous().view(bits)
    if not bool(same.all()):
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{int((~same).sum())} of {same.numel()} elements differ; first at {bad}: "
            f"{got_t[tuple(bad)].item()} vs {want_t[tuple(bad)].item()}"
        )


def _maps(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def rotated_rois(gen: torch.Generator, k: int, image_h: float, image_w: float, num_images: int) -> torch.Tensor:
    u = lambda: torch.rand(k, generator=gen, dtype=torch.float64)  # noqa: E731
    side = torch.exp(math.log(16) + u() * (math.log(256) - math.log(16)))
    aspect = torch.exp(math.log(0.5) + u() * (math.log(2) - math.log(0.5)))
    rois = torch.stack(
        [
            torch.randint(0, num_images, (k,), generator=gen).double(),
            u() * image_w,
            u() * image_h,
            side * aspect.sqrt(),
            side / aspect.sqrt(),
            (u() - 0.5) * 360,
        ],
        dim=1,
    )
    return rois.float()


def make_case(
    op: str, gen: torch.Generator, dtype: str = "float32", variant: int = 0, num_images: int = 2, as_numpy: bool = False
) -> Case:
    """A random request for ``op`` in ``dtype`` (variants change the parameters). The maps are
    given as torch tensors, or as numpy arrays (bfloat16: float32 arrays sent as bfloat16)."""
    td = TORCH_DTYPES[dtype]

    def src(t: torch.Tensor):
        if not as_numpy:
            return t
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    k = int(torch.randint(1, 40, (1,), generator=gen))
    image_h, image_w = 256, 320
    boxes = random_boxes(gen, k, image_h, image_w, num_images=num_images, max_side=256)
    wire = dict(wire_dtype=dtype)
    if op == "roi_align":
        x = _maps(gen, (num_images, 12, 16, 20), td)
        sr, aligned, mode = [(2, True, "avg"), (-1, False, "avg"), (0, True, "max")][variant % 3]
        req = EncodedRequest.roi_align(src(x), boxes, (7, 5), 1 / 16, sr, aligned, mode, **wire)
        ref = roi_kernels.roi_align(x, boxes, (7, 5), 1 / 16, sr, aligned, mode)
    elif op == "roi_pool":
        x = _maps(gen, (num_images, 12, 16, 20), td)
        req = EncodedRequest.roi_pool(src(x), boxes, 6, 1 / 16, **wire)
        ref = roi_kernels.roi_pool(x, boxes, 6, 1 / 16)
    elif op in ("ps_roi_align", "ps_roi_pool"):
        x = _maps(gen, (num_images, 3 * 3 * 3, 16, 20), td)
        if op == "ps_roi_align":
            req = EncodedRequest.ps_roi_align(src(x), boxes, 3, 1 / 16, 2 if variant % 2 == 0 else -1, **wire)
            ref = roi_kernels.ps_roi_align(x, boxes, 3, 1 / 16, 2 if variant % 2 == 0 else -1)
        else:
            req = EncodedRequest.ps_roi_pool(src(x), boxes, 3, 1 / 16, **wire)
            ref = roi_kernels.ps_roi_pool(x, boxes, 3, 1 / 16)
    elif op == "roi_align_rotated":
        x = _maps(gen, (num_images, 12, 16, 20), td)
        rois = rotated_rois(gen, k, image_h, image_w, num_images)
        aligned = variant % 2 == 0
        req = EncodedRequest.roi_align_rotated(src(x), rois, 5, 1 / 16, 2, aligned, **wire)
        ref = roi_kernels.roi_align_rotated(x, rois, 5, 1 / 16, 2, aligned)
    elif op == "multiscale_roi_align":
        levels = [_maps(gen, (num_images, 8, image_h // s, image_w // s), td) for s in (4, 8, 16, 32)]
        sizes = [(image_h, image_w)] * num_images
        req = EncodedRequest.multiscale_roi_align([src(lv) for lv in levels], boxes, sizes, 7, 2, True, **wire)
        ref = roi_kernels.multiscale_roi_align(levels, boxes, sizes, 7, 2, True)
    else:
        raise ValueError(op)
    return Case(f"{op}-{dtype}-{variant}{'-numpy' if as_numpy else ''}", req, ref)


def ragged_case(gen: torch.Generator, dtype: str = "float32") -> Case:
    """roi_align over per-image maps of different sizes with per-image box lists."""
    td = TORCH_DTYPES[dtype]
    sizes = [(int(torch.randint(8, 24, (1,), generator=gen)), int(torch.randint(8, 24, (1,), generator=gen))) for _ in range(3)]
    maps = [_maps(gen, (10, h, w), td) for h, w in sizes]
    boxes = [random_boxes(gen, int(torch.randint(0, 12, (1,), generator=gen)), h * 16, w * 16)[:, 1:] for h, w in sizes]
    req = EncodedRequest.roi_align(maps, boxes, 4, 1 / 16, 2, True, wire_dtype=dtype)
    ref = roi_kernels.roi_align(maps, boxes, 4, 1 / 16, 2, True)
    return Case(f"ragged-{dtype}", req, ref)


def slow_case(gen: torch.Generator, seconds: float) -> Case:
    """A roi_align request that takes about ``seconds`` on this machine (measured), to keep the
    device busy."""
    x = torch.randn(1, 32, 48, 48, generator=gen)
    boxes = torch.tensor([[0, 0.0, 0.0, 47.0, 47.0]] * 16)

    def timed(sr: int) -> float:
        start = time.perf_counter()
        roi_kernels.roi_align(x, boxes, 7, 1.0, sr, True)
        return time.perf_counter() - start

    sr = 8
    t = timed(sr)
    while t < seconds / 4 and sr < 1024:
        sr = min(1024, sr * 2)
        t = timed(sr)
    sr = max(1, min(1024, int(sr * math.sqrt(seconds / max(t, 1e-6)))))
    req = EncodedRequest.roi_align(x, boxes, 7, 1.0, sr, True)
    return Case(f"slow-{sr}", req, roi_kernels.roi_align(x, boxes, 7, 1.0, sr, True))


# ---------------------------------------------------------------------------------------------
# Servers


def server_settings(**overrides) -> Settings:
    base = dict(host="127.0.0.1", port=0, metrics_port=0, grace_s=10.0)
    base.update(overrides)
    return Settings(**base)


@contextmanager
def in_process_server(**overrides) -> Iterator[BackgroundServer]:
    srv = BackgroundServer(server_settings(**overrides)).start()
    try:
        yield srv
    finally:
        srv.stop()


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def roi_server_command() -> list[str]:
    exe = Path(sys.executable).with_name("roi-server")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "roi_server.main"]


def start_server_process(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 300) -> ServerProcess:
    """``roi-server`` as a subprocess; returns once it logs that it listens (ports read from
    its output)."""
    log_path = tmp_path / f"roi-server-{time.monotonic_ns()}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    out = open(log_path, "w")
    proc = subprocess.Popen(
        roi_server_command() + list(args), stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path
    )
    out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = LISTENING.search(text)
        if found:
            metrics = METRICS_ON.search(text)
            return ServerProcess(proc, int(found.group(2)), int(metrics.group(1)) if metrics else None, log_path)
        if proc.poll() is not None:
            raise AssertionError(f"roi-server exited with {proc.returncode}:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"roi-server did not start in {timeout} s:\n{log_path.read_text()}")


# ---------------------------------------------------------------------------------------------
# Metrics


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """``/metrics`` parsed: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(samples: dict, name: str, **labels) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (so that a label a
    test does not name, e.g. ``protocol``, is summed over)."""
    want = labels.items()
    return sum(v for (n, have), v in samples.items() if n == name and want <= dict(have).items())


def registry_value(srv: BackgroundServer, name: str, **labels) -> float:
    """As :func:`sample`, read from the server's registry in this process."""
    want = labels.items()
    return sum(
        s.value
        for family in srv.server.metrics.registry.collect()
        for s in family.samples
        if s.name == name and want <= s.labels.items()
    )


# ---------------------------------------------------------------------------------------------
# Tests of the harness


def test_cases_are_deterministic_per_seed(seed):
    a = make_case("roi_align", torch.Generator().manual_seed(seed))
    b = make_case("roi_align", torch.Generator().manual_seed(seed))
    assert a.request.payload == b.request.payload
    assert_bitwise_equal(a.reference, b.reference)


def test_bitwise_comparison_tells_signed_zeros_apart():
    assert_bitwise_equal(torch.tensor([0.0, 1.5]), torch.tensor([0.0, 1.5]))
    with pytest.raises(AssertionError, match="1 of 2"):
        assert_bitwise_equal(torch.tensor([0.0, 1.5]), torch.tensor([-0.0, 1.5]))
