"""The standard gRPC health service (grpc.health.v1, grpcio-health-checking) on a server.

Load balancers and `grpc_health_probe` ask `Check("")` (the whole server) or the service's
name; both answer SERVING once the model is loaded (servers are only built after that).
Health checks need no bearer token (see `shared.grpc_guard.OPEN_METHODS`).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def add_health(server: grpc.Server, service: str) -> health.HealthServicer:
    servicer = health.HealthServicer()
    for name in ("", service):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer
