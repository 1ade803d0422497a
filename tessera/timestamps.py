"""Times on the wire: aware datetimes and protobuf Timestamps, converted in one place.

Every timestamp Tessera signs, stores or sends is UTC. A naive datetime is refused (it would be
read in whatever zone a machine happens to run in), and a Timestamp from the wire that no
datetime can hold is a clear InvalidInput, never a crash. The conversion is done directly
(microsecond precision, as datetimes have) rather than by protobuf's ``FromDatetime``, which is
pure Python and showed in the broker's relay profile, where every receipt and delivery carries
a time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from tessera.errors import InvalidInput

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NANOS = 1_000_000_000


def require_aware(value: object, name: str) -> datetime:
    """``value`` if it is a timezone-aware datetime; otherwise InvalidInput naming ``name``."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidInput(f"{name} must be a timezone-aware datetime")
    return value


def to_timestamp(value: datetime, name: str = "a time") -> Timestamp:
    """An aware datetime as a protobuf Timestamp."""
    delta = require_aware(value, name) - _EPOCH
    seconds, micros = divmod(
        (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds, 1_000_000
    )
    return Timestamp(seconds=seconds, nanos=micros * 1000)


def to_datetime(stamp: Timestamp, name: str = "a timestamp") -> datetime:
    """An aware UTC datetime from a protobuf Timestamp (nanoseconds truncated to microseconds)."""
    if not 0 <= stamp.nanos < _NANOS:
        raise InvalidInput(f"{name} is not a valid timestamp")
    try:
        return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)
    except OverflowError:
        raise InvalidInput(f"{name} is not a valid timestamp") from None
