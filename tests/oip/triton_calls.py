"""Calls roi-server with Triton's own client (tritonclient[grpc]), for tests/test_oip.py.

Runs in the separate virtual environment that holds tritonclient (it pins its own protobuf and
grpcio), never in the project's: ``python triton_calls.py ADDRESS FOLDER``. FOLDER holds
``calls.json`` and the inputs as ``.npy`` files; each call's result is written beside them as
``<id>.npy`` (BF16 results as their uint16 bit patterns) and ``results.json`` says how each
call ended: ``{"ok": true, ...}`` or ``{"ok": false, "status": "StatusCode.INVALID_ARGUMENT",
"message": "..."}``. ROI_TEST_TOKEN: a bearer token every call carries; ROI_TEST_TLS_CA: TLS,
trusting this CA file.

A call (one object of calls.json) is one of
  {"id", "kind": "infer", "model", "inputs": [{"name", "datatype", "file"}], "parameters",
   "typed": false}: InferenceServerClient.infer (raw_input_contents, or typed contents where
   "typed" is true, through the protocol's fields directly, as tritonclient has no setter);
  {"id", "kind": "shm", ...}: the same with every input and the output in
   tritonclient.utils.shared_memory regions, registered, used and unregistered;
  {"id", "kind": "stream", "calls": [infer calls]}: one start_stream/async_stream_infer stream;
  {"id", "kind": "metadata", "model"}: liveness, readiness, server and model metadata, as JSON;
  {"id", "kind": "raw", "method", "request"}: a method with a request in JSON (protobuf's
   json_format), to reach what tritonclient's helpers do not send.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import traceback
from pathlib import Path

import ml_dtypes
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException


def load(folder: Path, spec: dict) -> np.ndarray:
    arr = np.load(folder / spec["file"])
    if spec["datatype"] == "BF16":
        arr = arr.view(ml_dtypes.bfloat16)
    return arr


def save(folder: Path, call_id: str, arr: np.ndarray) -> None:
    if arr.dtype == ml_dtypes.bfloat16:
        arr = arr.view(np.uint16)
    np.save(folder / f"{call_id}.npy", np.ascontiguousarray(arr))


def inputs_of(folder: Path, call: dict) -> list:
    out = []
    for spec in call["inputs"]:
        arr = load(folder, spec)
        inp = grpcclient.InferInput(spec["name"], list(arr.shape), spec["datatype"])
        inp.set_data_from_numpy(arr)
        if call.get("typed"):
            # The typed form: InferTensorContents instead of raw_input_contents.
            inp._raw_content = None
            field = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents"}[
                spec["datatype"]
            ]
            getattr(inp._get_tensor().contents, field).extend(arr.reshape(-1).tolist())
        out.append(inp)
    return out


def failed(exc: InferenceServerException) -> dict:
    return {"ok": False, "status": str(exc.status()), "message": exc.message()}


def infer(client, folder: Path, call: dict) -> dict:
    result = client.infer(
        call["model"],
        inputs_of(folder, call),
        request_id=call["id"],
        parameters=call.get("parameters") or None,
    )
    out = result.as_numpy("output")
    save(folder, call["id"], out)
    response = result.get_response()
    return {
        "ok": True,
        "id": response.id,
        "datatype": response.outputs[0].datatype,
        "shape": list(out.shape),
        "parameters": {
            k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()
        },
    }


def infer_shm(client, folder: Path, call: dict) -> dict:
    """Every input and the output in system shared memory regions (keys /roi_<pid>_<n>)."""
    handles = []
    try:
        inputs = []
        for n, spec in enumerate(call["inputs"]):
            arr = np.ascontiguousarray(load(folder, spec))
            name, key = f"{call['id']}_in{n}", f"/roi_{os.getpid()}_{call['id']}_in{n}"
            h = shm.create_shared_memory_region(name, key, max(arr.nbytes, 1))
            handles.append((name, h))
            shm.set_shared_memory_region(h, [arr])
            client.register_system_shared_memory(name, key, max(arr.nbytes, 1))
            inp = grpcclient.InferInput(spec["name"], list(arr.shape), spec["datatype"])
            inp.set_shared_memory(name, arr.nbytes)
            inputs.append(inp)
        out_bytes = call["output_bytes"]
        name, key = f"{call['id']}_out", f"/roi_{os.getpid()}_{call['id']}_out"
        h = shm.create_shared_memory_region(name, key, out_bytes)
        handles.append((name, h))
        client.register_system_shared_memory(name, key, out_bytes)
        status = client.get_system_shared_memory_status(as_json=True)
        requested = grpcclient.InferRequestedOutput("output")
        requested.set_shared_memory(name, out_bytes)
        result = client.infer(
            call["model"],
            inputs,
            outputs=[requested],
            request_id=call["id"],
            parameters=call.get("parameters") or None,
        )
        output = result.get_output("output")
        dtype = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16, "FP64": np.float64}[
            output.datatype
        ]
        out = shm.get_contents_as_numpy(h, dtype, list(output.shape))
        save(folder, call["id"], out)
        return {
            "ok": True,
            "status_regions": sorted(status.get("regions", {})),
            "raw_outputs": len(result.get_response().raw_output_contents),
        }
    finally:
        for name, h in handles:
            try:
                client.unregister_system_shared_memory(name)
            except InferenceServerException:
                pass
            shm.destroy_shared_memory_region(h)


def stream(client, folder: Path, call: dict) -> dict:
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for sub in call["calls"]:
            client.async_stream_infer(
                sub["model"],
                inputs_of(folder, sub),
                request_id=sub["id"],
                parameters=sub.get("parameters") or None,
            )
        outcomes = {}
        for _ in call["calls"]:
            result, error = answers.get(timeout=120)
            if error is not None:
                outcomes[f"error{len(outcomes)}"] = failed(error)
                continue
            rid = result.get_response().id
            save(folder, rid, result.as_numpy("output"))
            outcomes[rid] = {"ok": True}
    finally:
        client.stop_stream()
    return {"ok": True, "outcomes": outcomes}


def metadata(client, folder: Path, call: dict) -> dict:
    model = call["model"]
    return {
        "ok": True,
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server": client.get_server_metadata(as_json=True),
        "model": client.get_model_metadata(model, as_json=True),
        "index": client.get_model_repository_index(as_json=True),
    }


def raw(client, folder: Path, call: dict) -> dict:
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2

    method = call["method"]
    request = json_format.ParseDict(call["request"], getattr(service_pb2, f"{method}Request"))
    response = getattr(client._client_stub, method)(request, metadata=client._get_metadata(None))
    return {"ok": True, "response": json_format.MessageToDict(response)}


class Bearer:
    """A tritonclient plugin: every call carries ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request) -> None:
        request.headers["authorization"] = f"Bearer {self.token}"


