"""Cross-process mail wakeups on PostgreSQL (LISTEN/NOTIFY).

Several broker processes share one PostgreSQL database (DESIGN.md section 3, "Scale-out"). A
recipient's Receive stream is held by one of them, but its mail may be stored by any: without a
signal, the stream only finds it at its next poll. Each put transaction that stores mail notifies
:data:`MAIL_CHANNEL` with the recipient's agency id (delivered when it commits, never before), and
each broker process listens on that channel and wakes its local stream for that recipient.

Only agency ids travel on the channel, which the broker's database holds anyway. A lost
notification (a dropped listener connection) costs latency, never mail: the streams still poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
import psycopg.sql

from tessera.db import libpq_dsn
from tessera.logs import fields

log = logging.getLogger(__name__)
MAIL_CHANNEL = "tessera_mail"
_RECONNECT_SECONDS = 2.0
_LISTEN = psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(MAIL_CHANNEL))


async def listen_for_mail(
    database_url: str,
    wake: Callable[[str], None],
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Call ``wake(recipient_id)`` for every mail notification, until cancelled.

    Reconnects after a lost connection; ``on_listening()`` is called each time LISTEN is in
    effect (so a test, or a caller, knows no later commit's notification can be missed).
    """
    dsn = libpq_dsn(database_url)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
                await connection.execute(_LISTEN)
                if on_listening is not None:
                    on_listening()
                async for notification in connection.notifies():
                    wake(notification.payload)
        except psycopg.Error as exc:
            log.warning(
                "broker.mail_listener_lost",
                extra=fields(reason=str(exc).strip().splitlines()[0] if str(exc) else "unknown"),
            )
            await asyncio.sleep(_RECONNECT_SECONDS)
