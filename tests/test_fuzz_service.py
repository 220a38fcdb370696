"""Fuzzing the service over the wire: hypothesis builds PoolRequests from the proto's fields
at random (tests/fuzz_requests.py: every dtype, shape, byte length, box value, enum value and
oneof, valid or broken) and sends them, several at a time so that they meet in the batcher,
to a real server on a real port.

Every answer is a result whose shape, dtype and id follow from the request, or
INVALID_ARGUMENT / RESOURCE_EXHAUSTED with a short message that reveals no internals; a valid
request is never refused as invalid, and its result equals the in-process ``roi_kernels``
call bit for bit. After each run the server is still SERVING, its queue is empty, and a probe
request gets its exact result. Every call has a timeout, so a hang fails the test.

CI runs a bounded number of examples (about 45 s here); benchmarks/fuzz_service.py runs
10,000+ against a roi-server process.
"""

from __future__ import annotations

import time
from collections import Counter

import grpc
import pytest
import torch
from fuzz_requests import (
    POOL_METHOD,
    POOL_STREAM_METHOD,
    FuzzCase,
    Violation,
    check_message,
    classify,
    decoded_output,
    pool_requests,
    reference_output,
    status_code,
    valid_requests,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from roi_client._proto.roi.v1 import roi_pb2
from roi_server.codec import peek_header
from test_service_support import assert_bitwise_equal, in_process_server, make_case, registry_value

# A call that takes longer has hung (the largest fuzzed request computes in milliseconds).
CALL_TIMEOUT_S = 30
MiB = 1 << 20
# Caps below the defaults, so that requests over them are drawn often (many_boxes, absurd
# output sizes, oversized messages); the valid requests stay far below them.
LIMITS = {"max_boxes": 1024, "max_output_elements": 1 << 21, "max_message_bytes": MiB}
FUZZ = settings(
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def server():
    with in_process_server(**LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    options = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield ch


def answer_of(future: grpc.Future) -> tuple[grpc.StatusCode, str, bytes | None]:
    try:
        return grpc.StatusCode.OK, "", future.result(timeout=CALL_TIMEOUT_S + 5)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def judge(case: FuzzCase, code: grpc.StatusCode, message: str, response: bytes | None) -> str:
    """classify, with the case in the failure's text; a valid request's result is also
    compared with the in-process call."""
    try:
        outcome = classify(case, code, message, response)
    except Violation as exc:
        raise Violation(f"{exc}\n{case.describe()}") from None
    if outcome == "OK" and case.valid:
        assert response is not None and case.request is not None
        try:
            assert_bitwise_equal(decoded_output(response), reference_output(case.request))
        except AssertionError as exc:
            raise AssertionError(
                f"result differs from the in-process call: {exc}\n{case.describe()}"
            ) from None
    return outcome


def assert_still_serving(server, channel: grpc.Channel, seed: int) -> None:
    """Health SERVING, nothing queued or in flight, and a probe gets its exact result."""
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "roi.v1.RoIService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    deadline = time.monotonic() + 10
    while registry_value(server, "roi_queue_depth") or registry_value(server, "roi_requests_in_flight"):
        assert time.monotonic() < deadline, "requests stayed queued or in flight after the run"
        time.sleep(0.01)
    case = make_case("roi_align", torch.Generator().manual_seed(seed))
    raw = channel.unary_unary(POOL_METHOD)(case.request.payload, timeout=CALL_TIMEOUT_S)
    assert_bitwise_equal(decoded_output(raw), case.reference)


def test_fuzzed_requests_get_a_result_or_a_clean_refusal(server, channel, seed):
    pool = channel.unary_unary(POOL_METHOD)
    tally: Counter[str] = Counter()

    @settings(FUZZ, max_examples=800)
    @given(st.lists(pool_requests(), min_size=1, max_size=6))
    def run(cases: list[FuzzCase]) -> None:
        # Sent together: valid and broken requests meet in the batcher.
        futures = [pool.future(c.payload, timeout=CALL_TIMEOUT_S) for c in cases]
        for case, future in zip(cases, futures):
            outcome = judge(case, *answer_of(future))
            tally[outcome] += 1
            tally["valid OK" if case.valid and outcome == "OK" else "other"] += 1

    run()
    print(dict(tally))
    total = tally["OK"] + tally["INVALID_ARGUMENT"] + tally["RESOURCE_EXHAUSTED"]
    # Both sides were exercised: results (compared bit for bit) and refusals.
    assert tally["valid OK"] > total // 5, tally
    assert tally["INVALID_ARGUMENT"] > total // 5, tally
    assert_still_serving(server, channel, seed)


def test_valid_requests_equal_the_in_process_call(server, channel, seed):
    """Valid requests only, several at a time: each gets a result equal bit for bit to the
    in-process roi_kernels call (also for NaN and infinite map values and extreme boxes)."""
    pool = channel.unary_unary(POOL_METHOD)
    extremes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=300)
    @given(st.lists(valid_requests(), min_size=1, max_size=6))
    def run(cases: list[FuzzCase]) -> None:
        futures = [pool.future(c.payload, timeout=CALL_TIMEOUT_S) for c in cases]
        for case, future in zip(cases, futures):
            code, message, response = answer_of(future)
            assert code == grpc.StatusCode.OK, f"{code.name}: {message}\n{case.describe()}"
            judge(case, code, message, response)
            extremes.update(case.extremes or ("none",))

    run()
    print(dict(extremes))
    assert_still_serving(server, channel, seed)


def test_fuzzed_stream_answers_every_request_once(server, channel, seed):
    """A stream of mixed fuzzed requests: every id is answered exactly once, with a result or
    an in-band error status, and the stream itself ends cleanly."""
    stream = channel.stream_stream(POOL_STREAM_METHOD)
    tally: Counter[str] = Counter()

    @settings(FUZZ, max_examples=150)
    @given(st.lists(pool_requests().filter(lambda c: "oversized" not in c.kinds), min_size=1, max_size=30))
    def run(cases: list[FuzzCase]) -> None:
        # Unique ids; bytes that do not parse carry none and are answered with id "".
        sent = [c.with_id(f"s{i}") for i, c in enumerate(cases)]
        by_id = {c.request.id: c for c in sent if c.request is not None}
        unparsed = iter([c for c in sent if c.request is None])
        replies = list(stream(iter([c.payload for c in sent]), timeout=CALL_TIMEOUT_S * 2))
        answers = [roi_pb2.PoolStreamResponse.FromString(r) for r in replies]
        ids = Counter(a.id for a in answers)
        want = Counter(list(by_id) + [""] * sum(c.request is None for c in sent))
        assert ids == want, f"answered {dict(ids)}, sent {dict(want)}"
        for a in answers:
            case = by_id[a.id] if a.id else next(unparsed)
            if a.WhichOneof("result") == "response":
                outcome = judge(case, grpc.StatusCode.OK, "", a.response.SerializeToString())
            else:
                assert a.WhichOneof("result") == "error", a
                outcome = judge(case, status_code(a.error.code), a.error.message, None)
            tally[outcome] += 1

    run()
    print(dict(tally))
    assert tally["OK"] and tally["INVALID_ARGUMENT"], tally
    assert_still_serving(server, channel, seed)


# ---------------------------------------------------------------------------------------------
# What the fuzzing found, kept as fixed cases


def _input_shape(shape, data=b""):
    def edit(msg):
        del msg.input.shape[:]
        msg.input.shape.extend(shape)
        msg.input.data = data

    return edit


def _rois_shape(shape, data=b""):
    def edit(msg):
        del msg.boxes.rois.shape[:]
        msg.boxes.rois.shape.extend(shape)
        msg.boxes.rois.data = data

    return edit


def _levels_not_halving(count):
    def edit(msg):
        msg.pyramid.ClearField("levels")
        msg.pyramid.ClearField("image_sizes")
        for i in range(count):
            level = msg.pyramid.levels.add(spatial_scale=2.0 ** -(i // 2))
            level.map.CopyFrom(
                roi_pb2.Tensor(dtype=roi_pb2.DTYPE_FLOAT32, shape=[2, 8, 1, 1], data=bytes(64))
            )

    return edit


# (name, op of the base request, edit, words the message must hold). Before the fixes: numpy
# refused the shape inside the service (INTERNAL), or the message quoting every level's scale
# was too long for the trailers (the client saw RESOURCE_EXHAUSTED "received metadata size
# exceeds ..." instead).
FOUND = [
    (
        "input of 65 dimensions",
        "roi_align",
        _input_shape([1] * 65, bytes(4)),
        ["input.shape", "[N, C, H, W]", "65 dimensions"],
    ),
    (
        "boxes of 5000 dimensions",
        "roi_pool",
        _rois_shape([1] * 5000, bytes(4)),
        ["boxes.rois.shape", "5000 dimensions"],
    ),
    (
        "empty input with huge dimensions",
        "roi_align",
        _input_shape([2**62, 3, 2**62, 0]),
        ["input.shape", "too large"],
    ),
    (
        "empty boxes with a huge dimension",
        "roi_align",
        _rois_shape([0, 2**63 - 1]),
        ["boxes.rois.shape", "too large"],
    ),
    (
        "1000 levels whose scales do not halve",
        "multiscale_roi_align",
        _levels_not_halving(1000),
        ["pyramid.levels[1].spatial_scale", "consecutive powers of 1/2"],
    ),
]


@FUZZ
@given(case=pool_requests())
def test_header_peek_agrees_with_the_parser(case: FuzzCase):
    """A full queue refuses a request before parsing it, counting it under the op read by
    ``peek_header``: on every message protobuf parses, that is protobuf's id and op."""
    if case.request is None:
        return
    req_id, op = peek_header(case.payload)
    assert (req_id, op) == (case.request.id, case.request.op)


@pytest.mark.parametrize("name, op, edit, words", FOUND, ids=[f[0] for f in FOUND])
def test_found_by_fuzzing(server, channel, seed, name, op, edit, words):
    msg = roi_pb2.PoolRequest.FromString(make_case(op, torch.Generator().manual_seed(seed)).request.payload)
    edit(msg)
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary(POOL_METHOD)(msg.SerializeToString(), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details()
    for word in words:
        assert word in details, details
    check_message(err.value.code(), details)
    assert len(details) <= 1024
