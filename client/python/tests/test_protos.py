"""The checked-in stubs (src/medakv/v1) are current: generated from proto/medakv/v1/medakv.proto as it is now,
with the pinned generator. When this fails, run scripts/generate_protos.py (its docstring says how)."""

from __future__ import annotations

import inspect
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from google.protobuf import descriptor_pb2

from medakv.v1 import medakv_pb2, medakv_pb2_grpc

PROTO_ROOT = REPO / "proto"
PROTO = "medakv/v1/medakv.proto"
STUBS = Path(medakv_pb2.__file__).parent


def _normalized(f: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto.FromString(f.SerializeToString())
    f.ClearField("source_code_info")
    for message in f.message_type:
        for field in message.field:
            field.ClearField("json_name")  # protoc adds it to descriptor sets, not to the embedded descriptor
    return f


def test_stubs_match_the_proto(tmp_path):
    if not (PROTO_ROOT / PROTO).is_file():
        pytest.skip(f"{PROTO_ROOT / PROTO} not found (tests run outside the repository)")
    protoc = shutil.which("protoc")
    if protoc is None:
        pytest.fail("protoc not found (Debian: protobuf-compiler, installed by scripts/install-deps.sh)")
    out = tmp_path / "set.pb"
    subprocess.run([protoc, f"-I{PROTO_ROOT}", f"--descriptor_set_out={out}", PROTO], check=True)
    fresh = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}[PROTO]
    shipped = descriptor_pb2.FileDescriptorProto.FromString(medakv_pb2.DESCRIPTOR.serialized_pb)
    assert _normalized(shipped) == _normalized(fresh), (
        "src/medakv/v1/medakv_pb2.py is stale: run client/python/scripts/generate_protos.py")


def test_stubs_are_one_generation():
    # The three files come from one run of the pinned generator (scripts/generate_protos.py).
    assert "Protobuf Python Version: 4.25.1" in (STUBS / "medakv_pb2.py").read_text()
    service = medakv_pb2.DESCRIPTOR.services_by_name["Medakv"]
    stub_source = inspect.getsource(medakv_pb2_grpc.MedakvStub)
    pyi = (STUBS / "medakv_pb2.pyi").read_text()
    for method in service.methods:
        assert f"'/medakv.v1.Medakv/{method.name}'" in stub_source, f"medakv_pb2_grpc.py lacks {method.name}"
    for name in medakv_pb2.DESCRIPTOR.message_types_by_name:
        assert f"class {name}(_message.Message)" in pyi, f"medakv_pb2.pyi lacks {name}"
