"""The committed generated protobuf code is what protos/ and the pinned grpcio-tools produce,
and the package's pins match the versions that code was generated for."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "client" / "roi_client" / "_proto"


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    out = {}
    for text in reqs:
        r = Requirement(text)
        out[r.name] = r
    return out


def _protobuf_gencode_version() -> Version:
    text = (GENERATED / "roi" / "v1" / "roi_pb2.py").read_text()
    found = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
        text,
    )
    assert found, "roi_pb2.py has no runtime version check"
    return Version(".".join(found.groups()))


def _grpc_generated_version() -> Version:
    text = (GENERATED / "roi" / "v1" / "roi_pb2_grpc.py").read_text()
    found = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", text)
    assert found
    return Version(found.group(1))


def test_generated_code_is_current(tmp_path):
    """Regenerates every .proto into a temporary folder and compares file by file."""
    gen = _gen_protos()
    fresh = gen.generate(tmp_path)
    assert fresh, "nothing generated"
    names = {p.relative_to(tmp_path) for p in fresh}
    committed = {
        p.relative_to(GENERATED) for p in GENERATED.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert names == committed, (
        f"files differ: only generated {names - committed}, only committed {committed - names}"
    )
    stale = [str(rel) for rel in names if (tmp_path / rel).read_text() != (GENERATED / rel).read_text()]
    assert not stale, f"stale generated code {stale}: run python scripts/gen_protos.py"


def test_the_generator_is_the_pinned_grpcio_tools():
    pin = _requirements()["grpcio-tools"]
    pinned = [s.version for s in pin.specifier if s.operator == "=="]
    assert len(pinned) == 1, f"grpcio-tools must be pinned exactly, got {pin}"
    assert Version(pinned[0]) == _grpc_generated_version()
    installed = importlib.metadata.version("grpcio-tools")
    assert installed == pinned[0], (
        f"grpcio-tools {installed} installed, {pinned[0]} pinned: the check above means nothing"
    )


def test_protobuf_pin_matches_the_generated_code():
    """protobuf's runtime accepts gencode of its own major version at or below itself: the
    pin must be >= the gencode version and < the next major."""
    gencode = _protobuf_gencode_version()
    spec = _requirements()["protobuf"].specifier
    assert {str(s) for s in spec} == {f">={gencode}", f"<{gencode.major + 1}"}, spec
    installed = Version(importlib.metadata.version("protobuf"))
    assert installed in spec and installed.major == gencode.major
    # The generated module imports under the installed runtime (its check passes).
    from roi_client._proto.roi.v1 import roi_pb2

    assert roi_pb2.DESCRIPTOR.package == "roi.v1"


def test_grpcio_pin_matches_the_generated_code():
    generated = _grpc_generated_version()
    spec = _requirements()["grpcio"].specifier
    lower = [Version(s.version) for s in spec if s.operator == ">="]
    assert lower == [generated], f"grpcio's lower bound must be {generated} (roi_pb2_grpc.py), got {spec}"
    assert Version(importlib.metadata.version("grpcio")) in spec


@pytest.mark.parametrize("name", ["roi_pb2.py", "roi_pb2_grpc.py", "roi_pb2.pyi"])
def test_generated_files_import_package_relative(name):
    text = (GENERATED / "roi" / "v1" / name).read_text()
    assert not re.search(r"^from roi(\.| )", text, re.MULTILINE), "a top-level `roi` import"


@pytest.mark.parametrize("name", ["grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "grpc_service_pb2.pyi"])
def test_oip_generated_files_import_package_relative(name):
    """The Open Inference Protocol's code lives inside our package: no top-level `inference`
    module (a name other packages use) is imported or installed."""
    text = (GENERATED / "inference" / name).read_text()
    assert not re.search(r"^from inference(\.| )|^import inference", text, re.MULTILINE), (
        "a top-level `inference` import"
    )


def test_oip_proto_keeps_the_protocol_names():
    """Clients call /inference.GRPCInferenceService/<method>: the package and service names are
    the protocol's, whatever the Python module's path."""
    from roi_client._proto.inference import grpc_service_pb2

    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
    } <= set(service.methods_by_name)
