"""gRPC plumbing shared by node and broker: servers, channels, request auth, error mapping.

Cross-cutting concerns live here, in interceptors, not in handlers (STYLE.md):

* every server speaks TLS and registers standard health checking and reflection;
* every non-public call carries a signed request (DESIGN.md section 5): the server verifies the
  signature over the *exact request bytes received*, then freshness and replay, then asks the
  service's authenticator who the signer is; handlers read the result with :func:`current_caller`;
* a :class:`~tessera.errors.TesseraError` raised by a handler becomes a gRPC status here, the one
  place that mapping exists, with the error kind and hint in trailing metadata so clients rebuild
  the same typed error (:func:`error_from_rpc`).
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Self

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tessera import credential, crypto, errors, metrics
from tessera.config import Settings
from tessera.errors import ErrorKind, TesseraError
from tessera.logs import fields
from tessera.tls import SERVER_NAME

log = logging.getLogger(__name__)

ERROR_KIND_KEY = "x-tessera-error-kind"
ERROR_HINT_KEY = "x-tessera-error-hint"
# Health checking and reflection stay open so stock tools (grpcurl, grpc_health_probe) work.
PUBLIC_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    """The gRPC status code for an error kind (the single mapping; see tessera.errors)."""
    code: grpc.StatusCode = getattr(grpc.StatusCode, kind.grpc_status)
    return code


_ERROR_CLASS_FOR_KIND: dict[ErrorKind, type[TesseraError]] = {
    ErrorKind.USAGE: errors.InvalidInput,
    ErrorKind.NOT_CONFIGURED: errors.ConfigError,
    ErrorKind.UNAUTHENTICATED: errors.Unauthenticated,
    ErrorKind.PERMISSION_DENIED: errors.PermissionDenied,
    ErrorKind.NOT_FOUND: errors.NotFound,
    ErrorKind.INVALID_INPUT: errors.InvalidInput,
    ErrorKind.REFUSED: errors.Refused,
    ErrorKind.CONFLICT: errors.Conflict,
    ErrorKind.UNAVAILABLE: errors.Unavailable,
    ErrorKind.INTEGRITY: errors.CryptoError,
    ErrorKind.EXHAUSTED: errors.Exhausted,
    ErrorKind.NOT_BUILT: errors.NotBuiltError,
    ErrorKind.INTERNAL: TesseraError,
}

_KIND_FOR_STATUS: dict[grpc.StatusCode, ErrorKind] = {
    grpc.StatusCode.UNAVAILABLE: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: ErrorKind.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: ErrorKind.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND: ErrorKind.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID_INPUT,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorKind.REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: ErrorKind.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.EXHAUSTED,
    grpc.StatusCode.DATA_LOSS: ErrorKind.INTEGRITY,
    grpc.StatusCode.UNIMPLEMENTED: ErrorKind.NOT_BUILT,
}


def error_from_rpc(exc: grpc.RpcError, target: str = "the server") -> TesseraError:
    """Rebuild the typed error a Tessera server raised, or describe a transport failure."""
    call: Any = exc
    code: grpc.StatusCode = call.code()
    details: str = call.details() or code.name
    trailing = dict(call.trailing_metadata() or ())
    kind_name = str(trailing.get(ERROR_KIND_KEY, ""))
    hint = str(trailing.get(ERROR_HINT_KEY, "")) or None
    if kind_name in ErrorKind.__members__:
        kind = ErrorKind[kind_name]
    elif code == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(
            f"cannot reach {target}: {details}",
            hint="check that the server is running and the address and TLS certificate are right",
        )
    else:
        kind = _KIND_FOR_STATUS.get(code, ErrorKind.INTERNAL)
    return _ERROR_CLASS_FOR_KIND[kind](details, hint=hint)


def refusal_parts(exc: TesseraError) -> tuple[int, str, str, str]:
    """A typed error as one item's refusal inside a reply (its status code number, message,
    hint and kind), for calls that answer for several items at once (Relay.SendBatch)."""
    return status_code(exc.kind).value[0], exc.message, exc.hint or "", exc.kind.name


def error_from_refusal(code: int, message: str, hint: str, kind: str) -> TesseraError:
    """Rebuild the typed error of one item's refusal (the inverse of :func:`refusal_parts`)."""
    if kind in ErrorKind.__members__:
        error_kind = ErrorKind[kind]
    else:
        status = _STATUS_FOR_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
        error_kind = _KIND_FOR_STATUS.get(status, ErrorKind.INTERNAL)
    return _ERROR_CLASS_FOR_KIND[error_kind](message, hint=hint or None)


_STATUS_FOR_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


# --- who is calling -------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its verify key, a printable principal name and its role."""

    signer: bytes
    principal: str
    role: str


