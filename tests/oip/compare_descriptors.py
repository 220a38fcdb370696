"""Compares our inference.GRPCInferenceService descriptors with tritonclient's own, for
tests/test_oip.py: ``python compare_descriptors.py OURS.desc`` (a serialised
FileDescriptorProto of protos/inference/grpc_service.proto) in the environment that holds
tritonclient. Prints one line per difference; exit status 1 if there is any.

Every message and field of ours must exist in tritonclient's with the same number, type,
label and message type (ours may leave fields out); every method of ours must have the same
request and response types and streaming."""

from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2


def walk(messages, prefix):
    for m in messages:
        yield prefix + m.name, m
        yield from walk(m.nested_type, prefix + m.name + ".")


def main() -> int:
    ours = descriptor_pb2.FileDescriptorProto.FromString(Path(sys.argv[1]).read_bytes())
    pool = service_pb2.DESCRIPTOR.pool
    problems = []
    for name, m in walk(ours.message_type, f"{ours.package}."):
        try:
            theirs = pool.FindMessageTypeByName(name)
        except KeyError:
            problems.append(f"message {name} is not tritonclient's")
            continue
        for f in m.field:
            t = theirs.fields_by_name.get(f.name)
            if t is None:
                problems.append(f"{name}.{f.name}: no such field in tritonclient's")
                continue
            their_type = t.message_type.full_name if t.message_type else ""
            if (t.number, t.type, their_type) != (f.number, f.type, f.type_name.lstrip(".")):
                problems.append(
                    f"{name}.{f.name}: ours {(f.number, f.type, f.type_name)}, theirs {(t.number, t.type, their_type)}"
                )
            if (t.label == t.LABEL_REPEATED) != (f.label == f.LABEL_REPEATED):
                problems.append(f"{name}.{f.name}: repeated differs")
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.service[0].method:
        t = service.methods_by_name.get(method.name)
        if t is None:
            problems.append(f"method {method.name} is not tritonclient's")
            continue
        if (t.input_type.full_name, t.output_type.full_name) != (
            method.input_type.lstrip("."),
            method.output_type.lstrip("."),
        ):
            problems.append(f"method {method.name}: types differ")
        if (t.client_streaming, t.server_streaming) != (method.client_streaming, method.server_streaming):
            problems.append(f"method {method.name}: streaming differs")
    print(
        "\n".join(problems)
        or f"{len(ours.message_type)} messages, {len(ours.service[0].method)} methods agree"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
