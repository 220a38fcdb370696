"""The Open Inference Protocol (inference.GRPCInferenceService) on roi-server's port.

Two kinds of tests: with Triton's own client, ``tritonclient[grpc]`` from PyPI, which pins its
own protobuf and grpcio and so runs from a separate virtual environment (``.venv-triton``,
created here when missing) as a subprocess (tests/oip/triton_calls.py) that writes its results
as .npy files; and in-process with our generated stubs (roi_client._proto.inference), for the
paths tritonclient does not reach (batching with roi.v1, metrics, the zero-copy parse, the
stop). Every result is compared bit for bit with the in-process roi_kernels op on the same
inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import random_boxes
from roi_client import RoIClient
from roi_client import oip as wire_oip
from roi_client._proto.inference import grpc_service_pb2 as pb
from roi_client._proto.inference import grpc_service_pb2_grpc as pb_grpc
from roi_client.request import EncodedRequest
from roi_server import oip
from roi_server.server import BackgroundServer
from test_service_support import in_process_server, registry_value, rotated_rois, server_settings, slow_case

import roi_kernels

ROOT = Path(__file__).resolve().parents[1]
TRITON_VENV = ROOT / ".venv-triton"
TRITON_CALLS = Path(__file__).resolve().parent / "oip" / "triton_calls.py"
MODELS = oip.MODELS
DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16, "FP64": torch.float64}
TOKEN = "oip-test-token-0123456789abcdef"


# ---------------------------------------------------------------------------------------------
# Cases: OIP inputs and parameters, and the roi_kernels result on them


@dataclass
class OIPCase:
    name: str
    model: str
    inputs: list[tuple[str, str, torch.Tensor]]  # (name, datatype, tensor)
    parameters: dict
    reference: torch.Tensor
    datatype: str = "FP32"
    extra: dict = field(default_factory=dict)

    def request(self, raw: bool = True) -> pb.ModelInferRequest:
        """The ModelInferRequest with our stubs: raw_input_contents, or typed contents."""
        req = pb.ModelInferRequest(model_name=self.model, id=self.name)
        for key, value in self.parameters.items():
            set_parameter(req.parameters[key], value)
        for name, datatype, t in self.inputs:
            inp = req.inputs.add(name=name, datatype=datatype, shape=list(t.shape))
            if raw:
                req.raw_input_contents.append(as_numpy(t).tobytes())
            else:
                field_name = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents"}[
                    datatype
                ]
                getattr(inp.contents, field_name).extend(t.reshape(-1).tolist())
        return req

    @property
    def output_bytes(self) -> int:
        return self.reference.numel() * self.reference.element_size()


def set_parameter(p: pb.InferParameter, value) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's bits as numpy (bfloat16 as uint16 words)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


def oip_case(model: str, datatype: str, gen: torch.Generator, variant: int = 0) -> OIPCase:
    td = DTYPES[datatype]
    n, k = 2, int(torch.randint(1, 30, (1,), generator=gen))
    h_img, w_img = 256, 320
    boxes = random_boxes(gen, k, h_img, w_img, num_images=n, max_side=256)
    box_type = "FP64" if variant % 2 else "FP32"
    if box_type == "FP64":
        boxes = boxes.double()

    def maps(c: int, h: int = 16, w: int = 20) -> torch.Tensor:
        return torch.randn(n, c, h, w, generator=gen).to(td)

    name = f"{model}-{datatype}-{variant}"
    if model == "roi_align":
        x = maps(12)
        sr, aligned, mode = [(2, True, "avg"), (-1, False, "max")][variant % 2]
        params = {
            "pooled_height": 7,
            "pooled_width": 5,
            "spatial_scale": 1 / 16,
            "sampling_ratio": sr,
            "aligned": aligned,
            "pool_mode": mode,
        }
        ref = roi_kernels.roi_align(x, boxes, (7, 5), 1 / 16, sr, aligned, mode)
    elif model == "roi_pool":
        x = maps(12)
        params = {"pooled_height": 6, "pooled_width": 4, "spatial_scale": 1 / 16}
        ref = roi_kernels.roi_pool(x, boxes, (6, 4), 1 / 16)
    elif model == "ps_roi_align":
        x = maps(27)
        params = {"pooled_height": 3, "pooled_width": 3, "spatial_scale": 1 / 16, "sampling_ratio": 2}
        ref = roi_kernels.ps_roi_align(x, boxes, 3, 1 / 16, 2)
    elif model == "ps_roi_pool":
        x = maps(27)
        params = {"pooled_height": 3, "pooled_width": 3, "spatial_scale": 1 / 16}
        ref = roi_kernels.ps_roi_pool(x, boxes, 3, 1 / 16)
    elif model == "roi_align_rotated":
        x = maps(12)
        boxes = rotated_rois(gen, k, h_img, w_img, n).to(boxes.dtype)
        # aligned defaults to true for this op: false is given, the default is left out.
        aligned = variant % 2 == 0
        params = {"pooled_height": 5, "pooled_width": 5, "spatial_scale": 1 / 16, "sampling_ratio": 2}
        if not aligned:
            params["aligned"] = False
        ref = roi_kernels.roi_align_rotated(x, boxes, 5, 1 / 16, 2, aligned)
    elif model == "multiscale_roi_align":
        levels = [maps(8, h_img // s, w_img // s) for s in (4, 8, 16, 32)]
        sizes = [(h_img, w_img)] * n
        params = {"pooled_height": 7, "pooled_width": 7, "sampling_ratio": 2, "aligned": True}
        inputs = [(f"level_{i}", datatype, lv) for i, lv in enumerate(levels)] + [("rois", box_type, boxes)]
        if variant % 2 == 0:
            inputs.append(("image_sizes", "INT64", torch.tensor(sizes, dtype=torch.int64)))
        else:
            params.update({f"spatial_scale_{i}": 1 / s for i, s in enumerate((4, 8, 16, 32))})
        ref = roi_kernels.multiscale_roi_align(levels, boxes, sizes, 7, 2, True)
        return OIPCase(name, model, inputs, params, ref, datatype)
    else:
        raise ValueError(model)
    return OIPCase(name, model, [("input", datatype, x), ("rois", box_type, boxes)], params, ref, datatype)


def assert_bits(got: np.ndarray, want: torch.Tensor) -> None:
    expected = as_numpy(want)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    assert got.tobytes() == expected.tobytes(), f"{int((got != expected).sum())} elements differ"


def decode_output(resp: pb.ModelInferResponse) -> np.ndarray:
    out = resp.outputs[0]
    dtype = {"FP32": np.float32, "FP16": np.float16, "BF16": np.uint16, "FP64": np.float64}[out.datatype]
    return np.frombuffer(resp.raw_output_contents[0], dtype=dtype).reshape(list(out.shape))


# ---------------------------------------------------------------------------------------------
# tritonclient in its own environment


def _triton_ready(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import tritonclient.grpc, tritonclient.utils.shared_memory, ml_dtypes"],
        check=False,
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """The Python of .venv-triton, with tritonclient[grpc] (made from PyPI when missing)."""
    python = TRITON_VENV / "bin" / "python"
    if not _triton_ready(python):
        subprocess.run([sys.executable, "-m", "venv", str(TRITON_VENV)], check=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "tritonclient[grpc]", "numpy"],
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (
            f"pip install tritonclient[grpc] into {TRITON_VENV} failed:\n{done.stderr[-3000:]}"
        )
        assert _triton_ready(python)
    return python


def run_triton(
    python: Path,
    address: str,
    folder: Path,
    calls: list[dict],
    cases: dict[str, OIPCase] | None = None,
    token: str | None = None,
    tls_ca: Path | None = None,
) -> dict:
    """Writes the cases' inputs and ``calls`` into ``folder``, runs triton_calls.py there (with
    ``token`` on every call, over TLS trusting ``tls_ca``), and returns its results.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in (cases or {}).values():
        for name, _, t in case.inputs:
            np.save(folder / f"{case.name}.{name}.npy", as_numpy(t))
    (folder / "calls.json").write_text(json.dumps(calls))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    if token:
        env["ROI_TEST_TOKEN"] = token
    if tls_ca:
        env["ROI_TEST_TLS_CA"] = str(tls_ca)
    done = subprocess.run(
        [str(python), str(TRITON_CALLS), address, str(folder)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((folder / "results.json").read_text())


def infer_call(case: OIPCase, kind: str = "infer", typed: bool = False) -> dict:
    return {
        "id": case.name,
        "kind": kind,
        "model": case.model,
        "inputs": [{"name": n, "datatype": d, "file": f"{case.name}.{n}.npy"} for n, d, _ in case.inputs],
        "parameters": case.parameters,
        "typed": typed,
        "output_bytes": case.output_bytes,
    }


def result_of(folder: Path, call_id: str) -> np.ndarray:
    return np.load(folder / f"{call_id}.npy")


# ---------------------------------------------------------------------------------------------
# Servers


@pytest.fixture(scope="module")
def server():
    with in_process_server(allow_shared_memory=True, max_boxes=1000) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(
        server.address, options=[("grpc.max_receive_message_length", 1 << 28)]
    ) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def all_cases(seed: int, variants=(0, 1)) -> dict[str, OIPCase]:
    gen = torch.Generator().manual_seed(seed)
    cases = [oip_case(m, d, gen, v) for m in MODELS for d in DTYPES for v in variants]
    return {c.name: c for c in cases}


# ---------------------------------------------------------------------------------------------
# With tritonclient


def test_our_proto_is_tritonclients(triton_python, tmp_path):
    """Every message, field and method of protos/inference/grpc_service.proto has the name,
    number and type of tritonclient's own (tests/oip/compare_descriptors.py)."""
    from google.protobuf import descriptor_pb2

    ours = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(ours)
    (tmp_path / "ours.desc").write_bytes(ours.SerializeToString())
    done = subprocess.run(
        [
            str(triton_python),
            str(TRITON_CALLS.parent / "compare_descriptors.py"),
            str(tmp_path / "ours.desc"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "methods agree" in done.stdout


def test_tritonclient_every_model_and_datatype(server, triton_python, tmp_path, seed):
    """Every model in FP32, FP16, BF16 and FP64 through InferenceServerClient.infer (raw
    contents), and FP32/FP64 as typed contents, equal roi_kernels bit for bit."""
    cases = all_cases(seed)
    calls = [infer_call(c) for c in cases.values()]
    typed = {f"{c.name}-typed": c for c in cases.values() if c.datatype in ("FP32", "FP64")}
    for name, c in typed.items():
        calls.append({**infer_call(c, typed=True), "id": name})
    results = run_triton(triton_python, server.address, tmp_path, calls, cases)
    for name, case in [*cases.items(), *typed.items()]:
        r = results[name]
        assert r["ok"], (name, r)
        assert r["id"] == name and r["datatype"] == case.datatype
        assert_bits(result_of(tmp_path, name), case.reference)
        assert r["parameters"]["batch_requests"] >= 1 and r["parameters"]["compute_seconds"] > 0


def test_tritonclient_shared_memory(server, triton_python, tmp_path, seed):
    """Every model with its inputs and its output in tritonclient.utils.shared_memory regions
    (keys "/roi_..."), registered through SystemSharedMemoryRegister: the output is written
    into the region, none comes in the message."""
    cases = all_cases(seed, variants=(0,))
    calls = [infer_call(c, kind="shm") for c in cases.values()]
    results = run_triton(triton_python, server.address, tmp_path, calls, cases)
    for name, case in cases.items():
        r = results[name]
        assert r["ok"], (name, r)
        assert r["raw_outputs"] == 0
        assert f"{name}_out" in r["status_regions"]
        assert_bits(result_of(tmp_path, name), case.reference)
    # Every region was unregistered again.
    assert server.server.shared_memory.status("") == []


def test_tritonclient_stream(server, triton_python, tmp_path, seed):
    """ModelStreamInfer through start_stream/async_stream_infer: every answer equals
    roi_kernels, and a bad request in the stream is answered with its error while the others
    go on."""
    cases = {k: v for k, v in all_cases(seed, variants=(0,)).items() if v.datatype in ("FP32", "BF16")}
    subs = [infer_call(c) for c in cases.values()]
    bad = dict(subs[0], id="bad", parameters={**subs[0]["parameters"], "pooled_height": 0})
    calls = [{"id": "stream", "kind": "stream", "calls": [*subs[:3], bad, *subs[3:]]}]
    results = run_triton(triton_python, server.address, tmp_path, calls, cases)
    outcomes = results["stream"]["outcomes"]
    for name, case in cases.items():
        assert outcomes[name]["ok"], name
        assert_bits(result_of(tmp_path, name), case.reference)
    errors = [v for k, v in outcomes.items() if k.startswith("error")]
    assert len(errors) == 1 and "pooled_height" in errors[0]["message"], errors


def test_tritonclient_metadata(server, triton_python, tmp_path):
    calls = [{"id": m, "kind": "metadata", "model": m} for m in MODELS]
    calls.append({"id": "unknown", "kind": "metadata", "model": "resnet50"})
    results = run_triton(triton_python, server.address, tmp_path, calls)
    for m in MODELS:
        r = results[m]
        assert r["ok"] and r["live"] and r["ready"] and r["model_ready"], r
        assert r["server"]["name"] == "roi-server" and "system_shared_memory" in r["server"]["extensions"]
        meta = r["model"]
        assert meta["name"] == m and meta["versions"] == ["1"]
        inputs = {t["name"]: (t["datatype"], [int(s) for s in t["shape"]]) for t in meta["inputs"]}
        cols = 6 if m == "roi_align_rotated" else 5
        assert inputs["rois"] == ("FP32", [-1, cols])
        if m == "multiscale_roi_align":
            assert inputs["level_0"] == ("FP32", [-1, -1, -1, -1]) and inputs["image_sizes"] == (
                "INT64",
                [-1, 2],
            )
        else:
            assert set(inputs) == {"input", "rois"} and inputs["input"] == ("FP32", [-1, -1, -1, -1])
        assert [t["name"] for t in meta["outputs"]] == ["output"]
        assert {x["name"]: x["state"] for x in r["index"]["models"]} == dict.fromkeys(MODELS, "READY")
    unknown = results["unknown"]
    assert (
        not unknown["ok"] and unknown["status"] == "StatusCode.NOT_FOUND" and "resnet50" in unknown["message"]
    )


def _bad_cases(seed: int) -> list[tuple[dict, str, str]]:
    """(call, status, words the message must hold), each a small change of a good call."""
    gen = torch.Generator().manual_seed(seed)
    case = oip_case("roi_align", "FP32", gen)
    good = infer_call(case)
    rois_file = f"{case.name}.rois.npy"
    out = [
        (dict(good, model="resnet50"), "NOT_FOUND", "unknown model 'resnet50'"),
        (dict(good, inputs=good["inputs"][:1]), "INVALID_ARGUMENT", "input 'rois': is missing"),
        (
            dict(
                good,
                inputs=[good["inputs"][0], {"name": "rois", "datatype": "INT64", "file": "rois_int.npy"}],
            ),
            "INVALID_ARGUMENT",
            "input 'rois' datatype: must be FP32, FP64, got 'INT64'",
        ),
        (
            dict(
                good, inputs=[good["inputs"][0], {"name": "rois", "datatype": "FP32", "file": "rois_4.npy"}]
            ),
            "INVALID_ARGUMENT",
            "input 'rois' shape: must be [K, 5]",
        ),
        (
            dict(good, inputs=[{"name": "input", "datatype": "FP32", "file": "map3.npy"}, good["inputs"][1]]),
            "INVALID_ARGUMENT",
            "input 'input' shape: must be [N, C, H, W]",
        ),
        (
            dict(good, parameters={**good["parameters"], "spatial_scale": -1.0}),
            "INVALID_ARGUMENT",
            "parameter 'spatial_scale'",
        ),
        (
            dict(good, parameters={**good["parameters"], "pool_mode": "median"}),
            "INVALID_ARGUMENT",
            "parameter 'pool_mode'",
        ),
        (
            dict(good, parameters={**good["parameters"], "canonical_level": 3}),
            "INVALID_ARGUMENT",
            "parameter 'canonical_level': unknown",
        ),
        (
            dict(good, parameters={k: v for k, v in good["parameters"].items() if k != "pooled_width"}),
            "INVALID_ARGUMENT",
            "parameter 'pooled_width': is required",
        ),
        (
            dict(
                good,
                inputs=[good["inputs"][0], {"name": "rois", "datatype": "FP32", "file": "rois_many.npy"}],
            ),
            "INVALID_ARGUMENT",
            "input 'rois': 1001 boxes, above this server's limit of 1000",
        ),
        (
            dict(
                good,
                inputs=[
                    good["inputs"][0],
                    {"name": "rois", "datatype": "FP32", "file": "rois_bad_index.npy"},
                ],
            ),
            "INVALID_ARGUMENT",
            "input 'rois': box 0 has image index 7",
        ),
    ]
    for i, (call, _, _) in enumerate(out):
        call["id"] = f"bad{i}"
    return out, case, rois_file


def test_tritonclient_errors(server, triton_python, tmp_path, seed):
    """Each bad request gets its status and a message naming the input or parameter; a good
    request after them is answered."""
    bad, case, _ = _bad_cases(seed)
    tmp_path.mkdir(exist_ok=True)
    np.save(tmp_path / "rois_int.npy", np.zeros((3, 5), np.int64))
    np.save(tmp_path / "rois_4.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "map3.npy", np.ones((12, 16, 20), np.float32))
    many = np.zeros((1001, 5), np.float32)
    many[:, 3:] = 8
    np.save(tmp_path / "rois_many.npy", many)
    np.save(tmp_path / "rois_bad_index.npy", np.array([[7, 0, 0, 8, 8]], np.float32))
    calls = [c for c, _, _ in bad] + [infer_call(case)]
    results = run_triton(triton_python, server.address, tmp_path, calls, {case.name: case})
    for call, status, words in bad:
        r = results[call["id"]]
        assert not r["ok"], (call["id"], words)
        assert r["status"] == f"StatusCode.{status}", (words, r)
        assert words in r["message"], (words, r["message"])
    assert results[case.name]["ok"]
    assert_bits(result_of(tmp_path, case.name), case.reference)


def test_tritonclient_with_a_token(triton_python, tmp_path, seed):
    """The same bearer token as roi.v1's: tritonclient with it (a plugin setting the header)
    is served, without it refused UNAUTHENTICATED."""
    case = oip_case("roi_pool", "FP32", torch.Generator().manual_seed(seed))
    with in_process_server(auth_token=TOKEN) as srv:
        with_token = run_triton(
            triton_python, srv.address, tmp_path / "with", [infer_call(case)], {case.name: case}, token=TOKEN
        )
        without = run_triton(
            triton_python, srv.address, tmp_path / "without", [infer_call(case)], {case.name: case}
        )
        labels = {"op": "roi_pool", "code": "UNAUTHENTICATED"}
        # Refused by the token check, and counted under its model as roi.v1's are.
        assert registry_value(srv, "roi_requests_total", protocol="oip", **labels) == 1
        assert registry_value(srv, "roi_requests_total", **labels) == 1
        assert (
            registry_value(srv, "roi_requests_total", protocol="oip", op="roi_pool", code="OK")
            == 1
        )
    assert with_token[case.name]["ok"]
    assert_bits(result_of(tmp_path / "with", case.name), case.reference)
    assert not without[case.name]["ok"] and without[case.name]["status"] == "StatusCode.UNAUTHENTICATED"


def test_tritonclient_over_tls(triton_python, tmp_path, seed):
    """A server with --tls-cert/--tls-key serves tritonclient over TLS (ssl=True, our CA)
    on the same port, and refuses it in plaintext."""
    from test_security import Authority

    ca = Authority(tmp_path, "oip-test")
    issued = ca.issue("roi-server", server=True)
    case = oip_case("ps_roi_align", "FP16", torch.Generator().manual_seed(seed))
    with in_process_server(tls_cert=str(issued.cert), tls_key=str(issued.key)) as srv:
        secure = run_triton(
            triton_python,
            srv.address,
            tmp_path / "tls",
            [infer_call(case)],
            {case.name: case},
            tls_ca=ca.path,
        )
        plain = run_triton(
            triton_python, srv.address, tmp_path / "plain", [infer_call(case)], {case.name: case}
        )
    assert secure[case.name]["ok"], secure
    assert_bits(result_of(tmp_path / "tls", case.name), case.reference)
    assert not plain[case.name]["ok"] and plain[case.name]["status"] == "StatusCode.UNAVAILABLE", plain


def test_cuda_shared_memory_is_unimplemented(server, triton_python, tmp_path):
    """tritonclient's CUDA shared memory calls are answered UNIMPLEMENTED, saying what to use."""
    calls = run_triton(triton_python, server.address, tmp_path, [{"id": "cuda", "kind": "cuda"}])["cuda"][
        "calls"
    ]
    assert set(calls) == {"register", "status", "unregister"}
    for r in calls.values():
        assert not r["ok"] and r["status"] == "StatusCode.UNIMPLEMENTED", r
        assert "system shared memory" in r["message"], r


# ---------------------------------------------------------------------------------------------
# In-process, with our stubs


def test_stubs_every_model_raw_and_typed(stub, seed):
    for case in all_cases(seed).values():
        assert_bits(decode_output(stub.ModelInfer(case.request(raw=True))), case.reference)
        if case.datatype in ("FP32", "FP64"):
            assert_bits(decode_output(stub.ModelInfer(case.request(raw=False))), case.reference)


def test_large_request_is_parsed_without_copies(seed):
    """A request above the walk's threshold: the parsed raw_input_contents are views of the
    received bytes, and the translated request's tensors read them in place."""
    gen = torch.Generator().manual_seed(seed)
    case = oip_case("roi_align", "FP32", gen)
    x = torch.randn(2, 64, 40, 50, generator=gen)
    case.inputs[0] = ("input", "FP32", x)
    raw = case.request().SerializeToString()
    assert len(raw) > oip.WALK_MIN_BYTES
    req, views = oip.parse_infer_request(raw)
    assert not req.raw_input_contents and len(views) == 2
    base = np.frombuffer(raw, np.uint8)
    assert all(np.shares_memory(np.frombuffer(v, np.uint8), base) for v in views)
    assert bytes(views[0]) == x.numpy().tobytes()
    # The same parse as protobuf's, field for field.
    whole = pb.ModelInferRequest.FromString(raw)
    assert [bytes(v) for v in views] == list(whole.raw_input_contents)
    whole.ClearField("raw_input_contents")
    assert req == whole
    # Broken messages go to protobuf, which refuses them.
    with pytest.raises(Exception, match="ModelInferRequest"):
        oip.parse_infer_request(raw[:-7])


def test_serialisation_matches_protobuf_and_aligns_payloads(seed):
    """The join writes what protobuf writes (a padding field aside, which protobuf skips as
    unknown), with each payload on a 64-byte offset of the message, unwrapped or inside a
    ModelStreamInferResponse; and the split of such a message finds the payloads there."""
    gen = torch.Generator().manual_seed(seed)
    for shape in [(3, 4, 5, 6), (1, 1, 1, 1), (0, 2, 7, 7), (2, 256, 7, 7)]:
        payload = torch.randn(*shape, generator=gen).numpy()
        resp = pb.ModelInferResponse(
            model_name="roi_align", id="x" * int(torch.randint(0, 300, (1,), generator=gen))
        )
        resp.outputs.add(name="output", datatype="FP32", shape=list(payload.shape))
        theirs = pb.ModelInferResponse()
        theirs.CopyFrom(resp)
        theirs.raw_output_contents.append(payload.tobytes())
        ours = oip.serialize_infer_response(resp, payload)
        parsed = pb.ModelInferResponse.FromString(ours)
        parsed.DiscardUnknownFields()
        assert parsed == theirs
        _, views = wire_oip.parse_infer_response(ours, min_bytes=0)
        assert [bytes(v) for v in views] == [payload.tobytes()]
        start = np.frombuffer(ours, np.uint8).ctypes.data
        if payload.nbytes:
            assert (np.frombuffer(views[0], np.uint8).ctypes.data - start) % wire_oip.ALIGNMENT == 0
        wrapped_bytes = oip.serialize_infer_response(resp, payload, wrap_key=b"\x12")
        wrapped = pb.ModelStreamInferResponse.FromString(wrapped_bytes)
        wrapped.DiscardUnknownFields()
        assert wrapped.infer_response == theirs and not wrapped.error_message
        if payload.nbytes:
            at = wrapped_bytes.find(payload.tobytes())
            assert at % wire_oip.ALIGNMENT == 0
    # A request with several inputs: each payload aligned, the parse protobuf's.
    arrays = [
        torch.randn(2, 32, 40, 50, generator=gen).numpy(),
        torch.rand(9, 5, generator=gen).numpy().astype(np.float64),
    ]
    req, payloads = wire_oip.infer_request(
        "roi_align", [("input", arrays[0], None), ("rois", arrays[1], None)], {"pooled_height": 7}
    )
    raw = wire_oip.serialize_infer_request(req, payloads)
    parsed, views = oip.parse_infer_request(raw)
    start = np.frombuffer(raw, np.uint8).ctypes.data
    assert all((np.frombuffer(v, np.uint8).ctypes.data - start) % 64 == 0 for v in views)
    assert [bytes(v) for v in views] == [a.tobytes() for a in arrays]
    parsed.DiscardUnknownFields()
    assert parsed == req


def test_oip_and_roi_v1_requests_share_a_launch(seed):
    """An OIP request and a roi.v1 request for the same op and parameters, sent together to a
    server whose batches wait for company, run in one kernel launch (one batch, two
    requests), and each gets its own result; the metrics count one request per protocol."""
    gen = torch.Generator().manual_seed(seed)
    case = oip_case("roi_align", "FP32", gen)
    x2 = torch.randn(2, 12, 16, 20, generator=gen)
    boxes2 = random_boxes(gen, 9, 256, 320, num_images=2, max_side=256)
    p = case.parameters
    ref2 = roi_kernels.roi_align(
        x2, boxes2, (7, 5), 1 / 16, p["sampling_ratio"], p["aligned"], p["pool_mode"]
    )
    with in_process_server(max_wait_ms=1500) as srv:
        batches_before = registry_value(srv, "roi_batches_total", op="roi_align")
        out: dict = {}
        with grpc.insecure_channel(srv.address) as channel, RoIClient(srv.address, timeout=60) as client:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            t = threading.Thread(target=lambda: out.update(oip=stub.ModelInfer(case.request(), timeout=60)))
            t.start()
            time.sleep(0.2)
            req = EncodedRequest.roi_align(
                x2, boxes2, (7, 5), 1 / 16, p["sampling_ratio"], p["aligned"], p["pool_mode"]
            )
            out["roi"] = client.pool_with_timings(req)
            t.join()
        resp = out["oip"]
        assert_bits(decode_output(resp), case.reference)
        assert torch.equal(out["roi"].output, ref2)
        assert resp.parameters["batch_requests"].int64_param == 2
        assert out["roi"].timings.batch_requests == 2
        assert resp.parameters["batch_id"].int64_param == out["roi"].timings.batch_id
        assert registry_value(srv, "roi_batches_total", op="roi_align") == batches_before + 1
        by = lambda proto: registry_value(
            srv, "roi_requests_total", protocol=proto, op="roi_align", code="OK"
        )
        assert by("oip") == 1 and by("roi_v1") == 1
        assert registry_value(srv, "roi_requests_total", op="roi_align", code="OK") == 2


def test_errors_through_stubs_are_counted(stub, server, seed):
    case = oip_case("ps_roi_pool", "FP16", torch.Generator().manual_seed(seed))
    before = registry_value(
        server, "roi_requests_total", protocol="oip", op="ps_roi_pool", code="INVALID_ARGUMENT"
    )
    req = case.request()
    req.parameters["pooled_height"].int64_param = 4  # 27 channels are not divisible by 4 * 3
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("input 'input' shape: ps_roi_pool needs channels divisible by"), (
        err.value.details()
    )
    after = registry_value(
        server, "roi_requests_total", protocol="oip", op="ps_roi_pool", code="INVALID_ARGUMENT"
    )
    assert after == before + 1
    # FP16 has no typed contents in the protocol.
    typed = case.request()
    typed.ClearField("raw_input_contents")
    typed.inputs[0].contents.fp32_contents.extend([0.0])
    typed.inputs[1].contents.fp32_contents.extend([0.0])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(typed)
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "input 'input' contents: FP16 has no typed contents" in err.value.details()
    )


def test_stop_finishes_in_flight_requests_and_readiness_goes_false(seed):
    """On stop, ServerReady turns false and new OIP calls are refused UNAVAILABLE, while the
    request already running finishes with its result."""
    gen = torch.Generator().manual_seed(seed)
    # The sampling ratio that makes this roi_align take about 1.5 s here (slow_case's name).
    sr = int(slow_case(gen, 1.5).name.split("-")[1])
    xs = torch.randn(1, 32, 48, 48, generator=gen)
    rois = torch.tensor([[0, 0.0, 0.0, 47.0, 47.0]] * 16)
    ref = roi_kernels.roi_align(xs, rois, 7, 1.0, sr, True)
    case = OIPCase(
        "slow",
        "roi_align",
        [("input", "FP32", xs), ("rois", "FP32", rois)],
        {"pooled_height": 7, "pooled_width": 7, "spatial_scale": 1.0, "sampling_ratio": sr, "aligned": True},
        ref,
    )
    srv = BackgroundServer(server_settings()).start()
    out: dict = {}
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest()).ready
            t = threading.Thread(target=lambda: out.update(resp=stub.ModelInfer(case.request(), timeout=60)))
            t.start()
            time.sleep(0.3)
            stopper = threading.Thread(target=lambda: (srv.stop(grace=30), out.update(stopped=True)))
            stopper.start()
            time.sleep(0.2)
            try:
                out["ready"] = stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            except grpc.RpcError as exc:
                out["ready"] = exc.code()
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(case.request(), timeout=10)
            t.join()
            stopper.join()
    finally:
        if not out.get("stopped"):
            srv.stop()
    assert out["ready"] in (False, grpc.StatusCode.UNAVAILABLE)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # The refusal, made before the message is parsed, is counted under its model.
    labels = {"protocol": "oip", "op": "roi_align"}
    assert registry_value(srv, "roi_requests_total", code="UNAVAILABLE", **labels) >= 1
    assert registry_value(srv, "roi_requests_total", code="OK", **labels) == 1
    assert_bits(decode_output(out["resp"]), ref)


def test_field_names_are_reworded():
    assert oip.oip_field("boxes.rois.shape") == "input 'rois' shape"
    assert oip.oip_field("pyramid.levels[2].map.dtype") == "input 'level_2' datatype"
    assert oip.oip_field("pyramid.levels[1].spatial_scale") == "parameter 'spatial_scale_1'"
    assert oip.oip_field("params.sampling_ratio") == "parameter 'sampling_ratio'"
    assert oip.oip_field("input.shared_memory.byte_size") == "input 'input' shared_memory_byte_size"
    assert oip.oip_field("output_region.byte_size") == "output 'output' shared_memory_byte_size"


def test_loadtest_over_oip(server, tmp_path):
    """roi-loadtest --protocol oip drives the OIP endpoint with the standard workloads (results
    checked against roi_kernels by --verify), and its client side imports no torch."""
    out = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for workload, dtype in (("tiny", "float32"), ("fpn-det", "float16")):
        cmd = [sys.executable, "-c", "from roi_client.loadtest import main; raise SystemExit(main())", server.address,
               "--protocol", "oip", "--workload", workload, "--dtype", dtype, "-n", "6", "--warmup", "0", "-c", "2",
               "--verify", "2", "--json", str(out), "--quiet"]  # fmt: skip
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        run = json.loads(out.read_text())
        assert run["meta"]["protocol"] == "oip"
        r = run["runs"][0]
        assert r["error_count"] == 0 and r["ok"] >= 6, r
        assert r["verify"]["checked"] >= 1 and r["verify"]["mismatches"] == 0, r["verify"]
    probe = (
        "import sys; from roi_client.loadtest import cli, oip_senders; from roi_client import oip; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    ragged = subprocess.run(
        [sys.executable, "-c", "from roi_client.loadtest import main; raise SystemExit(main())", server.address,
         "--protocol", "oip", "--op", "ragged_roi_align", "-n", "1"],
        check=False, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert ragged.returncode == 2 and "no ragged maps" in ragged.stderr


def test_shared_memory_errors_name_the_input(stub, server, seed):
    """Shared memory through our stubs: a key outside the prefix, an unregistered region, a
    byte size that is not the tensor's and an output region too small are each refused naming
    what is wrong; a server without --allow-shared-memory refuses with FAILED_PRECONDITION."""
    case = oip_case("roi_align", "FP32", torch.Generator().manual_seed(seed))
    x = as_numpy(case.inputs[0][2])
    key = f"roi_oip_test_{os.getpid()}"
    path = Path("/dev/shm") / key
    path.write_bytes(x.tobytes() + bytes(case.output_bytes))
    try:

        def refused(call, code, words):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code, err.value.details()
            assert words in err.value.details(), err.value.details()

        reg = pb.SystemSharedMemoryRegisterRequest
        refused(lambda: stub.SystemSharedMemoryRegister(reg(name="m", key="/other_x", byte_size=16)),
                grpc.StatusCode.INVALID_ARGUMENT, "key: this server maps only objects whose names start with 'roi_'")  # fmt: skip
        stub.SystemSharedMemoryRegister(reg(name="m", key="/" + key, byte_size=path.stat().st_size))
        status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="m"))
        assert status.regions["m"].key == "/" + key and status.regions["m"].byte_size == path.stat().st_size

        def with_region(region: str, size: int, out_size: int | None = None) -> pb.ModelInferRequest:
            req = case.request()
            req.ClearField("raw_input_contents")
            req.inputs[1].contents.fp32_contents.extend(case.inputs[1][2].reshape(-1).tolist())
            req.inputs[0].parameters["shared_memory_region"].string_param = region
            req.inputs[0].parameters["shared_memory_byte_size"].int64_param = size
            if out_size is not None:
                out = req.outputs.add(name="output")
                out.parameters["shared_memory_region"].string_param = "m"
                out.parameters["shared_memory_byte_size"].int64_param = out_size
                out.parameters["shared_memory_offset"].int64_param = x.nbytes
            return req

        # Typed rois and the map in the region: the result as by the wire.
        resp = stub.ModelInfer(with_region("m", x.nbytes))
        assert_bits(decode_output(resp), case.reference)
        resp = stub.ModelInfer(with_region("m", x.nbytes, case.output_bytes))
        assert not resp.raw_output_contents
        got = np.frombuffer(path.read_bytes()[x.nbytes :], np.float32).reshape(case.reference.shape)
        assert_bits(got, case.reference)
        refused(lambda: stub.ModelInfer(with_region("nope", x.nbytes)), grpc.StatusCode.INVALID_ARGUMENT,
                "input 'input' shared_memory_region: no region 'nope' is registered")  # fmt: skip
        refused(lambda: stub.ModelInfer(with_region("m", x.nbytes - 4)), grpc.StatusCode.INVALID_ARGUMENT,
                "input 'input' shared_memory_byte_size")  # fmt: skip
        refused(lambda: stub.ModelInfer(with_region("m", x.nbytes, case.output_bytes - 4)),
                grpc.StatusCode.INVALID_ARGUMENT, "output 'output' shared_memory_byte_size")  # fmt: skip
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="m"))
        refused(lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="m")),
                grpc.StatusCode.INVALID_ARGUMENT, "name: no region 'm' is registered")  # fmt: skip
        with in_process_server() as off, grpc.insecure_channel(off.address) as channel:
            off_stub = pb_grpc.GRPCInferenceServiceStub(channel)
            refused(lambda: off_stub.SystemSharedMemoryRegister(reg(name="m", key="/" + key, byte_size=16)),
                    grpc.StatusCode.FAILED_PRECONDITION, "--allow-shared-memory")  # fmt: skip
            refused(lambda: off_stub.ModelInfer(with_region("m", x.nbytes)), grpc.StatusCode.FAILED_PRECONDITION,
                    "input 'input' shared memory: shared memory is off on this server")  # fmt: skip
            assert (
                "system_shared_memory" not in off_stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
            )
    finally:
        path.unlink()


