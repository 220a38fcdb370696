"""Gradients of every op on the CPU: equal to torchvision's backward on the same inputs and
upstream gradients (roi_align, roi_pool, ps_roi_align, ps_roi_pool, MultiScaleRoIAlign), over
dtypes, layouts, aligned, sampling ratios and edge boxes; the ragged forms equal, bit for bit,
the single-map op on each image; ``gradcheck`` in float64 where torchvision has no op (max
mode, roi_align_rotated); deterministic (the same bits twice and on 1 or 2 threads); double
backward raises; no "autograd kernel was not registered" warning; and a training step of a
small detector head equal to the same step through torchvision's ops."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import assert_same_bits, edge_boxes, in_layout, random_boxes
from torchvision.ops import MultiScaleRoIAlign

import roi_kernels

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# Against torchvision's backward: float64 to 1e-12, float32 to rounding; the half types (which
# we accumulate in float32, against torchvision in float64 on the same values) loosely.
TOL = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 4e-2, "atol": 4e-2},
}
H, W = 320, 400  # image size; maps of stride 16: 20 x 25


def input_grad(fn, x, grad_out):
    """d(sum(fn(x) * grad_out))/dx, x a tensor or a list of tensors."""
    leaves = [t.detach().requires_grad_() for t in (x if isinstance(x, list) else [x])]
    out = fn(leaves if isinstance(x, list) else leaves[0])
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return list(grads) if isinstance(x, list) else grads[0]


def maps(gen, n, c, h, w, dtype, layout):
    return in_layout(torch.randn(n, c, h, w, generator=gen, dtype=torch.float64), layout).to(dtype)


def boxes_for(gen, aligned_adaptive=False, zero_width_ok=True):
    """Random boxes and the edge boxes of conftest, in float64, over 2 images. torchvision
    raises on an inverted box with aligned=True and adaptive sampling, and returns NaN for
    ps_roi_align on a zero-width box: those rows are left out where they apply."""
    edges = edge_boxes(H, W, num_images=2, dtype=torch.float64)
    keep = torch.ones(len(edges), dtype=torch.bool)
    if aligned_adaptive:
        keep[4] = False  # inverted
    if not zero_width_ok:
        keep[2:4] = False  # zero area, zero width
    edges[5, 1:] = edges[5, 1:].clamp(-2000, 2000)  # huge (torchvision samples every point of it)
    return torch.cat([random_boxes(gen, 24, H, W, num_images=2, dtype=torch.float64), edges[keep]])


def upstream(gen, shape, strided: bool):
    """An upstream gradient, as a strided view when asked (every other row of a taller one)."""
    if not strided:
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    tall = torch.randn(shape[0] * 2, *shape[1:], generator=gen, dtype=torch.float64)
    return tall[::2]


def compare(ours, theirs, dtype):
    torch.testing.assert_close(ours.double(), theirs.double(), **TOL[dtype])
    assert ours.dtype == dtype


# ---------------------------------------------------------------------------------------------
# Against torchvision's backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling_ratio", [2, 0, -1, 3])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_align_matches_torchvision(seed, dtype, layout, aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(seed)
    x = maps(gen, 2, 12, 20, 25, dtype, layout)
    b = boxes_for(gen, aligned_adaptive=aligned and sampling_ratio <= 0)
    g = upstream(gen, (len(b), 12, 5, 4), strided=layout == "strided")
    ours = input_grad(lambda t: roi_kernels.roi_align(t, b, (5, 4), 1 / 16, sampling_ratio, aligned), x, g)
    # torchvision's CPU roi_align has no bfloat16 kernel: the half types against float64.
    ref_x = x if dtype in (torch.float32, torch.float64) else x.double()
    theirs = input_grad(
        lambda t: torchvision.ops.roi_align(t, b.to(t.dtype), (5, 4), 1 / 16, sampling_ratio, aligned),
        ref_x,
        g,
    )
    compare(ours, theirs, dtype)
    if layout == "channels_last":
        assert ours.is_contiguous(memory_format=torch.channels_last)
    elif layout == "contiguous":
        assert ours.is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_pool_matches_torchvision(seed, dtype, layout):
    gen = torch.Generator().manual_seed(seed)
    x = maps(gen, 2, 12, 20, 25, dtype, layout)
    b = boxes_for(gen)
    g = upstream(gen, (len(b), 12, 3, 5), strided=layout == "strided")
    ours = input_grad(lambda t: roi_kernels.roi_pool(t, b, (3, 5), 1 / 16), x, g)
    # The argmax is the half-precision input's: torchvision on the same values in float64.
    ref_x = x if dtype in (torch.float32, torch.float64) else x.double()
    theirs = input_grad(lambda t: torchvision.ops.roi_pool(t, b.to(t.dtype), (3, 5), 1 / 16), ref_x, g)
    compare(ours, theirs, dtype)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ps_roi_align_matches_torchvision(seed, dtype, layout, sampling_ratio):
    gen = torch.Generator().manual_seed(seed)
    x = maps(gen, 2, 3 * 6, 20, 25, dtype, layout)
    b = boxes_for(gen, zero_width_ok=sampling_ratio > 0)
    g = upstream(gen, (len(b), 3, 2, 3), strided=layout == "strided")
    ours = input_grad(lambda t: roi_kernels.ps_roi_align(t, b, (2, 3), 1 / 16, sampling_ratio), x, g)
    ref_x = x if dtype in (torch.float32, torch.float64) else x.double()
    theirs = input_grad(
        lambda t: torchvision.ops.ps_roi_align(t, b.to(t.dtype), (2, 3), 1 / 16, sampling_ratio), ref_x, g
    )
    compare(ours, theirs, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ps_roi_pool_matches_torchvision(seed, dtype, layout):
    """Including boxes that reach the last row and column, where torchvision's backward (which
    we follow) spreads over cells its forward does not read."""
    gen = torch.Generator().manual_seed(seed)
    x = maps(gen, 2, 2 * 9, 20, 25, dtype, layout)
    b = boxes_for(gen)
    g = upstream(gen, (len(b), 2, 3, 3), strided=layout == "strided")
    ours = input_grad(lambda t: roi_kernels.ps_roi_pool(t, b, 3, 1 / 16), x, g)
    ref_x = x if dtype in (torch.float32, torch.float64) else x.double()
    theirs = input_grad(lambda t: torchvision.ops.ps_roi_pool(t, b.to(t.dtype), 3, 1 / 16), ref_x, g)
    compare(ours, theirs, dtype)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("levels", [(2, 3, 4, 5), (4,)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_multiscale_matches_torchvision(seed, dtype, layout, levels, sampling_ratio):
    """Every level gets its gradient, equal to that through torchvision's MultiScaleRoIAlign."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(320, 448), (288, 416)]
    fpn = [maps(gen, 2, 8, -(-320 // 2**k), -(-448 // 2**k), dtype, layout) for k in levels]
    boxes = [random_boxes(gen, 40, h, w, min_side=8, max_side=600, dtype=dtype)[:, 1:] for h, w in sizes]
    names = [f"p{k}" for k in levels]
    tv = MultiScaleRoIAlign(names, 7, sampling_ratio)
    g = torch.randn(80, 8, 7, 7, generator=gen, dtype=torch.float64)
    ours = input_grad(lambda f: roi_kernels.multiscale_roi_align(f, boxes, sizes, 7, sampling_ratio), fpn, g)
    theirs = input_grad(lambda f: tv(dict(zip(names, f)), boxes, sizes), fpn, g)
    for o, t in zip(ours, theirs):
        compare(o, t, dtype)
    # The boxes reach the first three levels (P5 would need boxes of more than 448 pixels a side).
    assert all(o.abs().sum() > 0 for o in ours[:3])


# ---------------------------------------------------------------------------------------------
# Ragged forms: the single-map op's gradient on each image, bit for bit
# ---------------------------------------------------------------------------------------------


def per_image_grads(op, images, rois, g):
    """The gradient of each image's map through the single-map op on that image alone."""
    grads = []
    for i, m in enumerate(images):
        sel = torch.nonzero(rois[:, 0].long() == i).flatten()
        r = rois[sel].clone()
        r[:, 0] = 0
        grads.append(input_grad(lambda t, r=r: op(t[None], r), m, g[sel]))
    return grads


RAGGED = {
    "roi_align": lambda x, r: roi_kernels.roi_align(x, r, 3, 1 / 16, 2, True),
    "roi_align_max": lambda x, r: roi_kernels.roi_align(x, r, 3, 1 / 16, 2, False, pool_mode="max"),
    "roi_pool": lambda x, r: roi_kernels.roi_pool(x, r, 3, 1 / 16),
    "ps_roi_align": lambda x, r: roi_kernels.ps_roi_align(x, r, 3, 1 / 16, -1),
    "ps_roi_pool": lambda x, r: roi_kernels.ps_roi_pool(x, r, 3, 1 / 16),
    "roi_align_rotated": lambda x, r: roi_kernels.roi_align_rotated(x, r, 3, 1 / 16, 2),
}


def rotated(b, gen):
    """(index, cx, cy, w, h, angle) from (index, x1, y1, x2, y2)."""
    angle = torch.rand(len(b), 1, generator=gen, dtype=b.dtype) * 180 - 90
    return torch.cat([b[:, :1], (b[:, 1:3] + b[:, 3:5]) / 2, (b[:, 3:5] - b[:, 1:3]).abs(), angle], 1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(RAGGED))
def test_ragged_equals_per_image(seed, name, dtype, layout):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(20, 25), (13, 9), (17, 30)]
    images = [maps(gen, 1, 18, h, w, dtype, layout)[0] for h, w in sizes]
    rois = random_boxes(gen, 30, H, W, num_images=3, dtype=torch.float64)
    if name == "roi_align_rotated":
        rois = rotated(rois, gen)
    op = RAGGED[name]
    probe = op([m.detach() for m in images], rois)
    g = torch.randn(probe.shape, generator=gen, dtype=torch.float64).to(dtype)
    ours = input_grad(lambda f: op(f, rois), images, g)
    for got, want in zip(ours, per_image_grads(op, images, rois, g)):
        assert_same_bits(got, want)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_multiscale_ragged_equals_stacked(seed, pool_mode):
    """Per-image FPN maps (level-major) get what the stacked levels' gradient gives each image."""
    gen = torch.Generator().manual_seed(seed)
    n, levels = 2, (2, 3, 4)
    sizes = [(128, 160), (128, 160)]
    fpn = [maps(gen, n, 6, 128 // 2**k, 160 // 2**k, torch.float32, "contiguous") for k in levels]
    rois = random_boxes(gen, 30, 128, 160, num_images=n, min_side=4, max_side=160)
    scales = roi_kernels.infer_scales(fpn, sizes)
    args = (scales, 3, 3, 2, True, pool_mode, 224, 4)
    g = torch.randn(30, 6, 3, 3, generator=gen)
    stacked = input_grad(lambda f: torch.ops.roi_kernels.multiscale_roi_align(f, rois, *args), fpn, g)
    per_image = [level[i] for level in fpn for i in range(n)]
    ragged = input_grad(
        lambda f: torch.ops.roi_kernels.multiscale_roi_align_ragged(f, rois, *args), per_image, g
    )
    for level in range(len(levels)):
        for i in range(n):
            assert_same_bits(ragged[level * n + i], stacked[level][i])


# ---------------------------------------------------------------------------------------------
# gradcheck in float64: what torchvision has no op for
# ---------------------------------------------------------------------------------------------


def distinct_map(gen, *shape):
    """Values that are distinct and far apart relative to the finite-difference step, so that
    no max (roi_align's max mode, roi_pool) sits at a kink."""
    n = 1
    for s in shape:
        n *= s
    return (torch.randperm(n, generator=gen).to(torch.float64) / n + 0.05).reshape(shape)


@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck_roi_align_max(seed, aligned):
    gen = torch.Generator().manual_seed(seed)
    x = distinct_map(gen, 2, 3, 8, 9).requires_grad_()
    b = random_boxes(gen, 5, 128, 144, num_images=2, min_side=20, max_side=120, dtype=torch.float64)
    fn = lambda t: roi_kernels.roi_align(t, b, 2, 1 / 16, 2, aligned, pool_mode="max")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-7, atol=1e-6)


def test_gradcheck_multiscale_max_and_ragged(seed):
    gen = torch.Generator().manual_seed(seed)
    fpn = [distinct_map(gen, 1, 2, 16 // 2**i, 20 // 2**i).requires_grad_() for i in range(2)]
    b = [random_boxes(gen, 4, 64, 80, min_side=20, max_side=80, dtype=torch.float64)[:, 1:]]
    fn = lambda a, c: roi_kernels.multiscale_roi_align([a, c], b, [(64, 80)], 2, 2, pool_mode="max")
    assert torch.autograd.gradcheck(fn, tuple(fpn), eps=1e-7, atol=1e-6)
    images = [distinct_map(gen, 2, 7, 9).requires_grad_(), distinct_map(gen, 2, 5, 6).requires_grad_()]
    r = random_boxes(gen, 6, 96, 112, num_images=2, min_side=20, max_side=90, dtype=torch.float64)
    fn = lambda a, c: roi_kernels.roi_align([a, c], r, 2, 1 / 16, 2, True, pool_mode="max")
    assert torch.autograd.gradcheck(fn, tuple(images), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("aligned", [True, False])
def test_gradcheck_roi_align_rotated(seed, aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    r = rotated(
        random_boxes(gen, 4, 112, 128, num_images=2, min_side=16, max_side=100, dtype=torch.float64), gen
    )
    fn = lambda t: roi_kernels.roi_align_rotated(t, r, 2, 1 / 16, sampling_ratio, aligned)
    assert torch.autograd.gradcheck(fn, (x,))
    images = [x[0].detach().clone().requires_grad_(), x[1, :, :5].detach().clone().requires_grad_()]
    fn = lambda a, c: roi_kernels.roi_align_rotated([a, c], r, 2, 1 / 16, sampling_ratio, aligned)
    assert torch.autograd.gradcheck(fn, tuple(images))


def test_rotated_at_angle_zero_equals_roi_align(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 20, 25, generator=gen, dtype=torch.float64)
    b = random_boxes(gen, 20, H, W, num_images=2, dtype=torch.float64)
    r = torch.cat(
        [b[:, :1], (b[:, 1:3] + b[:, 3:5]) / 2, b[:, 3:5] - b[:, 1:3], torch.zeros(20, 1, dtype=b.dtype)], 1
    )
    g = torch.randn(20, 5, 4, 4, generator=gen, dtype=torch.float64)
    a = input_grad(lambda t: roi_kernels.roi_align_rotated(t, r, 4, 1 / 16, 2, True), x, g)
    e = input_grad(lambda t: roi_kernels.roi_align(t, b, 4, 1 / 16, 2, True), x, g)
    torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Determinism, threads
# ---------------------------------------------------------------------------------------------

ALL_OPS = {
    "roi_align": lambda x, b, r: roi_kernels.roi_align(x, b, 7, 1 / 16, 2, True),
    "roi_align_adaptive": lambda x, b, r: roi_kernels.roi_align(x, b, 7, 1 / 16, 0, False),
    "roi_align_max": lambda x, b, r: roi_kernels.roi_align(x, b, 7, 1 / 16, 2, True, pool_mode="max"),
    "roi_pool": lambda x, b, r: roi_kernels.roi_pool(x, b, 7, 1 / 16),
    "ps_roi_align": lambda x, b, r: roi_kernels.ps_roi_align(x[:, :98], b, 7, 1 / 16, 2),
    "ps_roi_pool": lambda x, b, r: roi_kernels.ps_roi_pool(x[:, :98], b, 7, 1 / 16),
    "roi_align_rotated": lambda x, b, r: roi_kernels.roi_align_rotated(x, r, 7, 1 / 16, 2),
    "multiscale": lambda x, b, r: roi_kernels.multiscale_roi_align(
        [x, x[:, :, ::2, ::2]], b[:, :], [(H, W), (H, W)], 7, 2
    ),
}


@pytest.mark.parametrize("name", list(ALL_OPS))
def test_deterministic_across_runs_and_threads(seed, name):
    """Many overlapping boxes (every element of the map receives from many of them): the same
    bits twice, and on 1 thread as on 2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 128, 20, 25, generator=gen)
    b = random_boxes(gen, 300, H, W, num_images=2)
    r = rotated(b, gen)
    op = ALL_OPS[name]
    g = torch.randn(op(x, b, r).shape, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = input_grad(lambda t: op(t, b, r), x, g)
        second = input_grad(lambda t: op(t, b, r), x, g)
        torch.set_num_threads(1)
        single = input_grad(lambda t: op(t, b, r), x, g)
    finally:
        torch.set_num_threads(threads)
    assert first.abs().sum() > 0
    assert_same_bits(first, second)
    assert_same_bits(first, single)


# ---------------------------------------------------------------------------------------------
# Autograd behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_OPS))
def test_no_unregistered_autograd_warning_and_double_backward_raises(seed, name):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 98, 20, 25, generator=gen, dtype=torch.float64, requires_grad=True)
    b = random_boxes(gen, 10, H, W, num_images=2, dtype=torch.float64).requires_grad_()
    r = rotated(b.detach(), gen).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ALL_OPS[name](x, b, r)
        out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert b.grad is None and r.grad is None, "the boxes get no gradient"
    out = ALL_OPS[name](x, b, r)
    (gx,) = torch.autograd.grad(out, x, torch.randn_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match=r"roi_kernels::\w+_backward: double backwards is not supported"):
        gx.sum().backward()


def test_no_grad_and_inference_mode(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 20, 25, generator=gen, requires_grad=True)
    b = random_boxes(gen, 10, H, W, num_images=2)
    want = roi_kernels.roi_align(x, b, 7, 1 / 16, 2, True)
    assert want.requires_grad
    with torch.no_grad():
        a = roi_kernels.roi_align(x, b, 7, 1 / 16, 2, True)
    with torch.inference_mode():
        c = roi_kernels.roi_align(x, b, 7, 1 / 16, 2, True)
    assert not a.requires_grad and not c.requires_grad
    assert_same_bits(a, want.detach())
    assert_same_bits(c, want.detach())


def test_empty_boxes_give_zero_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 20, 25, generator=gen, requires_grad=True)
    out = roi_kernels.roi_align(x, torch.zeros(0, 5), 7, 1 / 16, 2, True)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_backward_op_errors_name_the_argument():
    x = torch.randn(2, 8, 20, 25)
    b = torch.tensor([[0, 10.0, 10, 90, 90]])
    with pytest.raises(RuntimeError, match=r"grad must be Tensor\[1, 8, 7, 7\]"):
        torch.ops.roi_kernels.roi_align_backward(
            torch.randn(1, 8, 6, 7), b, None, [2, 8, 20, 25], False, 0.0625, 7, 7, 2, True, "avg"
        )
    with pytest.raises(RuntimeError, match="max pooling needs the forward's input maps"):
        torch.ops.roi_kernels.roi_align_backward(
            torch.randn(1, 8, 7, 7), b, None, [2, 8, 20, 25], False, 0.0625, 7, 7, 2, True, "max"
        )
    with pytest.raises(RuntimeError, match=r"boxes\[:, 0\] \(the image index\) must be in \[0, 2\)"):
        torch.ops.roi_kernels.roi_pool_backward(
            torch.randn(1, 8, 7, 7), b + torch.tensor([[5.0, 0, 0, 0, 0]]), x, 0.0625, 7, 7
        )
    with pytest.raises(RuntimeError, match="sizes must hold 3 sizes per map"):
        torch.ops.roi_kernels.ps_roi_pool_ragged_backward(
            torch.randn(1, 2, 2, 2), b, [8, 20], [False], 0.0625, 2, 2
        )


# ---------------------------------------------------------------------------------------------
# A training step through a small detector head
# ---------------------------------------------------------------------------------------------


class Backbone(torch.nn.Module):
    """Two-level FPN-like features from a tiny conv stack (stride 4 and 8)."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, channels, 3, stride=4, padding=1)
        self.c2 = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        p2 = self.c1(x).relu()
        return {"p2": p2, "p3": self.c2(p2)}


def training_step(pool, seed):
    torch.manual_seed(seed)
    backbone = Backbone().double()
    head = torchvision.models.detection.faster_rcnn.TwoMLPHead(8 * 7 * 7, 32).double()
    cls = torch.nn.Linear(32, 5).double()
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(2, 3, 128, 160, generator=gen, dtype=torch.float64)
    # Random boxes, and one of each image large enough for the second level.
    large = torch.tensor([[4.0, 6.0, 154.0, 126.0]], dtype=torch.float64)
    boxes = [
        torch.cat(
            [random_boxes(gen, 12, 128, 160, min_side=8, max_side=128, dtype=torch.float64)[:, 1:], large]
        )
        for _ in range(2)
    ]
    labels = torch.randint(0, 5, (26,), generator=gen)
    feats = backbone(images)
    for f in feats.values():
        f.retain_grad()
    loss = torch.nn.functional.cross_entropy(cls(head(pool(feats, boxes, [(128, 160)] * 2))), labels)
    loss.backward()
    params = [p.grad for p in [*backbone.parameters(), *head.parameters(), *cls.parameters()]]
    return loss.detach(), params, [f.grad for f in feats.values()]


def test_training_step_equals_torchvision(seed):
    tv = MultiScaleRoIAlign(["p2", "p3"], 7, 2)
    ours = roi_kernels.MultiScaleRoIAlign(["p2", "p3"], 7, 2)
    loss_a, params_a, feats_a = training_step(ours, seed)
    loss_b, params_b, feats_b = training_step(tv, seed)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    for a, b in zip(feats_a + params_a, feats_b + params_b):
        assert a is not None and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_roi_pool_head_trains_the_backbone(seed):
    """A conv + roi_pool + linear head: one SGD step on the backbone moves its weights exactly
    as the same step through torchvision's roi_pool."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 80, generator=gen)
    boxes = random_boxes(gen, 16, 64, 80, num_images=2, min_side=8, max_side=64)
    target = torch.randn(16, 4, generator=gen)

    def step(pool):
        torch.manual_seed(seed)
        conv = torch.nn.Conv2d(3, 6, 3, stride=4, padding=1)
        fc = torch.nn.Linear(6 * 3 * 3, 4)
        opt = torch.optim.SGD([*conv.parameters(), *fc.parameters()], lr=0.1)
        loss = torch.nn.functional.mse_loss(fc(pool(conv(images), boxes, 3, 0.25).flatten(1)), target)
        loss.backward()
        opt.step()
        return conv.weight.detach()

    before = step(lambda *a: roi_kernels.roi_pool(*a).detach())  # no gradient to the backbone
    ours, theirs = step(roi_kernels.roi_pool), step(torchvision.ops.roi_pool)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours, before)


def test_compiled_training_step_equals_eager(seed):
    """torch.compile(fullgraph=True) traces the forward and its backward op (the fakes give the
    gradients' shapes); the compiled step's gradients equal eager's."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 20, 25, generator=gen)
    b = random_boxes(gen, 12, H, W, num_images=2)

    def loss(t):
        a = roi_kernels.roi_align(t, b, 5, 1 / 16, 2, True)
        p = roi_kernels.roi_pool(t, b, 5, 1 / 16)
        return (a * p).sum()

    eager = input_grad(loss, x, torch.tensor(1.0))
    compiled = input_grad(torch.compile(loss, fullgraph=True), x, torch.tensor(1.0))
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
