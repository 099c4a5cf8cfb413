"""Who may call what: a terminal token on every call but health, bound to the terminal's certificate under
mutual TLS, and only while the token is live. Refusals are one sentence for the caller and one throttled log
line without the token."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc import aio

from appliance.api import revocation
from appliance.api.revocation import OpenCall, OpenCalls
from appliance.api.tokens import Scope, TokenRecord, TokenStore
from appliance.domain.errors import ConfigError
from appliance.log_throttle import LogThrottle

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
    admitted: bool = False  # the service's admission ran before the request was read


caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, sentence: str, log_reason: str) -> None:
        super().__init__(sentence)
        self.code = code
        self.sentence = sentence
        self.log_reason = log_reason


class Authorizer:
    """Two steps: the token (its metadata arrives before the request, so a refusal never holds a request's
    bytes), then, once the call runs, the certificate the token must go with under mutual TLS."""

    def __init__(self, tokens: TokenStore, required: bool, bind_to_certificate: bool) -> None:
        self.tokens = tokens
        self.required = required
        self.bind_to_certificate = bind_to_certificate

    def check_token(self, method: str, metadata: Any) -> TokenRecord | None:
        """The caller's live token, with the scope ``method`` needs; None where no token is required."""
        need = NEEDS.get(method, Scope.read)
        token = _bearer(metadata)
        if token is None:
            if not self.required:
                return None
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
        if record.level < need:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Terminal {record.name!r} has {_a(record.scope)} token; {method.rsplit('/', 1)[-1]} needs "
                f"{_a(need.name)} token.",
                f"{record.scope} token of {record.name!r} for a {need.name} call",
            )
        return record

    def caller(
        self, record: TokenRecord | None, auth_context: Mapping[str, Iterable[bytes]], peer: str, admitted: bool
    ) -> Caller:
        if record is None:
            return Caller(f"host:{_host(peer)}", Scope.admin)
        if self.bind_to_certificate:
            names = [n.decode("utf-8", "replace") for n in auth_context.get("x509_common_name", ())]
            if record.name not in names:
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"The token of terminal {record.name!r} was sent with another terminal's certificate; "
                    "each terminal uses its own certificate and token.",
                    f"token of {record.name!r} with the certificate of {names!r}",
                )
        return Caller(record.name, record.level, admitted=admitted)


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


# The service's admission of a terminal's call before its request is read (Score's rate and concurrency):
# a Refused, or None to go ahead.
Admit = Callable[[str, str], "Refused | None"]


class AuthInterceptor(aio.ServerInterceptor):
    """Checks each call before its method runs. The token (and the service's admission of a terminal's call)
    is checked as the call arrives: a refusal then answers without reading the request, so an unknown
    caller cannot make the appliance hold a large Score image. The certificate binding is checked when the
    call runs (the peer's certificate is only known then), by a wrapper of the method's own shape (a unary
    handler answering a streaming call is a known grpcio pitfall). The same wrapper holds the call open for
    its token in ``calls``, so a revocation cuts it (``appliance.api.revocation``).

    Refusals are logged through a throttle: the first of each reason at once, then a count a minute, so a
    caller repeating a refused call cannot flood the log."""

    def __init__(self, authorizer: Authorizer, admit: Admit | None = None, calls: OpenCalls | None = None) -> None:
        self.authorizer = authorizer
        self.admit = admit
        self.calls = calls
        self.refusals = LogThrottle(log)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler  # probes need no token
        try:
            record = self.authorizer.check_token(method, handler_call_details.invocation_metadata)
            refused = self.admit(method, record.name) if self.admit and record is not None else None
        except Refused as e:
            refused = e
        except ConfigError as e:  # the tokens file cannot be read: every call is refused until it can
            self.refusals.log("tokens file unreadable", "%s", e.message)
            refused = Refused(
                grpc.StatusCode.UNAVAILABLE, "The appliance cannot check tokens now; tell IT.", "tokens unreadable"
            )
        if refused is not None:
            self.refusals.log(f"refused calls: {refused.log_reason}", "refused %s: %s", method, refused.log_reason)
            return _refusal(handler, refused)
        return _guarded(handler, self._bind(record), _Watch(self.calls, method, record))

    def _bind(self, record: TokenRecord | None) -> Callable[[aio.ServicerContext[Any, Any]], Awaitable[None]]:
        async def check(context: aio.ServicerContext[Any, Any]) -> None:
            try:
                admitted = self.admit is not None and record is not None
                who = self.authorizer.caller(record, context.auth_context(), context.peer(), admitted)
            except Refused as e:
                self.refusals.log(
                    f"refused calls: {e.log_reason}", "refused a call from %s: %s", _host(context.peer()), e.log_reason
                )
                await context.abort(e.code, e.sentence)
            caller.set(who)

        return check


