"""Who may call what: a terminal token on every call but health, bound to the terminal's certificate under
mutual TLS. Refusals are one sentence for the caller and one log line without the token."""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from appliance.errors import ConfigError
from appliance.server.tokens import Scope, TokenStore

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# What each method needs; anything not listed (reflection) needs a read token.
NEEDS = {
    "/appliance.v1.Scoring/Score": Scope.score,
    "/appliance.v1.Scoring/ReloadModel": Scope.admin,
}


@dataclass(frozen=True)
class Caller:
    """Who a call comes from: a terminal's name, or `host:<address>` where no token is required."""

    name: str
    scope: Scope


caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, sentence: str, log_reason: str) -> None:
        super().__init__(sentence)
        self.code = code
        self.sentence = sentence
        self.log_reason = log_reason


class Authorizer:
    def __init__(self, tokens: TokenStore, required: bool, bind_to_certificate: bool) -> None:
        self.tokens = tokens
        self.required = required
        self.bind_to_certificate = bind_to_certificate

    def check(self, method: str, metadata: Any, auth_context: Mapping[str, Iterable[bytes]], peer: str) -> Caller:
        need = NEEDS.get(method, Scope.read)
        token = _bearer(metadata)
        if token is None:
            if not self.required:
                return Caller(f"host:{_host(peer)}", Scope.admin)
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "This appliance needs a terminal token on every call: send it as 'authorization: Bearer <token>' "
                "(appliance-client --token, or APPLIANCE_TOKEN); `appliance token add NAME` makes one.",
                "no token",
            )
        record = self.tokens.lookup(token)
        if record is None:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "The token is not one this appliance made (mistyped, or made on another box).",
                "unknown token",
            )
        if record.revoked_unix is not None:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"The token of terminal {record.name!r} was revoked; ask IT for a new one.",
                f"revoked token of {record.name!r}",
            )
        if self.bind_to_certificate:
            names = [n.decode("utf-8", "replace") for n in auth_context.get("x509_common_name", ())]
            if record.name not in names:
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"The token of terminal {record.name!r} was sent with another terminal's certificate; "
                    "each terminal uses its own certificate and token.",
                    f"token of {record.name!r} with the certificate of {names!r}",
                )
        if record.level < need:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Terminal {record.name!r} has {_a(record.scope)} token; {method.rsplit('/', 1)[-1]} needs "
                f"{_a(need.name)} token.",
                f"{record.scope} token of {record.name!r} for a {need.name} call",
            )
        return Caller(record.name, record.level)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def _host(peer: str) -> str:
    """ipv4:10.0.0.5:51234 → 10.0.0.5 (the port changes with each connection)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


class AuthInterceptor(aio.ServerInterceptor):
    """Wraps each method's handler in one of the same shape (a unary handler answering a streaming call
    is a known grpcio pitfall) that checks the caller before the method runs."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler  # probes need no token
        return _guarded(handler, self._check(method))

    def _check(self, method: str) -> Callable[[aio.ServicerContext[Any, Any]], Awaitable[None]]:
        async def check(context: aio.ServicerContext[Any, Any]) -> None:
            try:
                who = self.authorizer.check(
                    method, context.invocation_metadata(), context.auth_context(), context.peer()
                )
            except Refused as e:
                log.warning("refused %s from %s: %s", method, _host(context.peer()), e.log_reason)
                await context.abort(e.code, e.sentence)
            except ConfigError as e:  # the tokens file cannot be read: every call is refused until it can
                log.error("%s", e.message)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "The appliance cannot check tokens now; tell IT.")
            caller.set(who)

        return check


def _guarded(
    handler: grpc.RpcMethodHandler, check: Callable[[aio.ServicerContext[Any, Any]], Awaitable[None]]
) -> grpc.RpcMethodHandler:
    def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def behavior(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            result = fn(request, context)
            return await result if inspect.isawaitable(result) else result

        return behavior

    def streaming(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def behavior(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await check(context)
            out = fn(request, context)
            if inspect.isasyncgen(out):
                async for item in out:
                    yield item
            elif inspect.isawaitable(out):
                await out  # a handler that writes with context.write
            else:
                for item in out:
                    yield item

        return behavior

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kw)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kw)
