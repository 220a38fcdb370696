"""--verify: sampled responses against the same op computed in this process by roi_kernels."""

from __future__ import annotations

import numpy as np

from .workload import Workload

# float16 results are rounded once on the server and once here, from float32 accumulators
# that may sum in a different order.
TOLERANCE = {"float32": (1e-4, 1e-4), "float64": (1e-9, 1e-9), "float16": (2e-2, 1e-2)}


def expected(work: Workload) -> np.ndarray:
    """The workload's result computed in-process (float32 math, result in the workload's dtype)."""
    try:
        import torch

        import roi_kernels
    except ImportError as exc:
        raise SystemExit(
            "--verify computes the expected results in-process and needs torch and roi_kernels "
            "(pip install 'roi-service[server]')"
        ) from exc
    maps = [torch.from_numpy(np.ascontiguousarray(m)) for m in work.maps]
    boxes = torch.from_numpy(np.ascontiguousarray(work.boxes))
    out, scale, sr, al = work.output_size, work.spatial_scale, work.sampling_ratio, work.aligned
    with torch.inference_mode():
        if work.op == "roi_align":
            r = roi_kernels.roi_align(maps[0], boxes, out, scale, sr, al, work.pool_mode)
        elif work.op == "ragged_roi_align":
            r = roi_kernels.roi_align(maps, boxes, out, scale, sr, al, work.pool_mode)
        elif work.op == "roi_pool":
            r = roi_kernels.roi_pool(maps[0], boxes, out, scale)
        elif work.op == "ps_roi_align":
            r = roi_kernels.ps_roi_align(maps[0], boxes, out, scale, sr)
        elif work.op == "ps_roi_pool":
            r = roi_kernels.ps_roi_pool(maps[0], boxes, out, scale)
        elif work.op == "roi_align_rotated":
            r = roi_kernels.roi_align_rotated(maps[0], boxes, out, scale, sr, al)
        elif work.op == "multiscale_roi_align":
            r = roi_kernels.multiscale_roi_align(maps, boxes, work.image_sizes, out, sr, al, pool_mode=work.pool_mode)
        else:
            raise ValueError(f"--verify does not know op {work.op!r}")
    return r.numpy()


def check(work: Workload, samples: list) -> dict:
    """Compares each sampled ``(target, output)`` with the in-process result."""
    if not samples:
        return {"checked": 0, "mismatches": 0, "max_abs_error": None, "tolerance": None}
    want = expected(work).astype(np.float64)
    rtol, atol = TOLERANCE.get(work.dtype, (1e-4, 1e-4))
    mismatches, worst = 0, 0.0
    for _, got in samples:
        got = np.asarray(got, dtype=np.float64)
        if got.shape != want.shape:
            mismatches += 1
            continue
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        worst = max(worst, err)
        if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            mismatches += 1
    return {"checked": len(samples), "mismatches": mismatches, "max_abs_error": worst,
            "tolerance": {"rtol": rtol, "atol": atol}}
