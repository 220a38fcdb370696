"""``torch.jit.script`` and ``torch.export`` of the ops and modules: scripted functions and
modules, a scripted Faster R-CNN whose box pooler is ours, exported poolers and a box head; each
bit for bit the eager result on random inputs, and the scripted checks raising as eager ones do."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import assert_same_bits, random_boxes
from torchvision.models.detection.faster_rcnn import TwoMLPHead

import roi_kernels

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:RCNN always returns a:UserWarning"),
]

NAMES = ["0", "1", "2", "3"]


def script(obj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(obj)


def boxes_per_image(gen, counts, h, w, cols=4):
    """list[Tensor[L_i, cols]]: corner boxes, or (cx, cy, w, h, angle) for cols == 5."""
    out = []
    for n in counts:
        b = random_boxes(gen, n, h, w, min_side=4, max_side=min(h, w))[:, 1:]
        if cols == 5:
            angle = (torch.rand(n, 1, generator=gen) - 0.5) * 360
            b = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2], angle], dim=1)
        out.append(b)
    return out


def one_map_cases(gen):
    """(module, channels, box columns) for each one-map module, with random settings."""
    ratio = int(torch.randint(-1, 3, (), generator=gen))
    return [
        (roi_kernels.RoIAlign(7, 0.25, ratio), 6, 4),
        (roi_kernels.RoIAlign((3, 4), 0.5, ratio, aligned=True, pool_mode="max"), 6, 4),
        (roi_kernels.RoIPool([5, 3], 0.25), 6, 4),
        (roi_kernels.PSRoIAlign(3, 0.25, ratio), 18, 4),
        (roi_kernels.PSRoIPool((2, 3), 0.5), 12, 4),
        (roi_kernels.RoIAlignRotated(3, 0.25, ratio), 6, 5),
        (roi_kernels.RoIAlignRotated((2, 4), 0.5, ratio, aligned=False), 6, 5),
    ]


def one_map_inputs(gen, channels, cols, dtype):
    x = torch.randn(2, channels, 23, 29, generator=gen, dtype=torch.float64).to(dtype)
    ragged = [x[0], x[1, :, :15, 5:]]
    boxes = boxes_per_image(gen, [9, 6], 92, 116, cols)
    return x, ragged, boxes


def fpn_inputs(gen, sizes, channels=8, n_boxes=(17, 11)):
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    feats = {
        name: torch.randn(len(sizes), channels, -(-h // 2 ** (k + 2)), -(-w // 2 ** (k + 2)), generator=gen)
        for k, name in enumerate(NAMES)
    }
    boxes = [
        random_boxes(gen, n, s[0], s[1], min_side=8, max_side=400)[:, 1:] for n, s in zip(n_boxes, sizes)
    ]
    return feats, boxes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scripted_modules_equal_eager(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    for module, channels, cols in one_map_cases(gen):
        scripted = script(module)
        x, ragged, boxes = one_map_inputs(gen, channels, cols, dtype)
        rois = roi_kernels.convert_boxes_to_rois(boxes, cols=cols)
        for inp in (x, ragged):
            want = module(inp, boxes)
            assert want.abs().sum() > 0, module
            assert_same_bits(scripted(inp, boxes), want)
            assert_same_bits(scripted(inp, rois), want)


def test_scripted_functions_equal_eager(seed):
    gen = torch.Generator().manual_seed(seed)
    x, ragged, boxes = one_map_inputs(gen, 12, 4, torch.float32)
    _, _, rotated = one_map_inputs(gen, 12, 5, torch.float32)
    cases = [
        (roi_kernels.roi_align, (x, boxes, (2, 3), 0.25, 2, True, "max")),
        (roi_kernels.roi_align, (ragged, boxes, 4, 0.25)),
        (roi_kernels.roi_pool, (x, boxes, [3], 0.5)),
        (roi_kernels.ps_roi_align, (ragged, boxes, (2, 3), 0.25, -1)),
        (roi_kernels.ps_roi_pool, (x, boxes, 2, 0.5)),
        (roi_kernels.roi_align_rotated, (x, rotated, 3, 0.25, 2, False)),
        (roi_kernels.roi_align_rotated, (ragged, rotated, [2, 2], 0.5)),
    ]
    for fn, args in cases:
        assert_same_bits(script(fn)(*args), fn(*args))
    assert_same_bits(
        script(roi_kernels.convert_boxes_to_rois)(boxes), roi_kernels.convert_boxes_to_rois(boxes)
    )

    sizes = [(200, 232), (176, 256)]
    feats, fboxes = fpn_inputs(gen, sizes)
    maps = [feats[n] for n in NAMES]
    assert script(roi_kernels.infer_scales)(maps, sizes) == roi_kernels.infer_scales(maps, sizes)
    args = (maps, fboxes, sizes, (7, 5), 2, True, 224, 4, "max")
    assert_same_bits(script(roi_kernels.multiscale_roi_align)(*args), roi_kernels.multiscale_roi_align(*args))


def test_scripted_multiscale_module_equal_eager(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(208, 240), (184, 264)]
    feats, boxes = fpn_inputs(gen, sizes)
    ratio = int(torch.randint(-1, 3, (), generator=gen))
    for module in (
        roi_kernels.MultiScaleRoIAlign(NAMES, 7, ratio),
        roi_kernels.MultiScaleRoIAlign(NAMES[1:3], (3, 5), ratio, canonical_scale=160, aligned=True),
    ):
        scripted = script(module)
        want = module(feats, boxes, sizes)
        assert want.abs().sum() > 0
        assert_same_bits(scripted(feats, boxes, sizes), want)
        assert_same_bits(scripted(feats, roi_kernels.convert_boxes_to_rois(boxes), sizes), want)


def _align_no_boxes(x: torch.Tensor) -> torch.Tensor:
    """An empty list of boxes from scripted code (a call from Python cannot type ``[]``)."""
    return roi_kernels.roi_align(x, torch.jit.annotate(list[torch.Tensor], []), 2)


def test_scripted_checks_name_the_field(seed):
    gen = torch.Generator().manual_seed(seed)
    x, _, boxes = one_map_inputs(gen, 6, 4, torch.float32)
    align = script(roi_kernels.roi_align)
    with pytest.raises(torch.jit.Error, match="output_size must be an int or"):
        align(x, boxes, [1, 2, 3])
    with pytest.raises(torch.jit.Error, match="output_size must be positive"):
        align(x, boxes, (0, 2))
    with pytest.raises(torch.jit.Error, match='pool_mode must be "avg" or "max"'):
        align(x, boxes, 2, 1.0, -1, False, "min")
    with pytest.raises(torch.jit.Error, match=r"boxes\[1\] must be Tensor\[L, 4\]"):
        align(x, [boxes[0], boxes[1][:, :3]], 2)
    with pytest.raises(torch.jit.Error, match="boxes is an empty list"):
        script(_align_no_boxes)(x)
    with pytest.raises(torch.jit.Error, match=r"rois\[0\] must be Tensor\[L, 5\]"):
        script(roi_kernels.RoIAlignRotated(2, 1.0, 2))(x, boxes)
    # The kernels' own checks reach scripted callers unchanged.
    with pytest.raises(RuntimeError, match="boxes"):
        align(x, torch.zeros(3, 4), 2)

    sizes = [(128, 160)]
    feats, fboxes = fpn_inputs(gen, sizes, n_boxes=(5,))
    pooler = script(roi_kernels.MultiScaleRoIAlign(NAMES, 7, 2))
    with pytest.raises(torch.jit.Error, match="x has no feature map named"):
        pooler({k: v for k, v in feats.items() if k != "2"}, fboxes, sizes)
    with pytest.raises(torch.jit.Error, match="consecutive powers of 1/2"):
        pooler({"0": feats["0"], "1": feats["2"], "2": feats["1"], "3": feats["3"]}, fboxes, sizes)
    with pytest.raises(torch.jit.Error, match="image_sizes must list"):
        pooler(feats, fboxes, [])


def test_scripted_faster_rcnn_with_our_pooler_equals_eager(seed):
    torch.manual_seed(seed)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=160, max_size=224
    ).eval()
    model.roi_heads.box_roi_pool = roi_kernels.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    # Random weights detect little: a low threshold keeps boxes to compare.
    model.roi_heads.score_thresh = 0.0
    scripted = script(model)
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 150, 200, generator=gen), torch.rand(3, 170, 190, generator=gen)]
    with torch.no_grad():
        want = model(images)
        _, got = scripted(images)
    assert sum(len(d["boxes"]) for d in want) > 0
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert_same_bits(g[key], w[key])


def test_exported_multiscale_and_box_head_equal_eager(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(200, 232), (176, 256)]
    feats, boxes = fpn_inputs(gen, sizes)
    pooler = roi_kernels.MultiScaleRoIAlign(NAMES, 7, 2)
    exported = torch.export.export(pooler, (feats, boxes, sizes))
    names = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert torch.ops.roi_kernels.multiscale_roi_align.default in names

    class BoxHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = pooler
            self.head = TwoMLPHead(8 * 7 * 7, 32)

        def forward(
            self,
            x: dict[str, torch.Tensor],
            proposals: list[torch.Tensor],
            image_shapes: list[tuple[int, int]],
        ):
            return self.head(self.pool(x, proposals, image_shapes))

    head = BoxHead().eval()
    head_exported = torch.export.export(head, (feats, boxes, sizes))
    # The programs run on other maps and boxes of the example's shapes.
    for _ in range(2):
        feats, boxes = fpn_inputs(gen, sizes)
        want = pooler(feats, boxes, sizes)
        assert want.abs().sum() > 0
        assert_same_bits(exported.module()(feats, boxes, sizes), want)
        assert_same_bits(head_exported.module()(feats, boxes, sizes), head(feats, boxes, sizes))


def test_exported_with_a_dynamic_number_of_boxes(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(200, 232)]
    feats, boxes = fpn_inputs(gen, sizes, n_boxes=(13,))
    rois = roi_kernels.convert_boxes_to_rois(boxes)
    pooler = roi_kernels.MultiScaleRoIAlign(NAMES, (5, 7), -1)
    k = torch.export.Dim("k", min=0)
    exported = torch.export.export(
        pooler, (feats, rois, sizes), dynamic_shapes=({n: None for n in NAMES}, {0: k}, [(None, None)])
    )
    for n in (0, 1, 40):
        feats, boxes = fpn_inputs(gen, sizes, n_boxes=(n,))
        rois = roi_kernels.convert_boxes_to_rois(boxes)
        assert_same_bits(exported.module()(feats, rois, sizes), pooler(feats, rois, sizes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exported_modules_equal_eager(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    for module, channels, cols in one_map_cases(gen):
        x, ragged, boxes = one_map_inputs(gen, channels, cols, dtype)
        for inp in (x, ragged):
            exported = torch.export.export(module, (inp, boxes))
            x2, ragged2, boxes2 = one_map_inputs(gen, channels, cols, dtype)
            inp2 = x2 if isinstance(inp, torch.Tensor) else [ragged2[0], ragged2[1]]
            want = module(inp2, boxes2)
            assert want.abs().sum() > 0, module
            assert_same_bits(exported.module()(inp2, boxes2), want)
