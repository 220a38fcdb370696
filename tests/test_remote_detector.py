"""torchvision's detectors with their poolers replaced by ``roi_client.nn``'s remote modules,
against a real ``roi-server`` process: the detections equal the stock model's bit for bit, and
the pyramid travels once per forward (the box and mask heads share one upload)."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torchvision
from roi_client import RoIClient
from roi_client.nn import (
    RemoteMultiScaleRoIAlign,
    RemotePSRoIAlign,
    RemotePSRoIPool,
    RemoteRoIAlign,
    RemoteRoIAlignRotated,
    RemoteRoIPool,
    SharedUploads,
)
from test_service_support import sample, scrape, start_server_process

import roi_kernels

LEVELS = ["0", "1", "2", "3"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server_process(
        tmp_path_factory.mktemp("remote-detector"), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"
    )
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with RoIClient(server.address) as c:
        yield c


def received_bytes(server) -> float:
    return sample(scrape(server.metrics_url), "roi_received_bytes_total")


def small_maskrcnn(seed: int):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            min_size=160,
            max_size=224,
            rpn_post_nms_top_n_test=200,
            box_score_thresh=0.0,  # random weights score every class near 1/91: keep them all
            box_detections_per_img=30,
        )
    return model.eval()


def remote_copy(model, client, **options):
    remote = copy.deepcopy(model)
    box = model.roi_heads.box_roi_pool
    mask = model.roi_heads.mask_roi_pool
    remote.roi_heads.box_roi_pool = RemoteMultiScaleRoIAlign(
        box.featmap_names, box.output_size, box.sampling_ratio, client=client, **options
    )
    remote.roi_heads.mask_roi_pool = RemoteMultiScaleRoIAlign(
        mask.featmap_names, mask.output_size, mask.sampling_ratio, client=client, **options
    )
    return remote


def assert_same_detections(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w) == {"boxes", "labels", "scores", "masks"}
        assert w["boxes"].shape[0] > 0, "the stock model detected nothing: the comparison would be empty"
        for key in w:
            assert g[key].dtype == w[key].dtype and g[key].shape == w[key].shape, key
            assert torch.equal(g[key], w[key]), f"{key} differ"


def test_mask_rcnn_detections_equal_stock_and_the_pyramid_travels_once(server, client, seed):
    model = small_maskrcnn(seed)
    remote = remote_copy(model, client)
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 150, 200, generator=gen), torch.rand(3, 180, 170, generator=gen)]

    # The pyramid the poolers see: the backbone's levels "0".."3" of the transformed batch.
    pyramid_bytes = []

    def record(module, args, output):
        pyramid_bytes.append(sum(v.numel() * v.element_size() for k, v in output.items() if k in LEVELS))

    hook = model.backbone.register_forward_hook(record)
    with torch.no_grad():
        want = model(images)
    hook.remove()

    for forward in range(2):  # a second forward: new feature tensors, a new upload
        before = received_bytes(server)
        with torch.no_grad():
            got = remote(images)
        sent = received_bytes(server) - before
        assert_same_detections(got, want)
        ratio = sent / pyramid_bytes[0]
        assert 1.0 <= ratio <= 1.05, f"forward {forward}: sent {sent:.0f} bytes for a {pyramid_bytes[0]} byte pyramid"


def test_mask_rcnn_with_unshared_uploads_sends_the_pyramid_per_pooler(server, client, seed):
    """Without sharing each pooler uploads its own copy (the mask head included): the same
    detections, twice the bytes — what sharing saves."""
    model = small_maskrcnn(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    images = [torch.rand(3, 160, 200, generator=gen)]
    with torch.no_grad():
        want = model(images)
        features = model.backbone(model.transform(images)[0].tensors)
    pyramid = sum(v.numel() * v.element_size() for k, v in features.items() if k in LEVELS)
    remote = remote_copy(model, client, share_uploads=False)
    before = received_bytes(server)
    with torch.no_grad():
        got = remote(images)
    sent = received_bytes(server) - before
    assert_same_detections(got, want)
    assert 2.0 <= sent / pyramid <= 2.1


def fpn(seed: int, n: int = 2, c: int = 16, size: tuple[int, int] = (64, 96)):
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    x = {str(i): torch.randn(n, c, h >> (i + 2), w >> (i + 2), generator=gen) for i in range(4)}
    x["pool"] = torch.randn(n, c, 1, 1, generator=gen)  # torchvision's extra level: not pooled
    boxes = []
    for _ in range(n):
        xy = torch.rand(40, 2, generator=gen) * torch.tensor([w - 8.0, h - 8.0])
        wh = 2 + torch.rand(40, 2, generator=gen) * torch.tensor([w / 2.0, h / 2.0])
        boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([w - 1.0, h - 1.0]))], dim=1))
    return x, boxes, [(h, w)] * n


def test_multiscale_matches_torchvision_and_picks_levels_by_name(client, seed):
    x, boxes, shapes = fpn(seed)
    ours = RemoteMultiScaleRoIAlign(LEVELS, 7, 2, client=client)
    theirs = torchvision.ops.MultiScaleRoIAlign(LEVELS, 7, 2)
    with torch.no_grad():
        assert torch.equal(ours(x, boxes, shapes), theirs(x, boxes, shapes))
        # Fewer levels, by name: "pool" and the coarse ones are left out as torchvision does.
        two = ["0", "1"]
        got = RemoteMultiScaleRoIAlign(two, (5, 3), 0, client=client)(x, boxes, shapes)
        assert torch.equal(got, torchvision.ops.MultiScaleRoIAlign(two, (5, 3), 0)(x, boxes, shapes))
    with pytest.raises(KeyError, match="none of the feature maps"):
        ours({"p2": x["0"]}, boxes, shapes)


def test_results_come_back_on_the_input_dtype(client, seed):
    x, boxes, shapes = fpn(seed)
    half = {k: v.half() for k, v in x.items()}
    with torch.no_grad():
        got = RemoteMultiScaleRoIAlign(LEVELS, 7, 2, client=client)(half, [b.half() for b in boxes], shapes)
        want = roi_kernels.MultiScaleRoIAlign(LEVELS, 7, 2)(half, [b.half() for b in boxes], shapes)
    assert got.dtype == torch.float16
    assert torch.equal(got, want)


def test_one_map_modules_match_roi_kernels(client, seed):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(2, 98, 24, 32, generator=gen)
    xy = torch.rand(30, 2, generator=gen) * 200
    rois = torch.cat([torch.randint(0, 2, (30, 1), generator=gen).float(), xy, xy + 8 + torch.rand(30, 2, generator=gen) * 200], 1)
    rot = torch.cat([rois[:, :1], xy, 8 + torch.rand(30, 2, generator=gen) * 100, torch.rand(30, 1, generator=gen) * 180 - 90], 1)
    pairs = [
        (RemoteRoIAlign(7, 1 / 8, 2, True, client=client), roi_kernels.RoIAlign(7, 1 / 8, 2, True), rois),
        (RemoteRoIAlign((4, 6), 1 / 8, 0, False, "max", client=client), roi_kernels.RoIAlign((4, 6), 1 / 8, 0, False, "max"), rois),
        (RemoteRoIPool(7, 1 / 8, client=client), roi_kernels.RoIPool(7, 1 / 8), rois),
        (RemotePSRoIAlign(7, 1 / 8, 2, client=client), roi_kernels.PSRoIAlign(7, 1 / 8, 2), rois),
        (RemotePSRoIPool(7, 1 / 8, client=client), roi_kernels.PSRoIPool(7, 1 / 8), rois),
        (RemoteRoIAlignRotated(7, 1 / 8, 2, client=client), roi_kernels.RoIAlignRotated(7, 1 / 8, 2), rot),
    ]
    with torch.no_grad():
        for remote, local, r in pairs:
            assert torch.equal(remote(maps, r), local(maps, r)), type(remote).__name__
        # A ragged list of per-image maps, and boxes as a list per image.
        ragged = [maps[0], maps[1, :, :20, :28]]
        per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
        got = RemoteRoIAlign(7, 1 / 8, 2, True, client=client)(ragged, per_image)
        assert torch.equal(got, roi_kernels.RoIAlign(7, 1 / 8, 2, True)(ragged, per_image))


def test_uploads_are_shared_and_redone_when_a_tensor_changes(client, seed):
    x, boxes, shapes = fpn(seed)
    shared = SharedUploads.of(client)
    shared.release_all()
    box_pool = RemoteMultiScaleRoIAlign(LEVELS, 7, 2, client=client)
    mask_pool = RemoteMultiScaleRoIAlign(LEVELS, 14, 2, client=client)
    theirs = torchvision.ops.MultiScaleRoIAlign(LEVELS, 14, 2)
    with torch.no_grad():
        start = shared.uploads
        box_pool(x, boxes, shapes)
        mask_pool(x, boxes, shapes)
        assert shared.uploads - start == 1  # the second pooler named the first one's upload

        x["2"].mul_(-1.5)  # an in-place change bumps the version: uploaded again
        got = mask_pool(x, boxes, shapes)
        assert shared.uploads - start == 2
        assert torch.equal(got, theirs(x, boxes, shapes))

        # A new tensor where a freed one was (same address, version 0): uploaded again.
        ptr = x["0"].data_ptr()
        shape = x["0"].shape
        del x["0"]
        gc.collect()
        x = {"0": torch.empty(shape), **x}
        x["0"].normal_(generator=torch.Generator().manual_seed(seed + 7))
        before = shared.uploads
        got = mask_pool(x, boxes, shapes)
        assert shared.uploads - before == 1, f"reused an upload (same address: {x['0'].data_ptr() == ptr})"
        assert torch.equal(got, theirs(x, boxes, shapes))
        assert shared.held <= 4

        # Freed tensors release their uploads (on the server too) at the next call.
        other, other_boxes, _ = fpn(seed + 1)
        mask_pool(other, other_boxes, shapes)
        held, uploads = shared.held, [e.features for e in shared._entries.values()]
        del x
        gc.collect()
        mask_pool(other, other_boxes, shapes)
        assert shared.held == 1 < held
        assert sum(fm.closed for fm in uploads) == held - 1  # released: all but the live one


def test_calls_are_split_to_fit_the_server_limits(tmp_path, seed):
    """A server whose output limit takes 25 boxes of 16 x 7 x 7: a call of 80 boxes goes in
    four requests, and the result is the in-process op's."""
    srv = start_server_process(
        tmp_path, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--max-output-elements", str(25 * 16 * 49)
    )
    try:
        with RoIClient(srv.address) as c:
            x, boxes, shapes = fpn(seed)
            with torch.no_grad():
                got = RemoteMultiScaleRoIAlign(LEVELS, 7, 2, client=c)(x, boxes, shapes)
            assert torch.equal(got, torchvision.ops.MultiScaleRoIAlign(LEVELS, 7, 2)(x, boxes, shapes))
            samples = scrape(srv.metrics_url)
            pooled = sum(v for (name, labels), v in samples.items() if name == "roi_requests_total" and ("code", "OK") in labels)
            assert pooled >= 4
    finally:
        srv.stop()