def test_multiscale_levels_are_checked_by_name(stub, seed):
    """Levels are level_0 ... level_<L-1>: a gap, a huge index or one level named twice is
    refused naming the input; scales per level as parameters need one per level."""
    case = oip_case("multiscale_roi_align", "FP32", torch.Generator().manual_seed(seed), variant=1)

    def renamed(names: dict[str, str]) -> pb.ModelInferRequest:
        req = case.request()
        for inp in req.inputs:
            inp.name = names.get(inp.name, inp.name)
        return req

    for names, words in [
        ({"level_1": "level_7"}, "input 'level_1': is missing"),
        ({"level_0": "level_1000000000000", "level_1": "level_9", "level_2": "level_8", "level_3": "level_5"},
         "input 'level_0': is missing"),
        ({"level_1": "level_00"}, "input 'level_00': names level 0, which another input names too"),
        ({"rois": "boxes"}, "input 'boxes': unknown for model 'multiscale_roi_align'"),
    ]:  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(renamed(names))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), (
            err.value.details()
        )
    req = case.request()
    del req.parameters["spatial_scale_2"]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert "parameters 'spatial_scale_<l>': give a scale on every level or on none" in err.value.details()
    assert_bits(decode_output(stub.ModelInfer(case.request())), case.reference)