def cuda_shared_memory(client, folder: Path, call: dict) -> dict:
    """tritonclient's CUDA shared memory calls (the server has none: each should fail)."""
    out = {}
    for name, fn in (
        ("register", lambda: client.register_cuda_shared_memory("x", b"\0" * 64, 0, 16)),
        ("status", lambda: client.get_cuda_shared_memory_status()),
        ("unregister", lambda: client.unregister_cuda_shared_memory("x")),
    ):
        try:
            fn()
            out[name] = {"ok": True}
        except InferenceServerException as exc:
            out[name] = failed(exc)
    return {"ok": True, "calls": out}


KINDS = {
    "infer": infer,
    "shm": infer_shm,
    "stream": stream,
    "metadata": metadata,
    "raw": raw,
    "cuda": cuda_shared_memory,
}


def main() -> int:
    address, folder = sys.argv[1], Path(sys.argv[2])
    calls = json.loads((folder / "calls.json").read_text())
    token = os.environ.get("ROI_TEST_TOKEN")
    results = {}
    ca = os.environ.get("ROI_TEST_TLS_CA")
    tls = {"ssl": True, "root_certificates": ca} if ca else {}
    with grpcclient.InferenceServerClient(address, **tls) as client:
        if token:
            client.register_plugin(Bearer(token))
        for call in calls:
            try:
                results[call["id"]] = KINDS[call["kind"]](client, folder, call)
            except InferenceServerException as exc:
                results[call["id"]] = failed(exc)
            except Exception:  # noqa: BLE001  (reported to the test, which fails on it)
                results[call["id"]] = {
                    "ok": False,
                    "status": "client error",
                    "message": traceback.format_exc(),
                }
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
