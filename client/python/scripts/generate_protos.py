#!/usr/bin/env python3
"""Regenerates the gRPC stubs shipped in src/medakv/v1/ from proto/medakv/v1/medakv.proto.

The stubs are checked in (so that `pip install ./client/python` needs no
protoc and works from any copy of the folder) and are generated with one
pinned grpcio-tools, chosen for the widest protobuf runtime range:
grpcio-tools 1.62.3 bundles protoc 25.1, whose Python code carries no runtime
version check and imports cleanly with protobuf 4.25.1 up to 7.x (the range
pyproject.toml declares). tests/test_protos.py fails when the checked-in
descriptor no longer matches the .proto; run this script then:

    python3 -m venv /tmp/medakv-gen && /tmp/medakv-gen/bin/pip install grpcio-tools==1.62.3
    /tmp/medakv-gen/bin/python client/python/scripts/generate_protos.py
"""

from __future__ import annotations

import argparse
import pathlib
import sys

PINNED_GRPCIO_TOOLS = "1.62.3"

HERE = pathlib.Path(__file__).resolve().parent
PACKAGE_SRC = HERE.parent / "src"
DEFAULT_PROTO_ROOT = HERE.parent.parent.parent / "proto"
PROTO = "medakv/v1/medakv.proto"
GENERATED = ("medakv_pb2.py", "medakv_pb2.pyi", "medakv_pb2_grpc.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proto-root", type=pathlib.Path, default=DEFAULT_PROTO_ROOT,
                        help="folder holding medakv/v1/medakv.proto (default: the repository's proto/)")
    parser.add_argument("--out", type=pathlib.Path, default=PACKAGE_SRC,
                        help="folder that receives medakv/v1/*_pb2*.py (default: the package's src/)")
    parser.add_argument("--any-version", action="store_true",
                        help=f"allow a grpcio-tools other than the pinned {PINNED_GRPCIO_TOOLS}")
    args = parser.parse_args(argv)

    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        print(f"generate_protos: needs grpcio-tools=={PINNED_GRPCIO_TOOLS} (pip install "
              f"grpcio-tools=={PINNED_GRPCIO_TOOLS})", file=sys.stderr)
        return 2
    from importlib.metadata import version

    got = version("grpcio-tools")
    if got != PINNED_GRPCIO_TOOLS and not args.any_version:
        print(f"generate_protos: grpcio-tools {got} is installed, the stubs are generated with "
              f"{PINNED_GRPCIO_TOOLS} (or pass --any-version)", file=sys.stderr)
        return 2
    source = args.proto_root / PROTO
    if not source.is_file():
        print(f"generate_protos: {source} not found", file=sys.stderr)
        return 2
    (args.out / "medakv" / "v1").mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{args.proto_root}",
        f"-I{include}",
        f"--python_out={args.out}",
        f"--pyi_out={args.out}",
        f"--grpc_python_out={args.out}",
        PROTO,
    ])
    if rc != 0:
        print(f"generate_protos: protoc failed ({rc})", file=sys.stderr)
        return 1
    for name in GENERATED:
        print(args.out / "medakv" / "v1" / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