Authenticator = Callable[[bytes, str], Awaitable[Caller]]
"""Maps (signer verify key, full method name) to a Caller, or raises Unauthenticated /
PermissionDenied. It runs on the event loop: one that queries a database hands that to a worker
thread itself (the node's does; the broker's answers from its verified directory in memory)."""

SharedNonces = Callable[[bytes, bytes, datetime.datetime], Awaitable[bool]]
"""``(signer, nonce, signed_at) -> False`` when another replica already accepted that nonce."""

_current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "tessera_caller", default=None
)


def current_caller() -> Caller:
    """The caller of the RPC being handled (set by the server interceptor)."""
    caller = _current_caller.get()
    if caller is None:
        raise errors.Unauthenticated("this call carries no verified signature")
    return caller


class _Raw(NamedTuple):
    body: bytes
    parse: Callable[[bytes], Any] | None  # the method's deserializer, run only once admitted


class TesseraServerInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates signed requests, maps typed errors to statuses, logs and counts every call."""

    def __init__(
        self,
        authenticator: Authenticator | None,
        guard: crypto.NonceGuard,
        public_methods: frozenset[str] = frozenset(),
        on_refused: Callable[[str, str, str], None] | None = None,
        shared_nonces: SharedNonces | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._guard = guard
        self._public_methods = public_methods
        # Called (in a worker thread) as on_refused(actor, method, reason) when a request's
        # signature, freshness or replay check fails, so the refusal can be audited.
        self._on_refused = on_refused
        # Replicas behind a load balancer each have their own ReplayGuard; shared_nonces(signer,
        # nonce, signed_at) -> False when another replica already accepted that nonce (a
        # database table, pruned once the request's own timestamp leaves the window).
        self._shared_nonces = shared_nonces
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        if method.startswith(PUBLIC_PREFIXES) or handler.request_streaming:
            # Client-streaming calls sign the method with an empty body; TLS protects the stream.
            return handler
        # The wrapped handler depends only on the method (the request's metadata is read from
        # its context), so it is built once per method rather than once per call.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        needs_auth = self._authenticator is not None and method not in self._public_methods
        original_deserializer = handler.request_deserializer

        # Keep the bytes; parse only once the signature over them verifies, so an unsigned or
        # forged request costs no protobuf parsing (and a request's signature covers exactly
        # the bytes received).
        def keep_raw(body: bytes) -> _Raw:
            return _Raw(body, original_deserializer)

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method, needs_auth),
                request_deserializer=keep_raw,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, method, needs_auth),
            request_deserializer=keep_raw,
            response_serializer=handler.response_serializer,
        )

    def _unary(
        self, inner: Any, method: str, needs_auth: bool
    ) -> Callable[[_Raw, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def behaviour(raw: _Raw, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                message = await self._admit(method, context, raw, needs_auth)
                return await inner(message, context)
            except TesseraError as exc:
                code = status_code(exc.kind).name
                await _abort(context, exc, method)
            except grpc.aio.AbortError:
                raise
            except Exception:
                code = "INTERNAL"
                await _abort_internal(context, method)
            finally:
                _observe(method, code, started)

        return behaviour

    def _streaming(
        self, inner: Any, method: str, needs_auth: bool
    ) -> Callable[[_Raw, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        async def behaviour(
            raw: _Raw, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = "OK"
            try:
                message = await self._admit(method, context, raw, needs_auth)
                result = inner(message, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:
                    await result
            except TesseraError as exc:
                code = status_code(exc.kind).name
                await _abort(context, exc, method)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                await _abort_internal(context, method)
            finally:
                _observe(method, code, started)

        return behaviour

    async def _admit(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        raw: _Raw,
        needs_auth: bool,
    ) -> Any:
        """Authenticate the request's bytes, then parse them: the request message."""
        if needs_auth and self._authenticator is not None:
            await self._authenticate(method, context, raw.body)
        if raw.parse is None:
            return raw.body
        try:
            return raw.parse(raw.body)
        except DecodeError:
            raise errors.InvalidInput(
                f"the request to {method} is not a valid protobuf message",
                hint="check that client and server run the same Tessera version",
            ) from None

    async def _authenticate(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], body: bytes
    ) -> None:
        assert self._authenticator is not None
        try:
            metadata = tuple(context.invocation_metadata() or ())
            signature = crypto.RequestSignature.from_metadata(metadata)
            crypto.verify_request(signature.signer, method, body, signature, self._guard)
            if self._shared_nonces is not None:
                signed_at = datetime.datetime.fromtimestamp(
                    signature.timestamp_ms / 1000, datetime.UTC
                )
                if not await self._shared_nonces(signature.signer, signature.nonce, signed_at):
                    raise errors.ReplayedRequest("this request was already accepted (a replay)")
        except TesseraError as exc:
            metrics.AUTH_FAILURES.labels(reason=type(exc).__name__).inc()
            if self._on_refused is not None:
                await asyncio.to_thread(self._on_refused, "unverified", method, type(exc).__name__)
            if isinstance(exc, errors.BadSignature):
                # A forged or altered request is a failure to authenticate, not data loss.
                raise errors.Unauthenticated(
                    "the request's signature does not verify",
                    hint="check that the client signs with the credential it claims",
                ) from None
            raise
        caller = await self._authenticator(signature.signer, method)
        _current_caller.set(caller)


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], exc: TesseraError, method: str
) -> None:
    log.info(
        "rpc.refused",
        extra=fields(method=method, kind=exc.kind.name, error=type(exc).__name__),
    )
    trailing = [(ERROR_KIND_KEY, exc.kind.name)]
    if exc.hint:
        trailing.append((ERROR_HINT_KEY, _bounded(exc.hint, _MAX_HINT_CHARS)))
    context.set_trailing_metadata(tuple(trailing))
    await context.abort(status_code(exc.kind), _bounded(exc.message, _MAX_MESSAGE_CHARS))