@dataclass(frozen=True)
class _Watch:
    """Where a call is held open for its token while it runs (nothing to hold where no token is required)."""

    calls: OpenCalls | None
    method: str
    record: TokenRecord | None

    @contextlib.contextmanager
    def open(self) -> Iterator[OpenCall | None]:
        if self.calls is None or self.record is None:
            yield None
            return
        with self.calls.open(self.method, self.record) as call:
            yield call

    def live(self, call: OpenCall | None) -> bool:
        return call is None or self.calls is None or self.calls.fresh(call)


async def _revoked(context: aio.ServicerContext[Any, Any]) -> NoReturn:
    await context.abort(revocation.CODE, revocation.SENTENCE)
    raise AssertionError("unreachable: abort raises")


def _cut_here(call: OpenCall | None) -> bool:
    """A cancellation that is the revocation's (not the caller's leaving or the server's stop): it is
    answered UNAUTHENTICATED, so the task is no longer being cancelled."""
    if call is None or not call.revoked:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


def _refusal(handler: grpc.RpcMethodHandler, refused: Refused) -> grpc.RpcMethodHandler:
    """A handler that answers with the refusal without reading the request: it takes the request as a
    stream it never reads, and answers in the method's own response shape."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}

    async def abort(_requests: Any, context: aio.ServicerContext[Any, Any]) -> None:
        await context.abort(refused.code, refused.sentence)

    async def abort_stream(_requests: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(refused.code, refused.sentence)
        yield  # unreachable: makes this a generator, as a streaming method is

    if handler.unary_unary or handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)


def _guarded(
    handler: grpc.RpcMethodHandler,
    check: Callable[[aio.ServicerContext[Any, Any]], Awaitable[None]],
    watch: _Watch,
) -> grpc.RpcMethodHandler:
    def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def behavior(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            with watch.open() as call:
                try:
                    if call is not None:
                        call.waiting = True
                    result = fn(request, context)
                    answer = await result if inspect.isawaitable(result) else result
                except asyncio.CancelledError:
                    if not _cut_here(call):
                        raise
                    await _revoked(context)
                finally:
                    if call is not None:
                        call.waiting = False
                if not watch.live(call):  # revoked while it ran: the answer is not the terminal's any more
                    await _revoked(context)
                return answer

        return behavior

    def streaming(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def behavior(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await check(context)
            with watch.open() as call:
                items = _items(fn(request, context))
                try:
                    while watch.live(call):
                        if call is not None:
                            call.waiting = True
                        try:
                            item = await anext(items)
                        except StopAsyncIteration:
                            return
                        finally:
                            if call is not None:
                                call.waiting = False
                        # Looked at again after the wait: nothing produced after a revocation is sent.
                        if not watch.live(call):
                            break
                        yield item
                except asyncio.CancelledError:
                    if not _cut_here(call):
                        raise
                finally:
                    await items.aclose()
                await _revoked(context)

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


async def _items(out: Any) -> AsyncGenerator[Any, None]:
    """A streaming method's output, whatever its form, as one async iterator."""
    if inspect.isasyncgen(out):
        async with contextlib.aclosing(out):
            async for item in out:
                yield item
    elif inspect.isawaitable(out):
        await out  # a handler that writes with context.write
    else:
        for item in out:
            yield item
