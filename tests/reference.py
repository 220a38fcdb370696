"""float64 references written from docs/SEMANTICS.md, for what torchvision lacks
(roi_align's max pooling, inputs where torchvision fails) and to cross-check everything else."""

from __future__ import annotations

import math

import torch


def _axis(coords: torch.Tensor, size: int):
    """Bilinear taps along one axis: (lo, hi, weight_lo, weight_hi, valid)."""
    valid = (coords >= -1.0) & (coords <= size)
    v = coords.clamp(min=0.0)
    lo = v.floor().clamp(max=size - 1)
    at_end = lo >= size - 1
    hi = torch.where(at_end, lo, lo + 1)
    v = torch.where(at_end, lo, v)
    l = v - lo
    return lo.long(), hi.long(), 1.0 - l, l, valid


def _grid(start, bin_size, pooled, grid):
    p = torch.arange(pooled, dtype=torch.float64)[:, None]
    i = torch.arange(grid, dtype=torch.float64)[None, :]
    return (start + p * bin_size + (i + 0.5) * bin_size / grid).reshape(-1)


def roi_align_ref(
    x: torch.Tensor,
    rois: torch.Tensor,
    output_size,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool_mode: str = "avg",
) -> torch.Tensor:
    """roi_align over Tensor[N, C, H, W] and Tensor[K, 5], in float64."""
    ph_, pw_ = output_size
    x = x.double()
    rois = rois.double()
    n_img, c, h, w = x.shape
    out = torch.zeros(rois.shape[0], c, ph_, pw_, dtype=torch.float64)
    for k in range(rois.shape[0]):
        n = int(rois[k, 0])
        x1, y1, x2, y2 = (float(v) for v in rois[k, 1:])
        off = 0.5 if aligned else 0.0
        sx, sy = x1 * spatial_scale - off, y1 * spatial_scale - off
        rw, rh = x2 * spatial_scale - off - sx, y2 * spatial_scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_, rw / pw_

        def grid_of(extent, pooled):
            if sampling_ratio > 0:
                return sampling_ratio
            v = extent / pooled
            return int(math.ceil(v)) if v > 0 else 0

        gh, gw = grid_of(rh, ph_), grid_of(rw, pw_)
        if gh == 0 or gw == 0:
            continue
        ylo, yhi, wyl, wyh, vy = _axis(_grid(sy, bh, ph_, gh), h)
        xlo, xhi, wxl, wxh, vx = _axis(_grid(sx, bw, pw_, gw), w)
        plane = x[n]  # [C, H, W]

        def g(yi, xi):
            return plane[:, yi][:, :, xi]  # [C, PH*gh, PW*gw]

        val = (
            (wyl[:, None] * wxl[None, :]) * g(ylo, xlo)
            + (wyl[:, None] * wxh[None, :]) * g(ylo, xhi)
            + (wyh[:, None] * wxl[None, :]) * g(yhi, xlo)
            + (wyh[:, None] * wxh[None, :]) * g(yhi, xhi)
        )
        val = val * (vy[:, None] & vx[None, :])
        val = val.reshape(c, ph_, gh, pw_, gw)
        if pool_mode == "avg":
            out[k] = val.sum(dim=(2, 4)) / (gh * gw)
        else:
            out[k] = val.amax(dim=(2, 4))
    return out
