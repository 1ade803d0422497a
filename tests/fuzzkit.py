"""The fuzzing toolkit (issue 16 item 3): protobuf strategies built from the generated
descriptors, byte mutations, raw signed calls, a log watch and the run's tally.

Nothing here knows a particular RPC: every strategy is derived from ``tessera.v1``'s descriptors,
so a new method or field is fuzzed without anyone touching this file. Two hypothesis profiles:

* ``ci`` (the default): few examples, derandomized, so a CI run is bounded and a failure
  reproduces with the same command;
* ``full`` (``TESSERA_FUZZ=full``, what ``make adversarial`` sets): many more examples, random,
  with the failing example's blob printed (``@reproduce_failure``) so it can be replayed.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tessera import crypto

# --- profiles --------------------------------------------------------------------------------

PROFILE = "full" if os.environ.get("TESSERA_FUZZ", "").strip().lower() == "full" else "ci"
_COMMON: dict[str, Any] = {
    "deadline": None,  # real servers on shared cores: time per example varies; hangs are ours
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
    "database": None,  # examples are replayed from the seed or the printed blob, not a cache
    "print_blob": True,
}
settings.register_profile("ci", max_examples=12, derandomize=True, **_COMMON)
settings.register_profile("full", max_examples=300, derandomize=False, **_COMMON)
settings.load_profile(PROFILE)


def examples(ci: int, full: int) -> int:
    """A per-test example count for the active profile."""
    return full if PROFILE == "full" else ci


# --- the methods to fuzz ---------------------------------------------------------------------


def proto_modules() -> list[Any]:
    """Every generated ``*_pb2`` module of ``tessera.v1`` (a new .proto file is found too)."""
    import tessera.v1

    names = sorted(
        info.name
        for info in pkgutil.iter_modules(tessera.v1.__path__)
        if info.name.endswith("_pb2")
    )
    return [importlib.import_module(f"tessera.v1.{name}") for name in names]


def all_methods() -> list[MethodDescriptor]:
    """Every RPC of every service in the generated ``tessera.v1`` descriptors."""
    return [
        method
        for module in proto_modules()
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def method_path(method: MethodDescriptor) -> str:
    """The full gRPC method name, ``/tessera.v1.Node/GetCase``."""
    return f"/{method.containing_service.full_name}/{method.name}"


# --- strategies from descriptors -------------------------------------------------------------

_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)

# Strings that have broken parsers before, anywhere: empty, blank, huge, control characters,
# format strings, traversal, SQL, numbers that overflow, dates at the edges of the calendar.
HOSTILE_STRINGS = (
    "",
    " ",
    "\x00",
    "\t\n\r",
    "-1",
    "0",
    "18446744073709551616",
    "1e309",
    "NaN",
    "%s%n%x",
    "{0}{1}",
    "'; DROP TABLE case_record; --",
    "../../../../etc/passwd",
    "0000-00-00",
    "9999-12-31",
    "2026-02-30",
    "2026-13",
    "0001-01-01",
    "AAAA",
    "====",
    "\u202e\u0000\ufeff",
    "é" * 300,
    "x" * 5000,
    "00000000-0000-0000-0000-000000000000",
)
HOSTILE_INTS = (0, 1, -1, 2, 7, 100, 1000, 2**31 - 1, -(2**31), 2**32 - 1, 2**53 + 1)


@dataclass
class Pools:
    """Values that make a generated request meaningful to the servers: ids of real cases,
    consents, referrals and rounds, real agency ids, periods, field names. Filled by the fuzz
    fixture once its servers hold data; strings drawn from here reach deep into handlers."""

    strings: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # real 32-byte public keys, commitments
    path_prefix: str = "sandbox"  # path fields stay inside the working directory (a tmp dir)


_PATH_HINTS = ("destination", "path", "_file", "file_name", "directory")


def _is_path_field(name: str) -> bool:
    return any(hint in name for hint in _PATH_HINTS)


def _scalar(fd: FieldDescriptor, pools: Pools) -> st.SearchStrategy[Any]:
    kind = fd.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        edges = [v for v in (*HOSTILE_INTS, low, high, low + 1, high - 1) if low <= v <= high]
        return st.one_of(st.sampled_from(edges), st.integers(low, high))
    if kind in _FLOATS:
        return st.one_of(
            st.sampled_from([0.0, -0.0, 1e-300, 1e300, -1.0, 0.5, 10.0, 1e9]),
            st.floats(allow_nan=True, allow_infinity=True, width=64 if kind == 1 else 32),
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if kind == FieldDescriptor.TYPE_STRING:
        if _is_path_field(fd.name):
            return st.builds(
                lambda leaf: f"{pools.path_prefix}/{leaf}" if leaf else "",
                st.sampled_from(["", "b", "b/c", "nested/deeper", "x" * 200, "..", "a\x00b"]),
            )
        choices: list[st.SearchStrategy[str]] = [
            st.sampled_from(HOSTILE_STRINGS),
            st.text(max_size=24),
        ]
        if pools.strings:
            choices.insert(0, st.sampled_from(pools.strings))
        return st.one_of(*choices)
    if kind == FieldDescriptor.TYPE_BYTES:
        byte_choices: list[st.SearchStrategy[bytes]] = [
            st.binary(max_size=80),
            st.sampled_from([b"", b"\x00" * 32, b"\xff" * 32, b"\x00" * 64]),
        ]
        if pools.keys:
            byte_choices.insert(0, st.sampled_from(pools.keys))
        return st.one_of(*byte_choices)
    raise AssertionError(f"no strategy for field type {kind} of {fd.full_name}")


def messages(
    descriptor: Descriptor, pools: Pools, depth: int = 0
) -> st.SearchStrategy[pb_message.Message]:
    """Protobuf messages of ``descriptor``'s type: each field absent or drawn from its type's
    strategy; nested messages to a bounded depth; repeated fields of 0-4 items."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> pb_message.Message:
        msg = cls()
        for fd in descriptor.fields:
            if not draw(st.booleans()):
                continue
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 3:
                    continue
                assert fd.message_type is not None
                inner = messages(fd.message_type, pools, depth + 1)
                if fd.is_repeated:
                    for item in draw(st.lists(inner, max_size=3)):
                        getattr(msg, fd.name).add().CopyFrom(item)
                else:
                    getattr(msg, fd.name).CopyFrom(draw(inner))
                continue
            value = _scalar(fd, pools)
            if fd.is_repeated:
                getattr(msg, fd.name).extend(draw(st.lists(value, max_size=4)))
            else:
                setattr(msg, fd.name, draw(value))
        return msg

    return build()


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` after one to three byte-level mutations: flips, cuts, inserts, duplications,
    and overwrites with the bytes that make protobuf length prefixes and varints go wrong."""
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup", "overwrite", "varint"]))
        at = draw(st.integers(0, max(len(data), 1) - 1)) if data else 0
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            data = data[:at]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup" and data:
            end = draw(st.integers(at, len(data)))
            data[at:at] = data[at:end]
        elif op == "overwrite" and data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x08]))
        elif op == "varint":
            data[at:at] = draw(
                st.sampled_from([b"\xff" * 10, b"\x80" * 11, b"\x0a\xff\xff\xff\xff\x0f", b"\x08"])
            )
    return bytes(data)


def request_bytes(method: MethodDescriptor, pools: Pools) -> st.SearchStrategy[tuple[str, bytes]]:
    """(how it was made, request bytes) for ``method``: a generated message (most often), a
    mutation of one, or bytes that are no protobuf at all."""
    generated = messages(method.input_type, pools).map(lambda m: m.SerializeToString())
    return st.one_of(
        generated.map(lambda b: ("generated", b)),
        generated.flatmap(mutated).map(lambda b: ("mutated", b)),
        st.binary(max_size=64).map(lambda b: ("random", b)),
    )


# --- calling ---------------------------------------------------------------------------------

UNARY_DEADLINE = 15.0  # a unary call that takes longer is a hang
STREAM_WINDOW = 1.5  # a stream still open after this is following (Relay.Receive): cancelled


@dataclass
class Reply:
    """What one raw call came back with."""

    code: grpc.StatusCode
    details: str
    kind: str  # x-tessera-error-kind, "" when absent
    items: int  # stream messages received
    seconds: float
    cancelled_open: bool = False  # a stream we cancelled while it was still open


def call_raw(
    channel: grpc.Channel,
    method: MethodDescriptor,
    body: bytes,
    metadata: Sequence[tuple[str, str]] | None,
) -> Reply:
    sent = tuple(metadata) if metadata is not None else None
    """Send ``body`` as it is to ``method``; never raises for a gRPC status."""
    path = method_path(method)
    started = time.monotonic()
    if not method.server_streaming:
        unary: Any = channel.unary_unary(path)
        try:
            _, call = unary.with_call(body, timeout=UNARY_DEADLINE, metadata=sent)
            code, details, trailing = call.code(), call.details() or "", call.trailing_metadata()
        except grpc.RpcError as exc:
            failed: Any = exc
            code, details, trailing = (
                failed.code(),
                failed.details() or "",
                failed.trailing_metadata(),
            )
        return Reply(code, details, _kind(trailing), 1, time.monotonic() - started)
    streaming: Any = channel.unary_stream(path)
    stream: Any = streaming(body, timeout=UNARY_DEADLINE, metadata=sent)
    window_closed = threading.Event()

    def close_window() -> None:
        window_closed.set()
        stream.cancel()

    timer = threading.Timer(STREAM_WINDOW, close_window)
    timer.start()
    items = 0
    try:
        for _ in stream:
            items += 1
    except grpc.RpcError:
        pass
    finally:
        timer.cancel()
    code = stream.code()
    seconds = time.monotonic() - started
    cancelled = window_closed.is_set() and code == grpc.StatusCode.CANCELLED
    return Reply(
        code, stream.details() or "", _kind(stream.trailing_metadata()), items, seconds, cancelled
    )


def _kind(trailing: Any) -> str:
    for key, value in trailing or ():
        if key == "x-tessera-error-kind":
            return str(value)
    return ""


def signed_metadata(
    identity: crypto.Identity, method: MethodDescriptor, body: bytes
) -> list[tuple[str, str]]:
    """The request signature a real client of ``identity`` attaches."""
    return crypto.sign_request(identity, method_path(method), body).to_metadata()


@st.composite
def unsigned_metadata(
    draw: st.DrawFn, method: MethodDescriptor, body: bytes, stranger: crypto.Identity
) -> list[tuple[str, str]] | None:
    """Authentication that must not admit the request: none, garbage, a key nobody enrolled,
    a signature over other bytes or another method, an expired timestamp."""
    how = draw(st.sampled_from(["none", "garbage", "stranger", "other-body", "stale", "partial"]))
    if how == "none":
        return None
    if how == "garbage":
        keys = ["x-tessera-signer", "x-tessera-timestamp", "x-tessera-nonce", "x-tessera-signature"]
        values = st.text(alphabet="0123456789abcdefxyz-", max_size=140)
        return [(k, draw(values)) for k in keys]
    if how == "stranger":
        return signed_metadata(stranger, method, body)
    if how == "other-body":
        return signed_metadata(stranger, method, body + b"\x00")
    if how == "stale":
        path = method_path(method)
        return crypto.sign_request(stranger, path, body, now=time.time() - 3600).to_metadata()
    full = signed_metadata(stranger, method, body)
    return full[: draw(st.integers(0, len(full) - 1))]


# --- the log watch and the tally -------------------------------------------------------------


class LogWatch(logging.Handler):
    """Keeps every record with a traceback, every ERROR and every ``rpc.internal_error`` logged
    anywhere in this process (the servers run in-process, in their own loop threads)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.bad: list[logging.LogRecord] = []
        self._lock_bad = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR or "internal" in record.getMessage():
            with self._lock_bad:
                self.bad.append(record)

    def take(self) -> list[str]:
        """The bad records seen since the last call, formatted with their tracebacks."""
        with self._lock_bad:
            taken, self.bad = self.bad, []
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return [formatter.format(r) for r in taken]


@dataclass
class Tally:
    """What the fuzz run did, for ``make adversarial``'s summary line."""

    requests: int = 0
    internal: int = 0  # INTERNAL or UNKNOWN replies
    crashes: int = 0  # tracebacks in a server's log, or a server that stopped answering
    by_code: dict[str, int] = field(default_factory=dict)
    files: int = 0  # HTCDS files fuzzed

    def count(self, reply: Reply) -> None:
        self.requests += 1
        self.by_code[reply.code.name] = self.by_code.get(reply.code.name, 0) + 1
        if reply.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            self.internal += 1

    def summary(self) -> str:
        return (
            f"fuzz ({PROFILE} profile): {self.requests} requests fuzzed, "
            f"{self.internal} INTERNAL replies, {self.crashes} crashes, "
            f"{self.files} HTCDS files fuzzed; replies by status: "
            + ", ".join(f"{code} {n}" for code, n in sorted(self.by_code.items()))
        )


TALLY = Tally()
