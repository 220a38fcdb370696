"""``roi-server`` as operators run it: settings from flags and ``ROI_*`` variables, bad
configuration, JSON logs, and an orderly stop on SIGTERM, with a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from test_service_support import (
    assert_bitwise_equal,
    roi_server_command,
    sample,
    scrape,
    slow_case,
    start_server_process,
)

from roi_client import RoIClient, RoIError
from roi_client._proto.roi.v1 import roi_pb2
from roi_server.settings import FIELDS, Settings, build_parser, load_settings

# ---------------------------------------------------------------------------------------------
# Settings


def test_every_setting_has_a_flag_and_a_variable_named_alike():
    names = {f.name for f in FIELDS}
    assert names == {f.name for f in Settings.__dataclass_fields__.values()}
    for f in FIELDS:
        assert f.env == "ROI_" + f.name.upper(), f
        if f.flag is not None:
            assert f.flag == "--" + f.name.replace("_", "-"), f
        else:
            assert f.secret, f"{f.name} has no flag but is not a secret"
    help_text = build_parser().format_help()
    for f in FIELDS:
        assert f.env in help_text


def test_flags_beat_variables_beat_defaults():
    env = {"ROI_MAX_QUEUE": "9", "ROI_MAX_BOXES": "1_000", "ROI_DEVICE": "CPU", "ROI_MAX_WAIT_MS": "7.5", "ROI_PORT": ""}
    s = load_settings(["--max-queue", "7", "--log-format", "JSON"], env)
    assert s.max_queue == 7  # flag over variable
    assert s.max_boxes == 1000  # variable, with underscores as in Python literals
    assert s.device == "cpu" and s.max_wait_ms == 7.5 and s.log_format == "json"
    assert s.port == Settings().port  # an empty variable counts as unset
    assert s.grace_s == Settings().grace_s
    assert load_settings([], {}) == Settings()


@pytest.mark.parametrize(
    "argv, env, words",
    [
        (["--port", "70000"], {}, ["port must be in [0, 65535]", "70000"]),
        ([], {"ROI_MAX_WAIT_MS": "soon"}, ["ROI_MAX_WAIT_MS", "soon"]),
        (["--max-queue", "0"], {}, ["max_queue must be >= 1"]),
        (["--device", "tpu"], {}, ["device must be auto, cpu, cuda or cuda:N", "tpu"]),
        ([], {"ROI_LOG_FORMAT": "xml"}, ["ROI_LOG_FORMAT must be one of console, json", "xml"]),
        (["--max-message-bytes", "2_000_000_000"], {}, ["max_message_bytes", "1 GiB"]),
    ],
)
def test_bad_configuration_names_the_setting(argv, env, words):
    with pytest.raises(ValueError) as err:
        load_settings(argv, env)
    for w in words:
        assert w in str(err.value)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROI_") or k.startswith("ROI_KERNELS")}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "argv, env, words",
    [
        (["--port", "70000"], {}, ["configuration error", "port must be in [0, 65535]"]),
        ([], {"ROI_MAX_BATCH_REQUESTS": "many"}, ["configuration error", "ROI_MAX_BATCH_REQUESTS"]),
        (["--grace-s", "-1", "--max-boxes", "0"], {}, ["grace_s must be >= 0", "max_boxes must be >= 1"]),
        (["--no-such-flag"], {}, ["unrecognized arguments: --no-such-flag"]),
    ],
)
def test_bad_configuration_exits_2_without_a_traceback(argv, env, words):
    run = subprocess.run(roi_server_command() + argv, capture_output=True, text=True, env=_clean_env(**env), timeout=60)
    assert run.returncode == 2, (run.returncode, run.stderr)
    for w in words:
        assert w in run.stderr, run.stderr
    assert "Traceback" not in run.stderr + run.stdout


# ---------------------------------------------------------------------------------------------
# A running roi-server


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """roi-server configured by flags and variables, logging JSON; test_sigterm_drains (the
    last test of this file) stops it."""
    env = _clean_env(ROI_LOG_FORMAT="json", ROI_MAX_QUEUE="50", ROI_MAX_BOXES="4_000", ROI_MAX_WAIT_MS="7")
    srv = start_server_process(
        tmp_path_factory.mktemp("server"),
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--max-batch-requests", "1", "--max-wait-ms", "3", "--grace-s", "30",
        env=env,
    )
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def test_flags_and_variables_reach_the_server(server_process):
    with RoIClient(server_process.address, timeout=30) as client:
        info = client.describe()
    assert info.limits["max_queue"] == 50  # ROI_MAX_QUEUE
    assert info.limits["max_boxes"] == 4000  # ROI_MAX_BOXES
    assert info.limits["max_wait_ms"] == 3  # the flag over ROI_MAX_WAIT_MS=7
    assert info.limits["max_batch_requests"] == 1
    assert info.limits["max_message_bytes"] == Settings().max_message_bytes  # the default
    # ROI_LOG_FORMAT=json: every line is one JSON object.
    lines = [line for line in server_process.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e["message"].startswith("listening on 127.0.0.1:") for e in entries)


def _watch_health(address: str, statuses: list, stop: threading.Event) -> threading.Thread:
    """Follows the health Watch stream of service "" on its own channel."""

    def run() -> None:
        with grpc.insecure_channel(address) as channel:
            watch = channel.unary_stream(
                "/grpc.health.v1.Health/Watch",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            try:
                for resp in watch(health_pb2.HealthCheckRequest(service=""), timeout=120):
                    statuses.append((time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)))
                    if stop.is_set():
                        break
            except grpc.RpcError as exc:
                statuses.append((time.monotonic(), exc.code().name))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_drains(server_process, seed):
    """SIGTERM mid-burst: health turns NOT_SERVING, new calls are refused, every accepted call
    gets its result, and the process exits 0."""
    srv = server_process
    gen = torch.Generator().manual_seed(seed)
    slow = slow_case(gen, 0.3)
    burst = 8
    statuses: list = []
    stop_watching = threading.Event()
    watcher = _watch_health(srv.address, statuses, stop_watching)
    deadline = time.monotonic() + 10
    while not statuses:
        assert time.monotonic() < deadline, "no health status"
        time.sleep(0.01)
    assert statuses[0][1] == "SERVING"

    channel = grpc.insecure_channel(srv.address)
    pool = channel.unary_unary("/roi.v1.RoIService/Pool")
    futures = [pool.future(slow.request.with_id(f"b{i}").payload, timeout=120) for i in range(burst)]
    # All accepted (in flight) before the signal.
    deadline = time.monotonic() + 30
    while sample(scrape(srv.metrics_url), "roi_requests_in_flight") < burst:
        assert time.monotonic() < deadline, "the burst never arrived"
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    deadline = signalled + 10
    while not any(s == "NOT_SERVING" for _, s in statuses):
        assert time.monotonic() < deadline, f"health never turned NOT_SERVING: {statuses}"
        time.sleep(0.01)
    # New calls are refused, on a new connection and on the open one, while the burst is
    # still being worked through.
    with RoIClient(srv.address, max_attempts=1, timeout=5) as late:
        with pytest.raises(RoIError) as err:
            late.pool(slow.request)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as err:
        pool(slow.request.payload, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not all(f.done() for f in futures), "the burst was over before the refusals were tried"

    for i, f in enumerate(futures):
        resp = roi_pb2.PoolResponse.FromString(f.result())
        assert resp.id == f"b{i}"
        out = np.frombuffer(resp.output.data, np.float32).reshape(list(resp.output.shape))
        assert_bitwise_equal(out, slow.reference.numpy())
    channel.close()
    assert srv.proc.wait(timeout=60) == 0, srv.log()
    stop_watching.set()
    watcher.join(timeout=10)
    messages = [json.loads(line)["message"] for line in srv.log().splitlines() if line.strip()]
    assert any(m.startswith("stopping: draining") for m in messages)
    assert messages[-1] == "stopped"
    assert not any(e for e in messages if "Traceback" in e)