# A status travels in HTTP/2 headers (8 KiB by default): an error longer than these is cut, with
# a mark, so the caller always gets its status rather than a broken stream.
_MAX_MESSAGE_CHARS = 2000
_MAX_HINT_CHARS = 1000


def _bounded(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


async def _abort_internal(context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    # An unexpected failure: log the trace for the operator, tell the caller nothing internal.
    log.exception("rpc.internal_error", extra=fields(method=method))
    context.set_trailing_metadata(((ERROR_KIND_KEY, ErrorKind.INTERNAL.name),))
    await context.abort(
        grpc.StatusCode.INTERNAL, "internal error; the server's log has the details"
    )


def _observe(method: str, code: str, started: float) -> None:
    _requests_counter(method, code).inc()
    _latency_histogram(method).observe(time.perf_counter() - started)


# Looking a labelled child up costs more than counting; the label sets are few (methods, codes).
@functools.cache
def _requests_counter(method: str, code: str) -> Any:
    return metrics.RPC_REQUESTS.labels(method=method, code=code)


@functools.cache
def _latency_histogram(method: str) -> Any:
    return metrics.RPC_LATENCY.labels(method=method)


# --- servers --------------------------------------------------------------------------------

ServiceAdder = Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    """A started server, the port it bound and its health servicer (to flip NOT_SERVING)."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the whole server."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop accepting calls and let running ones finish for ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    *,
    listen: str,
    add_services: Sequence[ServiceAdder],
    service_names: Sequence[str],
    cert_pem: bytes,
    key_pem: bytes,
    interceptor: TesseraServerInterceptor,
    max_message_bytes: int,
    max_request_bytes: int | None = None,
) -> RunningServer:
    """Start a TLS gRPC server with health checking, reflection and Tessera's interceptor.

    ``max_request_bytes`` (default ``max_message_bytes``) caps what one request may hold: gRPC
    refuses a larger one from its length prefix (RESOURCE_EXHAUSTED) before buffering it, so a
    flood of large unsigned requests cannot take the server's memory.
    """
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", max_request_bytes or max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Never share a port with another process (gRPC turns SO_REUSEPORT on by default):
            # a second server on a taken port fails to start instead of splitting the calls.
            ("grpc.so_reuseport", 0),
        ],
    )
    for add in add_services:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)])
    try:
        port = server.add_secure_port(listen, credentials)
    except RuntimeError:  # grpc.aio raises where the sync server returned 0
        port = 0
    if port == 0:
        raise errors.ConfigError(
            f"cannot listen on {listen}",
            hint="choose a free host:port with `listen` or TESSERA_LISTEN",
        )
    await server.start()
    for name in (*service_names, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=port, health=health_servicer)


async def announce(
    server: RunningServer, settings: Settings, close_storage: Callable[[], None]
) -> tuple[str, metrics.MetricsServer | None]:
    """Make a started server known: serve its Prometheus metrics (when ``settings.metrics_port``
    is set) and write the run file naming the address clients reach it at.

    Returns (address, metrics exporter or None). If the exporter cannot start (its port is
    taken), the server is stopped and ``close_storage()`` called before the error propagates,
    so a start that fails leaves nothing listening and nothing open.
    """
    address = credential.reachable_address(settings.listen, server.port)
    try:
        exporter = metrics.serve_metrics(settings.metrics_port) if settings.metrics_port else None
    except Exception:
        await server.stop(0)
        close_storage()
        raise
    credential.write_run_file(settings.home, address)
    return address, exporter


async def watch_health(
    server: RunningServer, probe: Callable[[], bool], interval: float, component: str
) -> None:
    """Report NOT_SERVING while ``probe()`` (run in a thread) fails, SERVING once it passes.

    Node and broker both run this with a database probe (issue 8 item 3).
    """
    serving = True
    while True:
        await asyncio.sleep(interval)
        ok = await asyncio.to_thread(probe)
        if ok != serving:
            serving = ok
            await server.set_serving(ok)
            log.warning(f"{component}.health", extra=fields(serving=ok))


# --- clients --------------------------------------------------------------------------------


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options every Tessera client channel uses: pinned certificate name, message limits."""
    return [
        ("grpc.ssl_target_name_override", SERVER_NAME),
        ("grpc.default_authority", SERVER_NAME),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def _signed_details(details: Any, identity: crypto.Identity, request: Any) -> _CallDetails:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    body = request.SerializeToString() if request is not None else b""
    signature = crypto.sign_request(identity, method, body)
    metadata = [*(details.metadata or ()), *signature.to_metadata()]
    return _CallDetails(
        details.method,
        details.timeout,
        metadata,
        details.credentials,
        details.wait_for_ready,
        getattr(details, "compression", None),  # grpc.aio's call details have none
    )


def _aio_details(details: Any, identity: crypto.Identity, request: Any) -> Any:
    signed = _signed_details(details, identity, request)
    return grpc.aio.ClientCallDetails(
        signed.method, signed.timeout, signed.metadata, signed.credentials, signed.wait_for_ready
    )


class SigningClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    """Signs every unary-request call of a synchronous channel with ``identity``."""

    def __init__(self, identity: crypto.Identity) -> None:
        self._identity = identity

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_signed_details(details, self._identity, request), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_signed_details(details, self._identity, request), request)


class AsyncUnarySigner(grpc.aio.UnaryUnaryClientInterceptor):
    """Signs every unary-unary call of an asyncio channel with ``identity``."""

    def __init__(self, identity: crypto.Identity) -> None:
        self._identity = identity

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._identity, request), request)


