"""Builds the gRPC server: the Scoring service, grpc.health.v1 and reflection on one port."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from appliance.errors import ConfigError
from appliance.server.service import ScoringService
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scoring"].full_name
# Each open StreamResults holds a worker thread; a clinic has a handful of terminals.
MAX_WORKERS = 64


class GrpcServer:
    def __init__(self, service: ScoringService, host: str, port: int, max_message_mb: int) -> None:
        limit = max_message_mb * 1024 * 1024
        self.server = grpc.server(
            ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
            maximum_concurrent_rpcs=MAX_WORKERS * 2,
        )
        pb_grpc.add_ScoringServicer_to_server(service, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise ConfigError(f"Cannot listen on {address}: {e}.") from e
        if self.port == 0:
            raise ConfigError(f"Cannot listen on {address}: the port is in use or the address is not local.")
        self.set_serving(False)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()
