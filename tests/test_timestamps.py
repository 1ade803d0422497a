"""tessera.timestamps: every wire time goes through it, so it is checked against protobuf's own
conversion and attacked with what a peer could send."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tessera.errors import InvalidInput
from tessera.timestamps import require_aware, to_datetime, to_timestamp

SAMPLES = [
    dt.datetime(2026, 11, 25, 22, 0, 0, 123456, tzinfo=dt.UTC),
    dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),  # just before the epoch
    dt.datetime(1, 1, 1, tzinfo=dt.UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
    dt.datetime(2026, 3, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
]


@pytest.mark.parametrize("value", SAMPLES)
def test_conversion_agrees_with_protobuf_and_round_trips(value: dt.datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value.astimezone(dt.UTC))
    assert to_timestamp(value) == expected
    back = to_datetime(to_timestamp(value))
    assert back == value and back.tzinfo == dt.UTC


def test_a_naive_datetime_is_refused_by_name() -> None:
    with pytest.raises(InvalidInput, match="expires_at must be a timezone-aware"):
        to_timestamp(dt.datetime(2026, 1, 1), "expires_at")
    with pytest.raises(InvalidInput):
        require_aware("2026-01-01", "now")


@pytest.mark.parametrize(
    "stamp",
    [
        Timestamp(seconds=10**15),  # far beyond year 9999
        Timestamp(seconds=-(10**15)),
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=0, nanos=1_000_000_000),
    ],
)
def test_a_timestamp_no_datetime_can_hold_is_invalid_input(stamp: Timestamp) -> None:
    with pytest.raises(InvalidInput, match="signed_at is not a valid timestamp"):
        to_datetime(stamp, "signed_at")


def test_nanoseconds_are_truncated_to_microseconds() -> None:
    assert to_datetime(Timestamp(seconds=0, nanos=1_999)) == dt.datetime(
        1970, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC
    )