class AsyncStreamSigner(grpc.aio.UnaryStreamClientInterceptor):
    """Signs every unary-stream call of an asyncio channel with ``identity``.

    A separate object from :class:`AsyncUnarySigner`: grpc.aio files each interceptor under the
    first kind it implements, so one object implementing both would never sign streams.
    """

    def __init__(self, identity: crypto.Identity) -> None:
        self._identity = identity

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._identity, request), request)


def open_channel(
    address: str, cert_pem: bytes, identity: crypto.Identity | None, max_message_bytes: int
) -> grpc.Channel:
    """A synchronous TLS channel that trusts ``cert_pem`` and signs with ``identity``."""
    credentials = grpc.ssl_channel_credentials(root_certificates=cert_pem)
    channel = grpc.secure_channel(address, credentials, options=channel_options(max_message_bytes))
    if identity is None:
        return channel
    return grpc.intercept_channel(channel, SigningClientInterceptor(identity))


def open_aio_channel(
    address: str, cert_pem: bytes, identity: crypto.Identity | None, max_message_bytes: int
) -> grpc.aio.Channel:
    """An asyncio TLS channel that trusts ``cert_pem`` and signs with ``identity``."""
    credentials = grpc.ssl_channel_credentials(root_certificates=cert_pem)
    interceptors: list[grpc.aio.ClientInterceptor] | None = (
        [AsyncUnarySigner(identity), AsyncStreamSigner(identity)] if identity is not None else None
    )
    return grpc.aio.secure_channel(
        address, credentials, options=channel_options(max_message_bytes), interceptors=interceptors
    )


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    """Drain an async response stream into a list (handy for small streams)."""
    return [item async for item in stream]


class CredentialClient:
    """A signed TLS connection to the server named by the credential in ``home``.

    Node staff, broker operators and coordinators all hold a credential (tessera.credential);
    clients for each service build on this so the channel, the error mapping and the context
    manager exist once.
    """

    def __init__(
        self,
        home: Path,
        limits_bytes: int = 64 * 1024 * 1024,
        unlock: credential.Unlock | None = None,
    ) -> None:
        held = credential.read(home, unlock)
        self.address = credential.resolve_address(home, held)
        self.certificate = held.node_certificate
        self.channel = open_channel(
            self.address, held.node_certificate, held.identity, limits_bytes
        )

    def call(self, method: Callable[..., Any], request: Any, timeout: float = 30.0) -> Any:
        """Make one call; a failure comes back as the typed error the server raised."""
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"the server at {self.address}") from None

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
