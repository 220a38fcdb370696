"""The op methods, shared by :class:`~roi_client.RoIClient` and
:class:`~roi_client.AsyncRoIClient`: each builds its request and hands it to ``self._run``
(which sends it through shared memory or the wire), whose result (an array, or an awaitable
of one) it returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .request import EncodedRequest, RequestDraft, SizeLike

# "The client's default timeout", distinct from None (no deadline).
UNSET: Any = object()


class OpMethods:
    def pool(self, request: EncodedRequest, *, timeout: float | None = UNSET) -> Any:
        raise NotImplementedError

    def _run(self, draft: RequestDraft, timeout: Any) -> Any:
        return self.pool(draft.encode(), timeout=timeout)

    # -- ops ----------------------------------------------------------------------------------

    def roi_align(
        self,
        input: Any,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = False,
        pool_mode: str = "avg",
        *,
        out_dtype: Any = None,
        wire_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        """``input``: ``[N, C, H, W]`` or a list of ``[C, H_i, W_i]``; ``boxes``: ``[K, 5]`` or
        a list of ``[L_i, 4]``. Returns ``[K, C, PH, PW]``."""
        req = RequestDraft.roi_align(
            input, boxes, output_size, spatial_scale, sampling_ratio, aligned, pool_mode, out_dtype=out_dtype, wire_dtype=wire_dtype
        )
        return self._run(req, timeout)

    def roi_pool(
        self,
        input: Any,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        *,
        out_dtype: Any = None,
        wire_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        req = RequestDraft.roi_pool(input, boxes, output_size, spatial_scale, out_dtype=out_dtype, wire_dtype=wire_dtype)
        return self._run(req, timeout)

    def ps_roi_align(
        self,
        input: Any,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        *,
        out_dtype: Any = None,
        wire_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        req = RequestDraft.ps_roi_align(
            input, boxes, output_size, spatial_scale, sampling_ratio, out_dtype=out_dtype, wire_dtype=wire_dtype
        )
        return self._run(req, timeout)

    def ps_roi_pool(
        self,
        input: Any,
        boxes: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        *,
        out_dtype: Any = None,
        wire_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        req = RequestDraft.ps_roi_pool(input, boxes, output_size, spatial_scale, out_dtype=out_dtype, wire_dtype=wire_dtype)
        return self._run(req, timeout)

    def roi_align_rotated(
        self,
        input: Any,
        rois: Any,
        output_size: SizeLike,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = True,
        *,
        out_dtype: Any = None,
        wire_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        """``rois``: ``[K, 6]`` (image index, cx, cy, w, h, angle in degrees) or a list of
        ``[L_i, 5]``."""
        req = RequestDraft.roi_align_rotated(
            input, rois, output_size, spatial_scale, sampling_ratio, aligned, out_dtype=out_dtype, wire_dtype=wire_dtype
        )
        return self._run(req, timeout)

    def multiscale_roi_align(
        self,
        features: Sequence[Any],
        boxes: Any,
        image_sizes: Sequence[Sequence[int]],
        output_size: SizeLike,
        sampling_ratio: int = -1,
        aligned: bool = False,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        pool_mode: str = "avg",
        *,
        out_dtype: Any = None,
        wire_dtype: Any = None,
        timeout: float | None = UNSET,
    ) -> Any:
        """``features``: FPN maps ``[N, C, H_l, W_l]``, finest first; ``image_sizes``: each
        image's (height, width), from which the server infers the level scales."""
        req = RequestDraft.multiscale_roi_align(
            features,
            boxes,
            image_sizes,
            output_size,
            sampling_ratio,
            aligned,
            canonical_scale,
            canonical_level,
            pool_mode,
            out_dtype=out_dtype,
            wire_dtype=wire_dtype,
        )
        return self._run(req, timeout)

