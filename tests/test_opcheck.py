"""``torch.library.opcheck`` for every op on the CPU (schema, fake implementation, dispatcher
registrations, AOT dispatch with dynamic shapes) over dtypes, layouts and empty box sets, with
and without gradients (the autograd registration), and for every backward op; and
``torch.compile(fullgraph=True)`` over the ops."""

from __future__ import annotations

import pytest
import torch
from conftest import random_boxes

import roi_kernels
from roi_kernels._autograd import channels_last

OPS = torch.ops.roi_kernels
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last"]


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if name == "channels_last" else x


def samples(op: str, dtype: torch.dtype, lay: str, empty: bool):
    """(op overload, args) for one op; boxes in float32 as callers usually pass them."""
    gen = torch.Generator().manual_seed(0)
    k = 0 if empty else 7
    boxes = random_boxes(gen, 8, 300, 400, num_images=2)[:k]
    x = layout(torch.randn(2, 12, 19, 25, generator=gen).to(dtype), lay)
    if op == "roi_align":
        return OPS.roi_align.default, (x, boxes, 1 / 16, 3, 2, 2, True, "avg")
    if op == "roi_align_max":
        return OPS.roi_align.default, (x, boxes, 1 / 16, 2, 3, -1, False, "max")
    if op == "roi_align_ragged":
        maps = [layout(x[:1], lay)[0], layout(x[1:, :, :10, :7], lay)[0]]
        return OPS.roi_align_ragged.default, (maps, boxes, 1 / 16, 3, 3, 2, True, "avg")
    if op == "multiscale_roi_align":
        maps = [layout(torch.randn(2, 4, 32 // 2**i, 40 // 2**i, generator=gen).to(dtype), lay) for i in range(4)]
        return OPS.multiscale_roi_align.default, (maps, boxes, [0.25, 0.125, 0.0625, 0.03125], 3, 3, 2, False, "avg", 224, 4)
    if op == "multiscale_roi_align_ragged":
        # Two images of different sizes, level-major.
        maps = [layout(torch.randn(1, 4, (32 - 8 * n) // 2**i, (40 - 6 * n) // 2**i, generator=gen).to(dtype), lay)[0] for i in range(4) for n in range(2)]
        return OPS.multiscale_roi_align_ragged.default, (maps, boxes, [0.25, 0.125, 0.0625, 0.03125], 3, 3, 2, False, "max", 224, 4)
    # The one-map ops' ragged forms: two images of different sizes.
    images = [layout(x[:1], lay)[0], layout(x[1:, :, :10, :7], lay)[0]]
    if op == "roi_pool":
        return OPS.roi_pool.default, (x, boxes, 1 / 16, 3, 2)
    if op == "roi_pool_ragged":
        return OPS.roi_pool_ragged.default, (images, boxes, 1 / 16, 3, 2)
    if op == "ps_roi_align":
        return OPS.ps_roi_align.default, (x, boxes, 1 / 16, 3, 2, -1)
    if op == "ps_roi_align_ragged":
        return OPS.ps_roi_align_ragged.default, (images, boxes, 1 / 16, 2, 3, 2)
    if op == "ps_roi_pool":
        return OPS.ps_roi_pool.default, (x, boxes, 1 / 16, 2, 3)
    if op == "ps_roi_pool_ragged":
        return OPS.ps_roi_pool_ragged.default, (images, boxes, 1 / 16, 3, 2)
    if op in ("roi_align_rotated", "roi_align_rotated_ragged"):
        b = random_boxes(gen, 8, 300, 400, num_images=2)[:k]
        rois = torch.cat([b[:, :3], (b[:, 3:] - b[:, 1:3]).abs(), torch.rand(len(b), 1, generator=gen) * 90], 1)
        if op == "roi_align_rotated_ragged":
            return OPS.roi_align_rotated_ragged.default, (images, rois, 1 / 16, 3, 2, 2, True)
        return OPS.roi_align_rotated.default, (x, rois, 1 / 16, 3, 2, 2, True)
    raise AssertionError(op)


ALL = [
    "roi_align",
    "roi_align_max",
    "roi_align_ragged",
    "multiscale_roi_align",
    "multiscale_roi_align_ragged",
    "roi_pool",
    "roi_pool_ragged",
    "ps_roi_align",
    "ps_roi_align_ragged",
    "ps_roi_pool",
    "ps_roi_pool_ragged",
    "roi_align_rotated",
    "roi_align_rotated_ragged",
]


def with_grad(args):
    """args with the maps (the first argument: a tensor or a list of them) requiring grad, so
    that opcheck also checks the autograd registration and differentiates through the op."""
    first = args[0]
    if isinstance(first, torch.Tensor):
        return (first.detach().requires_grad_(), *args[1:])
    return ([m.detach().requires_grad_() for m in first], *args[1:])


def backward_sample(op: str, dtype: torch.dtype, lay: str, empty: bool):
    """(backward op overload, args) from the forward's sample: the arguments the autograd
    formula (roi_kernels/_autograd.py) passes, with a random upstream gradient."""
    overload, args = samples(op, dtype, lay, empty)
    name = overload.name().split("::")[1]
    first, boxes, rest = args[0], args[1], args[2:]
    grad = torch.randn(overload(*args).shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    maps = [first] if isinstance(first, torch.Tensor) else list(first)
    sizes = [s for m in maps for s in m.shape]
    layouts = [channels_last(m) for m in maps]
    backward = getattr(OPS, f"{name}_backward").default
    if name == "roi_align":
        return backward, (grad, boxes, first if rest[-1] == "max" else None, sizes, layouts[0], *rest)
    if name in ("roi_align_ragged", "multiscale_roi_align", "multiscale_roi_align_ragged"):
        mode = rest[5]
        return backward, (grad, boxes, maps if mode == "max" else [], sizes, layouts, *rest)
    if name.startswith("roi_pool"):
        return backward, (grad, boxes, first, *rest)
    if isinstance(first, torch.Tensor):
        return backward, (grad, boxes, sizes, layouts[0], *rest)
    return backward, (grad, boxes, sizes, layouts, *rest)


def test_every_registered_op_is_checked():
    checked = {samples(op, torch.float32, "contiguous", False)[0].name().split("::")[1] for op in ALL}
    for op in ALL:
        checked.add(backward_sample(op, torch.float32, "contiguous", False)[0].name().split("::")[1])
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("roi_kernels::")}
    # _place_output is the server's hook into the CPU output allocation, not an op with
    # results (tests/test_engine_batches.py checks it).
    assert checked == registered - {"_place_output"}


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ALL)
def test_opcheck(op, dtype, lay):
    overload, args = samples(op, dtype, lay, empty=False)
    torch.library.opcheck(overload, args)


@pytest.mark.parametrize("op", ALL)
def test_opcheck_without_boxes(op):
    overload, args = samples(op, torch.float32, "contiguous", empty=True)
    torch.library.opcheck(overload, args)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", ALL)
def test_opcheck_with_gradients(op, dtype, lay):
    """The autograd registration (torch.library.register_autograd in roi_kernels/_autograd.py):
    opcheck's autograd-registration check, and AOT dispatch differentiating through the op."""
    overload, args = samples(op, dtype, lay, empty=False)
    torch.library.opcheck(overload, with_grad(args))


@pytest.mark.parametrize("empty", [False, True])
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ALL)
def test_opcheck_backward_ops(op, dtype, lay, empty):
    """Each backward op itself: schema, fake (shapes, dtypes and layouts of the gradients),
    registrations, AOT dispatch with dynamic shapes."""
    overload, args = backward_sample(op, dtype, lay, empty)
    torch.library.opcheck(overload, args)


def test_compile_fullgraph(seed):
    """The ops trace into one graph (no graph break around the custom ops or their Python
    wrappers), compile with the default backend, and give the eager results; a second box count
    reuses the graph (the fakes' output shapes are symbolic)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 25, 34, generator=gen)
    rois = torch.cat([random_boxes(gen, 5, 400, 544, num_images=2)[:, :3], torch.full((5, 2), 64.0), torch.full((5, 1), 30.0)], 1)

    def head(x, boxes, rois):
        a = roi_kernels.roi_align(x, boxes, 7, 1 / 16, 2, True)
        p = roi_kernels.roi_pool(x, boxes, 7, 1 / 16)
        r = roi_kernels.roi_align_rotated(x, rois, 7, 1 / 16, 2)
        return (a + p).relu().flatten(1).sum(1), r.mean(dim=(2, 3))

    compiled = torch.compile(head, fullgraph=True, dynamic=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for k in (30, 11):
        boxes = random_boxes(gen, k, 400, 544, num_images=2)
        got, expected = compiled(x, boxes, rois), head(x, boxes, rois)
        assert got[0].shape == (k,)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, "one graph for both box counts"
    ragged = torch.compile(lambda maps, b: roi_kernels.roi_align(maps, b, 5, 1 / 16, 2, True), fullgraph=True)
    maps = [x[0], x[1, :, :20, :30]]
    boxes = random_boxes(gen, 9, 320, 480, num_images=2)
    torch.testing.assert_close(ragged(maps, boxes), roi_kernels.roi_align(maps, boxes, 5, 1 / 16, 2, True), rtol=0, atol=0)
