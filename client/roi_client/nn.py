"""Drop-in poolers for torchvision's detectors that pool on a remote ``roi-server``.

Needs torch (``import roi_client`` alone does not)::

    from roi_client import RoIClient
    from roi_client.nn import RemoteMultiScaleRoIAlign

    client = RoIClient("localhost:50051")
    model.roi_heads.box_roi_pool = RemoteMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, client=client)
    model.roi_heads.mask_roi_pool = RemoteMultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2, client=client)

Each module has the constructor and ``forward`` of its torchvision (or ``roi_kernels``)
counterpart and returns the same tensor, on the input's device and in its dtype.

**Uploads are shared.** Feature maps travel once to the server's feature store (a handle) and
every pooler of the same client that pools the same tensors names that handle: Mask R-CNN's box
and mask heads send the pyramid once per forward. A cached upload is used only while each of
its tensors is the same object at the same version (``Tensor._version``, which every in-place
change bumps): a tensor changed in place, or a new tensor at the address of a freed one, is
uploaded again. An upload is released when one of its tensors is freed (at the next call), or
when more than ``MAX_SHARED_UPLOADS`` are held; a handle the server dropped (expired, evicted)
is uploaded again and the call retried once.

**Calls are split to fit the server's limits** (read once per client from ``Describe``): the
boxes go in as many requests as the largest output, the box count and the message size allow.

**Forward only.** The server computes no gradients: called under grad mode with a feature map
that requires grad, a module raises instead of returning a result that would silently cut the
graph. Wrap inference in ``torch.no_grad()`` / ``torch.inference_mode()``; train with
``roi_kernels``' modules.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .client import RoIClient
from .errors import RoIError
from .features import handle_gone

__all__ = [
    "MAX_SHARED_UPLOADS",
    "RemoteMultiScaleRoIAlign",
    "RemotePSRoIAlign",
    "RemotePSRoIPool",
    "RemoteRoIAlign",
    "RemoteRoIAlignRotated",
    "RemoteRoIPool",
    "SharedUploads",
]

SizeLike = int | Sequence[int]
BoxesLike = Tensor | Sequence[Tensor]

MAX_SHARED_UPLOADS = 4  # uploads one client keeps for reuse; older ones are released
RESPONSE_HEADROOM = 0.95  # the share of the message limit one response may fill
FALLBACK_LIMITS = {"max_message_bytes": 256 << 20, "max_boxes": 65536, "max_output_elements": 1 << 25}


def _pair(output_size: SizeLike) -> tuple[int, int]:
    if isinstance(output_size, int):
        return (output_size, output_size)
    size = tuple(int(s) for s in output_size)
    if len(size) == 1:
        return (size[0], size[0])
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or (height, width), got {output_size!r}")
    return size  # type: ignore[return-value]


def _client_of(client: RoIClient | str | None) -> RoIClient:
    if isinstance(client, RoIClient):
        return client
    if isinstance(client, str):
        return RoIClient(client)
    if client is None:
        raise TypeError("client= is required: a roi_client.RoIClient or a server address 'host:port'")
    raise TypeError(
        f"client must be a roi_client.RoIClient or a 'host:port' string, got {type(client).__name__} "
        "(the modules call the server synchronously from forward: AsyncRoIClient does not fit)"
    )


def _check_no_grad(name: str, tensors: Sequence[Tensor]) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{name} computes the forward pass only (the server returns no gradients), and a feature "
            "map here requires grad: run the model under torch.no_grad() or torch.inference_mode(), "
            "or train with roi_kernels' modules"
        )


def _wire_tensor(t: Tensor) -> Tensor:
    """What travels: the tensor's values on the CPU, contiguous, without autograd history."""
    return t.detach().to("cpu").contiguous()


def infer_scale(feature: Tensor, original_size: Sequence[int]) -> float:
    """torchvision's rule: the power of two nearest to the map's height over the image's."""
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2.0 ** float(torch.tensor(approx).log2().round())