def test_grad_mode_inputs_that_require_grad_are_refused(client, seed):
    x, boxes, shapes = fpn(seed)
    x = {k: v.requires_grad_() for k, v in x.items()}
    pool = RemoteMultiScaleRoIAlign(LEVELS, 7, 2, client=client)
    with pytest.raises(RuntimeError, match="forward pass only"):
        pool(x, boxes, shapes)
    with torch.no_grad():
        assert pool(x, boxes, shapes).shape == (80, 16, 7, 7)


def test_no_boxes_gives_an_empty_result(client, seed):
    x, _, shapes = fpn(seed)
    with torch.no_grad():
        got = RemoteMultiScaleRoIAlign(LEVELS, 7, 2, client=client)(x, [torch.zeros(0, 4), torch.zeros(0, 4)], shapes)
    assert got.shape == (0, 16, 7, 7)


def test_importing_roi_client_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = "import sys, roi_client; assert 'torch' not in sys.modules, 'roi_client imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_the_example_script_runs_against_a_server(server):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "examples" / "remote_maskrcnn.py"
    done = subprocess.run(
        [sys.executable, str(script), "--address", server.address, "--size", "160x200", "--images", "1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "equal to the stock model's: True" in done.stdout
    assert "in 1 upload(s)" in done.stdout
