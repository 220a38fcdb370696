"""The engine's batches: requests of different map sizes share one launch of the op's ragged
form (no copy joins their maps), and each request's part of the result is, bit for bit, what
the op gives that request alone."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_bits, random_boxes
from roi_server import engine
from roi_server.batch_keys import batch_key
from roi_server.codec import DecodedRequest

import roi_kernels  # noqa: F401  (loads the ops)

OPS = ["roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated", "multiscale_roi_align"]
SCALES = (0.25, 0.125, 0.0625)


def request(gen, op: str, num_images: int, h: int, w: int, dtype: torch.dtype, channels_last: bool) -> DecodedRequest:
    ph, pw = 3, 2
    channels = 2 * ph * pw if op.startswith("ps_") else 10
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    k = int(torch.randint(0, 25, (1,), generator=gen))
    boxes = random_boxes(gen, k, 4 * h, 4 * w, num_images=num_images, min_side=2, max_side=4 * max(h, w), dtype=acc)
    if op == "roi_align_rotated":
        rois = torch.cat([boxes[:, :3], (boxes[:, 3:] - boxes[:, 1:3]).abs(), torch.rand(k, 1, generator=gen, dtype=acc) * 90], 1)
    else:
        rois = boxes
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if op == "multiscale_roi_align":
        sizes = [(-(-4 * h // 2**j), -(-4 * w // 2**j)) for j in range(2, 2 + len(SCALES))]
    else:
        sizes = [(h, w)]
    maps = [
        torch.randn(num_images, channels, mh, mw, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)
        for mh, mw in sizes
    ]
    r = DecodedRequest(
        id=f"{op}-{h}x{w}",
        op=op,
        layout="pyramid" if op == "multiscale_roi_align" else "dense",
        maps=maps,
        rois=rois,
        num_images=num_images,
        channels=channels,
        out_channels=channels // (ph * pw) if op.startswith("ps_") else channels,
        pooled_height=ph,
        pooled_width=pw,
        spatial_scale=0.25,
        sampling_ratio=2,
        aligned=True,
        pool_mode="max" if op == "multiscale_roi_align" else "avg",
        canonical_scale=224,
        canonical_level=4,
        scales=SCALES if op == "multiscale_roi_align" else (),
        dtype=dtype,
        out_dtype=dtype,
        map_bytes=sum(t.numel() * t.element_size() for t in maps),
    )
    r.key = batch_key(r)
    return r


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_a_batch_of_different_map_sizes_gives_each_request_its_own_result(seed, monkeypatch, op, dtype, channels_last):
    gen = torch.Generator().manual_seed(seed)
    reqs = [
        request(gen, op, n, int(torch.randint(4, 30, (1,), generator=gen)), int(torch.randint(4, 30, (1,), generator=gen)), dtype, channels_last)
        for n in (2, 1, 3)
    ]
    assert len({r.key for r in reqs}) == 1, "map sizes do not split a batch"
    alone = [engine.call_op([r], [r.maps], r.rois) for r in reqs]

    def no_cat(*args, **kwargs):
        raise AssertionError("a batch must not copy its maps together")

    monkeypatch.setattr(torch, "cat", no_cat)
    batched = engine.split_output(engine.call_op(reqs, [r.maps for r in reqs], engine._offset_rois(reqs)), reqs)
    monkeypatch.undo()
    for got, want in zip(batched, alone):
        assert_same_bits(got, want)


def test_the_key_keeps_everything_but_the_map_sizes(seed):
    gen = torch.Generator().manual_seed(seed)
    a = request(gen, "roi_pool", 1, 8, 9, torch.float32, False)
    b = request(gen, "roi_pool", 1, 12, 5, torch.float32, False)
    assert a.key == b.key
    b.spatial_scale = 0.5
    assert batch_key(a) != batch_key(b)
    c = request(gen, "multiscale_roi_align", 1, 8, 9, torch.float32, False)
    d = request(gen, "multiscale_roi_align", 1, 20, 9, torch.float32, False)
    assert c.key == d.key
    d.scales = (0.125, 0.0625, 0.03125)
    assert batch_key(c) != batch_key(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_a_request_alone_writes_its_result_into_its_output_region(seed, op, dtype):
    """A single request with an output region (a client's shared memory): the CPU kernel
    writes the result there (the region is the output's memory), bit for bit what it gives
    otherwise; nothing of the placement outlives the call, and a batch of two never writes
    into a region."""
    gen = torch.Generator().manual_seed(seed)
    r = request(gen, op, 2, 13, 17, dtype, False)
    while r.num_boxes == 0:
        r = request(gen, op, 2, 13, 17, dtype, False)
    want = engine.call_op([r], [r.maps], r.rois)
    region = bytearray(want.numel() * want.element_size())
    r.output_view = memoryview(region)
    eng = engine.KernelEngine(torch.device("cpu"))
    try:
        got = eng.launch([r]).outputs[0]
        assert_same_bits(got, want)
        written = torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(want.shape)
        assert got.data_ptr() == written.data_ptr()
        assert_same_bits(written, want)
        # The next output is the kernels' own again.
        again = engine.call_op([r], [r.maps], r.rois)
        assert again.data_ptr() != written.data_ptr()
        # Two requests: one output for both, never a region.
        other = request(gen, op, 1, 13, 17, dtype, False)
        both = eng.launch([r, other]).outputs
        assert all(o.data_ptr() != written.data_ptr() for o in both)
    finally:
        eng.close()


def test_a_placement_that_does_not_fit_is_dropped(seed):
    gen = torch.Generator().manual_seed(seed)
    r = request(gen, "roi_align", 1, 9, 9, torch.float32, False)
    wrong = torch.zeros(7)
    torch.ops.roi_kernels._place_output(wrong)
    try:
        out = engine.call_op([r], [r.maps], r.rois)
        assert out.data_ptr() != wrong.data_ptr() and bool((wrong == 0).all())
        assert engine.call_op([r], [r.maps], r.rois).data_ptr() != wrong.data_ptr()
    finally:
        torch.ops.roi_kernels._place_output(None)
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        torch.ops.roi_kernels._place_output(torch.zeros(4, 4).t())
