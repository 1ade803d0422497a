"""A node's own statistics policy, end to end: real broker, real nodes, real rounds over TLS.

The node, not the broker, decides what it takes part in (docs/privacy.md, "The node owns its
trust"): a node whose ``[stats] min_threshold`` is 3 refuses a round of threshold 2 whatever the
broker signed, spends no budget on it, and the coordinator sees its reason instead of a round that
stays open; the round restarted without it is released by the others.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import TypeVar

from broker.stats import StatsClient
from node import directory_sync, stats
from node.client import NodeClient
from node.keyring import open_keyring
from tessera import dp
from tessera.config import StatsPolicy
from tessera.needs import NeedCategory, NeedStatus
from tessera.v1 import stats_pb2 as stats_pb
from tests.support import (
    PASSPHRASE,
    BackgroundBroker,
    BackgroundNode,
    enrolled_node,
    make_broker,
    unlock,
    wait_for,
)

T = TypeVar("T")
IDS = ["node-a", "node-b", "node-c"]


def test_a_node_refuses_a_threshold_below_its_own_and_the_coordinator_sees_why(
    tmp_path: Path,
) -> None:
    broker = BackgroundBroker(make_broker(tmp_path / "broker"))
    running: list[BackgroundNode] = []
    try:
        settings = [enrolled_node(broker, tmp_path, agency) for agency in IDS]
        for s in settings:
            identity = open_keyring(s.home, PASSPHRASE).identity
            directory_sync.sync(s.home, identity, directory_sync.load_link(s.home))
            for other in IDS:
                if other != s.home.name:
                    directory_sync.mark_verified(s.home, other)
        strict = dataclasses.replace(settings[0], stats=StatsPolicy(min_threshold=3))
        running = [BackgroundNode(s) for s in (strict, *settings[1:])]
        for s in settings:
            with NodeClient(s.home, unlock=unlock) as client:
                client.create_case(
                    {"prs_FirstName": "X"}, "", [(NeedCategory.MEDICAL, NeedStatus.UNMET)]
                )
        period = stats.period_of(dt.datetime.now(dt.UTC))
        with StatsClient(broker.settings.home) as coordinator:
            blob = coordinator.open_round("north", period, 2, 0.5, participants=IDS)
            round_id = stats_pb.Round.FromString(blob.body).round_id

            def declined_and_others_in() -> stats_pb.RoundStatus | None:
                status = coordinator.round(round_id)
                ready = list(status.declines) and list(status.submitted) == IDS[1:]
                return status if ready else None

            status = wait_for(
                declined_and_others_in, "node-a's decline and the others' shares", timeout=45
            )
            assert status.state == stats_pb.ROUND_STATE_OPEN and not status.release_id
            (decline,) = status.declines
            assert decline.agency_id == "node-a"
            assert "threshold 2 is below this node's minimum 3" in decline.reason
            restarted = coordinator.restart(round_id, 1, drop=["node-a"], reason="declined")
            assert list(stats_pb.Round.FromString(restarted.round.body).participants) == IDS[1:]
            assert not restarted.declines  # a new attempt starts with none
            released = wait_for(
                lambda: coordinator.round(round_id).release_id or None,
                "the restarted release",
                timeout=45,
            )
            release = stats_pb.Release.FromString(coordinator.release(release_id=released).body)
        assert release.participants == 2 and release.attempt == 2
        assert release.table.contribution_bound == dp.DEFAULT_BOUND
        # The refusing node spent nothing and audited why; the others paid for both attempts.
        with NodeClient(settings[0].home, unlock=unlock) as client:
            (ledger,) = client.budget(period)
        assert ledger.spent == 0.0 and ledger.charges == ()
        with NodeClient(settings[1].home, unlock=unlock) as client:
            (ledger,) = client.budget(period)
        assert ledger.spent == 1.0  # 0.5 for each attempt: a restart is a second noisy view
        assert [c.attempt for c in ledger.charges] == [1, 2]
    finally:
        for node in running:
            node.stop()
        broker.stop()
