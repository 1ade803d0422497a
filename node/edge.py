"""What the node's servicers share: worker threads, the caller, and the checks of ids and
pages every request goes through (STYLE.md habit 9: validate, call the application, convert)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

import grpc.aio

from node import htcds
from tessera import rpc
from tessera.errors import InvalidInput

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "Context",
    "actor",
    "agency_id",
    "case_id",
    "field_names",
    "page_offset",
    "run",
]

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000


async def run(func: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (the database, a file) in a worker thread."""
    return await asyncio.to_thread(func, *args)


def actor() -> str:
    """Who is calling (their staff principal), as the interceptor authenticated them."""
    return rpc.current_caller().principal


def case_id(value: str) -> str:
    """A case id from a request; InvalidInput if missing or too long."""
    value = value.strip()
    if not value or len(value) > 36:
        raise InvalidInput("a case id is required", hint="`tessera case list` shows case ids")
    return value


def agency_id(value: str) -> str:
    """An agency id from a request; InvalidInput if missing or too long."""
    value = value.strip()
    if not value or len(value) > 128:
        raise InvalidInput("an agency id is required", hint="`tessera agency list` shows them")
    return value


def page_offset(token: str) -> int:
    """The offset a page token this node issued stands for."""
    if not token:
        return 0
    # ASCII digits only, and few of them (found by fuzzing, issue 16): int() refused a token of
    # other Unicode digits, and an offset past SQLite's 64-bit integers failed in the query.
    if not (token.isascii() and token.isdigit()) or len(token) > 15:
        raise InvalidInput("that page token is not one this node issued")
    return int(token)


def field_names(names: Iterable[str]) -> list[str]:
    """HTCDS field names from a request, canonical; InvalidInput for an unknown one."""
    result = []
    for name in names:
        canonical = htcds.canonical_field(name)
        if canonical is None:
            raise InvalidInput(f"unknown field {name!r}", hint="see docs/data-model.md")
        result.append(canonical)
    return result
