"""Builds the gRPC server (asyncio, on a thread of its own): the Scoring service, grpc.health.v1 and
reflection on one port, behind TLS and the token check where the config asks for them."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from appliance.api.auth import AuthInterceptor, Authorizer
from appliance.api.revocation import OpenCalls
from appliance.api.service import ScoringService
from appliance.api.tls import credentials, insecure_exposure
from appliance.api.tokens import TokenStore
from appliance.config import ServerConfig
from appliance.domain.errors import ConfigError
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scoring"].full_name
# A health entry of its own for how the server is exposed: NOT_SERVING under server.insecure = true (plaintext,
# no tokens, on the network), SERVING otherwise. The overall status stays what the scoring says, so a lab box
# that chose insecure still serves; a probe of this name alerts on a box left that way.
SECURE_NAME = "appliance.secure"


class GrpcServer:
    def __init__(self, service: ScoringService, config: ServerConfig) -> None:
        self.service = service
        self.config = config
        assert config.tokens_file is not None, "Config.resolved sets tokens_file"
        self.tokens = TokenStore(config.tokens_file)
        self._creds = credentials(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        try:
            self.port: int = self._call(self._build())
        except BaseException:
            self._close_loop()
            raise

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    async def _build(self) -> int:
        config = self.config
        limit = config.max_message_mb * 1024 * 1024
        authorizer = Authorizer(
            self.tokens, required=config.tokens_required, bind_to_certificate=config.tls_client_ca is not None
        )
        self.calls = OpenCalls(self.tokens)
        self.calls.start()
        self.server = aio.server(
            interceptors=[AuthInterceptor(authorizer, admit=self.service.admit, calls=self.calls)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Idle connections are closed and dead peers noticed, so a vanished terminal frees its streams.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.max_connection_idle_ms", 3_600_000),
                # grpc sets SO_REUSEPORT by default: a second daemon (or any process of this user) would bind the
                # same port beside this one and take half of the terminals' connections, silently.
                ("grpc.so_reuseport", 0),
            ],
        )
        self.service.bind(asyncio.get_running_loop())
        handlers = _scoring_handlers(self.service)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        host = config.host
        address = f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"
        try:
            if self._creds is not None:
                port = self.server.add_secure_port(address, self._creds)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise ConfigError(f"Cannot listen on {address}: {e}.") from e
        if port == 0:
            raise ConfigError(f"Cannot listen on {address}: the port is in use or the address is not local.")
        await self._set_serving(False)
        secure = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if insecure_exposure(config)
            else health_pb2.HealthCheckResponse.SERVING
        )
        await self.health.set(SECURE_NAME, secure)
        return int(port)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def set_serving(self, serving: bool) -> None:
        """From any thread."""
        if self.loop.is_running():
            self._call(self._set_serving(serving))

    @property
    def tls(self) -> bool:
        return self._creds is not None

    def start(self) -> None:
        self._call(self.server.start())

    def stop(self, grace: float) -> None:
        if not self.loop.is_running():
            return
        self.set_serving(False)
        self._call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.calls.stop)
        self.service.close()
        self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class _Capture:
    """Stands in for a server to take the generated code's method handlers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, _name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers


def _scoring_handlers(service: ScoringService) -> dict[str, grpc.RpcMethodHandler]:
    """The generated handlers, but StreamResults sends the bytes the feed encoded once per result."""
    capture = _Capture()
    pb_grpc.add_ScoringServicer_to_server(service, capture)
    handlers = dict(capture.handlers)
    stream = handlers["StreamResults"]
    assert stream.unary_stream is not None
    handlers["StreamResults"] = grpc.unary_stream_rpc_method_handler(
        stream.unary_stream, request_deserializer=stream.request_deserializer, response_serializer=bytes
    )
    return handlers
