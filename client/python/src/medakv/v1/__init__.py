"""Generated stubs of the medakv.v1 API (proto/medakv/v1/medakv.proto).

`medakv_pb2` holds the messages and enums, `medakv_pb2_grpc` the `MedakvStub`.
They are produced by scripts/generate_protos.py and checked in; do not edit
them by hand (tests/test_protos.py checks that they match the .proto).
"""