def setup_scales(features: Sequence[Tensor], image_shapes: Sequence[Sequence[int]]) -> list[float]:
    """Each level's scale, inferred as torchvision's ``MultiScaleRoIAlign`` does (from the
    largest image height and width of the batch)."""
    if not image_shapes:
        raise ValueError("image_shapes is empty: give each image's (height, width)")
    max_h = max(int(s[0]) for s in image_shapes)
    max_w = max(int(s[1]) for s in image_shapes)
    return [infer_scale(f, (max_h, max_w)) for f in features]


def _rois(boxes: BoxesLike, cols: int) -> Tensor:
    """``list[Tensor[L_i, cols]]`` or ``Tensor[K, cols + 1]`` -> ``Tensor[K, cols + 1]`` on the CPU."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != cols + 1:
            raise ValueError(f"boxes must be Tensor[K, {cols + 1}] or a list of Tensor[L, {cols}], got {tuple(boxes.shape)}")
        return boxes.detach().to("cpu")
    if not isinstance(boxes, (list, tuple)) or not boxes:
        raise ValueError(f"boxes must be Tensor[K, {cols + 1}] or a non-empty list of Tensor[L, {cols}]")
    parts = []
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != cols:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be Tensor[L, {cols}], got {shape}")
        b = b.detach().to("cpu")
        parts.append(torch.cat([torch.full((b.size(0), 1), float(i), dtype=b.dtype), b], dim=1))
    return torch.cat(parts, dim=0)


class _Upload:
    """One upload the client may reuse: its handle and the tensors it was made from."""

    __slots__ = ("features", "nbytes", "refs")

    def __init__(self, features: Any, tensors: Sequence[Tensor]) -> None:
        self.features = features
        self.refs = [weakref.ref(t) for t in tensors]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def holds(self, tensors: Sequence[Tensor]) -> bool:
        return len(self.refs) == len(tensors) and all(r() is t for r, t in zip(self.refs, tensors))


class SharedUploads:
    """The uploads of one client, shared by every remote module that uses the client.

    ``get`` returns the server-side features for some tensors, uploading them only when no
    live upload holds exactly these tensors (same objects, same versions, same scales).
    ``uploads`` and ``bytes_uploaded`` count what was sent (for tests and benchmarks).
    """

    _by_client: ClassVar[weakref.WeakKeyDictionary[RoIClient, SharedUploads]] = weakref.WeakKeyDictionary()
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, client: RoIClient, max_uploads: int = MAX_SHARED_UPLOADS) -> None:
        self.client = client
        self.max_uploads = max_uploads
        self._entries: OrderedDict[tuple, _Upload] = OrderedDict()
        self._freed: list[tuple] = []  # keys whose tensors were freed: released at the next call
        self._lock = threading.RLock()
        self._limits: dict[str, float] | None = None
        self.uploads = 0
        self.bytes_uploaded = 0

    @classmethod
    def of(cls, client: RoIClient) -> SharedUploads:
        with cls._registry_lock:
            shared = cls._by_client.get(client)
            if shared is None:
                shared = cls._by_client[client] = cls(client)
            return shared

    # -- limits -------------------------------------------------------------------------------

    def limits(self) -> dict[str, float]:
        if self._limits is None:
            try:
                limits = dict(self.client.describe().limits)
            except RoIError:
                limits = {}
            merged = dict(FALLBACK_LIMITS)
            merged.update({k: v for k, v in limits.items() if v})
            self._limits = merged
        return self._limits

    def boxes_per_request(self, per_box_elements: int, itemsize: int) -> int:
        """The most boxes one request may carry: its output within the server's element limit
        and the message limits of both ends, and the box count within the server's limit."""
        lim = self.limits()
        message = min(float(lim["max_message_bytes"]), float(getattr(self.client, "_max_message_bytes", math.inf)))
        by_bytes = int(message * RESPONSE_HEADROOM) // max(1, per_box_elements * itemsize)
        by_elements = int(lim["max_output_elements"]) // max(1, per_box_elements)
        return max(1, min(by_bytes, by_elements, int(lim["max_boxes"])))

    # -- uploads ------------------------------------------------------------------------------

    def get(self, tensors: Sequence[Tensor], *, spatial_scales: Sequence[float] | None = None, share: bool = True) -> Any:
        """The server-side features of ``tensors`` (a pyramid when ``spatial_scales`` is given,
        else one map or a ragged list); uploaded unless a live upload holds them. With
        ``share=False`` the upload is the caller's own (release it after use)."""
        self._release_freed()
        key = self._key(tensors, spatial_scales)
        if share:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.holds(tensors):
                    self._entries.move_to_end(key)
                    return entry.features
        features = self._upload(tensors, spatial_scales)
        if not share:
            return features
        entry = _Upload(features, tensors)
        with self._lock:
            old = self._entries.pop(key, None)
            self._entries[key] = entry
            evicted = []
            while len(self._entries) > self.max_uploads:
                evicted.append(self._entries.popitem(last=False)[1])
        for t in tensors:
            weakref.finalize(t, self._freed.append, key)
        for e in ([old] if old is not None else []) + evicted:
            _release(e.features)
        return features

    def forget(self, tensors: Sequence[Tensor], spatial_scales: Sequence[float] | None = None) -> None:
        """Drops the cached upload of ``tensors`` (the server no longer holds its handle)."""
        with self._lock:
            entry = self._entries.pop(self._key(tensors, spatial_scales), None)
        if entry is not None:
            _release(entry.features)

    def release_all(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            _release(e.features)

    @property
    def held(self) -> int:
        return len(self._entries)

    def _key(self, tensors: Sequence[Tensor], spatial_scales: Sequence[float] | None) -> tuple:
        scales = None if spatial_scales is None else tuple(float(s) for s in spatial_scales)
        return (tuple((id(t), t._version) for t in tensors), scales)

    def _upload(self, tensors: Sequence[Tensor], spatial_scales: Sequence[float] | None) -> Any:
        wire = [_wire_tensor(t) for t in tensors]
        if spatial_scales is not None:
            features = self.client.features(wire, spatial_scales=list(spatial_scales), keep=False)
        elif len(wire) == 1:
            features = self.client.features(wire[0], keep=False)
        else:
            features = self.client.features(wire, keep=False)
        self.uploads += 1
        self.bytes_uploaded += sum(w.numel() * w.element_size() for w in wire)
        return features

    def _release_freed(self) -> None:
        while self._freed:
            key = self._freed.pop()
            with self._lock:
                entry = self._entries.get(key)
                if entry is None or all(r() is not None for r in entry.refs):
                    continue  # released already, or a newer upload under the same key
                del self._entries[key]
            _release(entry.features)


def _release(features: Any) -> None:
    try:
        features.release()
    except RoIError:
        pass  # the server dropped it already, or is gone: nothing is held either way


class _RemotePooler(nn.Module):
    """What the remote modules share: the client, the upload cache, the split into requests."""

    _cols = 4  # box columns after the image index

    def __init__(self, client: RoIClient | str | None, share_uploads: bool) -> None:
        super().__init__()
        self.client = _client_of(client)
        self.share_uploads = share_uploads

    @property
    def uploads(self) -> SharedUploads:
        return SharedUploads.of(self.client)

    def _pool(
        self, tensors: Sequence[Tensor], rois: Tensor, per_box_elements: int, call, *, spatial_scales=None
    ) -> Tensor:
        """Runs ``call(features, rois_chunk)`` over chunks of ``rois`` that fit the server's
        limits, with ``features`` the server-side handle of ``tensors``; the results in order."""
        _check_no_grad(type(self).__name__, tensors)
        ref = tensors[0]
        itemsize = ref.element_size() if ref.is_floating_point() else 4
        if rois.size(0) == 0:
            return self._empty(ref, per_box_elements)
        step = self.uploads.boxes_per_request(per_box_elements, itemsize)
        for attempt in (0, 1):
            features = self.uploads.get(tensors, spatial_scales=spatial_scales, share=self.share_uploads)
            try:
                parts = [torch.as_tensor(call(features, rois[i : i + step])) for i in range(0, rois.size(0), step)]
                break
            except RoIError as err:
                if attempt == 1 or not handle_gone(err):
                    raise
                if self.share_uploads:
                    self.uploads.forget(tensors, spatial_scales)
            finally:
                if not self.share_uploads:
                    _release(features)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out.to(device=ref.device, dtype=ref.dtype)

    def _empty(self, ref: Tensor, per_box_elements: int) -> Tensor:
        raise NotImplementedError


def _one_map_tensors(input: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(input, Tensor):
        if input.dim() != 4:
            raise ValueError(f"input must be Tensor[N, C, H, W] or a list of Tensor[C, H, W], got {tuple(input.shape)}")
        return [input]
    if not isinstance(input, (list, tuple)) or not input:
        raise ValueError("input must be Tensor[N, C, H, W] or a non-empty list of Tensor[C, H, W]")
    for i, t in enumerate(input):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"input[{i}] must be Tensor[C, H, W], got {shape}")
    return list(input)


class _RemoteOneMap(_RemotePooler):
    """A pooler of one map (or a ragged list of per-image maps)."""

    _channels_per_bin = False  # position-sensitive ops: C_out = C / (PH * PW)

    def __init__(self, output_size: SizeLike, client, share_uploads: bool) -> None:
        super().__init__(client, share_uploads)
        self.output_size = output_size
        self._size = _pair(output_size)

    def _out_channels(self, channels: int) -> int:
        if not self._channels_per_bin:
            return channels
        ph, pw = self._size
        if channels % (ph * pw):
            raise ValueError(f"input has {channels} channels, not a multiple of output_size {ph} x {pw}")
        return channels // (ph * pw)

    def _empty(self, ref: Tensor, per_box_elements: int) -> Tensor:
        return torch.zeros((0, per_box_elements // (self._size[0] * self._size[1]), *self._size), dtype=ref.dtype, device=ref.device)

    def _op(self, features: Any, rois: Tensor) -> Any:
        raise NotImplementedError

    def forward(self, input: Tensor | Sequence[Tensor], rois: BoxesLike) -> Tensor:
        tensors = _one_map_tensors(input)
        channels = tensors[0].shape[-3]
        per_box = self._out_channels(channels) * self._size[0] * self._size[1]
        return self._pool(tensors, _rois(rois, self._cols), per_box, self._op)


class RemoteRoIAlign(_RemoteOneMap):
    """``roi_kernels.RoIAlign`` (torchvision's ``RoIAlign``), pooled by the server."""

    def __init__(
        self,
        output_size: SizeLike,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
        pool_mode: str = "avg",
        *,
        client: RoIClient | str | None = None,
        share_uploads: bool = True,
    ) -> None:
        super().__init__(output_size, client, share_uploads)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.pool_mode = pool_mode

    def _op(self, features, rois):
        return features.roi_align(rois, self._size, self.spatial_scale, self.sampling_ratio, self.aligned, self.pool_mode)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, pool_mode={self.pool_mode!r}, "
            f"client={self.client.target!r}"
        )


class RemoteRoIPool(_RemoteOneMap):
    """``roi_kernels.RoIPool`` (torchvision's ``RoIPool``), pooled by the server."""

    def __init__(
        self, output_size: SizeLike, spatial_scale: float, *, client: RoIClient | str | None = None, share_uploads: bool = True
    ) -> None:
        super().__init__(output_size, client, share_uploads)
        self.spatial_scale = spatial_scale

    def _op(self, features, rois):
        return features.roi_pool(rois, self._size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, client={self.client.target!r}"


class RemotePSRoIAlign(_RemoteOneMap):
    """``roi_kernels.PSRoIAlign`` (torchvision's ``PSRoIAlign``), pooled by the server."""

    _channels_per_bin = True

    def __init__(
        self,
        output_size: SizeLike,
        spatial_scale: float,
        sampling_ratio: int,
        *,
        client: RoIClient | str | None = None,
        share_uploads: bool = True,
    ) -> None:
        super().__init__(output_size, client, share_uploads)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def _op(self, features, rois):
        return features.ps_roi_align(rois, self._size, self.spatial_scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, client={self.client.target!r}"
        )


class RemotePSRoIPool(_RemoteOneMap):
    """``roi_kernels.PSRoIPool`` (torchvision's ``PSRoIPool``), pooled by the server."""

    _channels_per_bin = True

    def __init__(
        self, output_size: SizeLike, spatial_scale: float, *, client: RoIClient | str | None = None, share_uploads: bool = True
    ) -> None:
        super().__init__(output_size, client, share_uploads)
        self.spatial_scale = spatial_scale

    def _op(self, features, rois):
        return features.ps_roi_pool(rois, self._size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, client={self.client.target!r}"


class RemoteRoIAlignRotated(_RemoteOneMap):
    """``roi_kernels.RoIAlignRotated``, pooled by the server. ``rois``: ``Tensor[K, 6]``
    (image index, cx, cy, w, h, angle in degrees) or a list of ``Tensor[L_i, 5]``."""

    _cols = 5

    def __init__(
        self,
        output_size: SizeLike,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = True,
        *,
        client: RoIClient | str | None = None,
        share_uploads: bool = True,
    ) -> None:
        super().__init__(output_size, client, share_uploads)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def _op(self, features, rois):
        return features.roi_align_rotated(rois, self._size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, client={self.client.target!r}"
        )


class RemoteMultiScaleRoIAlign(_RemotePooler):
    """torchvision's ``MultiScaleRoIAlign``, pooled by the server.

    ``forward(x, boxes, image_shapes)``: ``x`` a dict of FPN maps ``[N, C, H_l, W_l]``, of
    which the entries named in ``featmap_names`` are the levels (in ``x``'s order, finest
    first, as torchvision takes them: a backbone's extra ``"pool"`` output is left out unless
    named); ``boxes`` a list of ``Tensor[L_i, 4]`` in image pixels; ``image_shapes`` each
    image's (height, width) after the transform, from which the level scales are inferred as
    torchvision does. Returns ``Tensor[sum(L_i), C, PH, PW]``.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: SizeLike,
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        aligned: bool = False,
        client: RoIClient | str | None = None,
        share_uploads: bool = True,
    ) -> None:
        super().__init__(client, share_uploads)
        self.featmap_names = list(featmap_names)
        self.output_size = output_size
        self._size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned

    def _levels(self, x: dict[str, Tensor]) -> list[Tensor]:
        if not isinstance(x, dict):
            raise TypeError(f"x must be a dict of feature maps (name -> Tensor[N, C, H, W]), got {type(x).__name__}")
        levels = [v for k, v in x.items() if k in self.featmap_names]
        if not levels:
            raise KeyError(f"x has none of the feature maps {self.featmap_names} (it has {list(x)})")
        for k, v in x.items():
            if k in self.featmap_names and (not isinstance(v, Tensor) or v.dim() != 4):
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"x[{k!r}] must be Tensor[N, C, H, W], got {shape}")
        return levels

    def _empty(self, ref: Tensor, per_box_elements: int) -> Tensor:
        return torch.zeros((0, ref.shape[1], *self._size), dtype=ref.dtype, device=ref.device)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        levels = self._levels(x)
        scales = setup_scales(levels, image_shapes)
        per_box = levels[0].shape[1] * self._size[0] * self._size[1]

        def call(features, rois):
            return features.multiscale_roi_align(
                rois, self._size, self.sampling_ratio, self.aligned, self.canonical_scale, self.canonical_level
            )

        return self._pool(levels, _rois(boxes, 4), per_box, call, spatial_scales=scales)

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, client={self.client.target!r}"
        )