def test_stream_answers_what_it_read_on_stop(seed):
    """A ModelStreamInfer stream open when the server stops: the request it had read is
    answered with its result, then the stream ends with UNAVAILABLE (which clients retry
    elsewhere), as roi.v1's PoolStream does."""
    gen = torch.Generator().manual_seed(seed)
    sr = int(slow_case(gen, 1.0).name.split("-")[1])
    xs = torch.randn(1, 32, 48, 48, generator=gen)
    rois = torch.tensor([[0, 0.0, 0.0, 47.0, 47.0]] * 16)
    params = {
        "pooled_height": 7,
        "pooled_width": 7,
        "spatial_scale": 1.0,
        "sampling_ratio": sr,
        "aligned": True,
    }
    case = OIPCase("slow", "roi_align", [("input", "FP32", xs), ("rois", "FP32", rois)], params,
                   roi_kernels.roi_align(xs, rois, 7, 1.0, sr, True))  # fmt: skip
    srv = BackgroundServer(server_settings()).start()
    got: dict = {"answers": []}
    gate = threading.Event()

    def requests():
        yield case.request()
        gate.wait(30)  # the stream stays open until the stop has begun

    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def read():
                try:
                    for answer in stub.ModelStreamInfer(requests(), timeout=60):
                        got["answers"].append(answer)
                except grpc.RpcError as exc:
                    got["end"] = exc.code()

            reader = threading.Thread(target=read)
            reader.start()
            time.sleep(0.3)
            stopper = threading.Thread(target=lambda: (srv.stop(grace=30), got.update(stopped=True)))
            stopper.start()
            reader.join(60)
            gate.set()
            stopper.join(60)
    finally:
        gate.set()
        if not got.get("stopped"):
            srv.stop()
    [answer] = got["answers"]
    assert not answer.error_message
    assert_bits(decode_output(answer.infer_response), case.reference)
    assert got.get("end") == grpc.StatusCode.UNAVAILABLE
