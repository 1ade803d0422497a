"""The soak of bench/soak.py at CI size: correctness only, no timing (issue 16 item 6).

One real broker process (SQLite) on loopback, 50 agencies enrolled through the Directory service,
each following its mailbox with ReceiveBatches over its own signed TLS connection, 300 sealed
referrals between random pairs pushed with signed SendBatch and Send calls, PRIVATE statistics
rounds running meanwhile. Every referral must arrive exactly once, at its recipient, from its
sender, byte for byte, and open and verify as a node opens it; no stream may end and no call may
fail (INTERNAL or any other status).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import soak

pytestmark = pytest.mark.slow


def test_every_referral_arrives_once_over_50_streams_with_rounds_running(tmp_path: Path) -> None:
    config = soak.Config(streams=50, referrals=300, open_envelopes=True, idle_seconds=0.5)
    report = asyncio.run(soak.soak(config, folder=tmp_path))
    assert report.errors == []
    assert report.round_errors == []
    assert report.delivered == 300
    assert report.duplicates == 0
    assert report.acknowledged == 300
    assert report.dropped_streams == 0
    assert report.rounds >= 1
    assert report.ok, report.summary()
