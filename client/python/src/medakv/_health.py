"""The two messages of grpc.health.v1.Health/Check, in a private descriptor pool.

Registering grpc/health/v1/health.proto in protobuf's default pool would
clash with any other copy of it in the process (grpcio-health-checking's, a
worker's own), so the messages live in a pool of their own; on the wire they
are the standard ones (proto/grpc/health/v1/health.proto).
"""

from __future__ import annotations

from typing import Any, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"


def _build() -> Tuple[Any, Any]:
    f = descriptor_pb2.FileDescriptorProto(name="medakv/_private/grpc_health_v1.proto", package="grpc.health.v1",
                                           syntax="proto3")
    request = f.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    response = f.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")))


HealthCheckRequest, HealthCheckResponse = _build()


def status_name(response: Any) -> str:
    """"SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN" (also for a value this client does not know)."""
    field = response.DESCRIPTOR.fields_by_name["status"]
    value = field.enum_type.values_by_number.get(response.status)
    return value.name if value is not None else "UNKNOWN"
