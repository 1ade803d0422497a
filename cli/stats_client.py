"""The coordinator's client for the CLI: the broker's Stats service, with the broker's signature
checked on every round and release before anything is shown (``tessera stats`` commands and the
round commands in :mod:`cli.stats_rounds` share it)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.stats_render import mode_name
from tessera import labels

if TYPE_CHECKING:
    from tessera import dp

__all__ = ["StatsClient", "open_signed"]

_STATES = {0: "unspecified", 1: "open", 2: "released", 3: "abandoned"}


class StatsClient:
    """The coordinator's view for the CLI: the broker's Stats client plus checks of the broker's
    signature on every round and release it shows. Imports happen here, not at module load,
    so ``tessera --help`` stays fast."""

    def __init__(self, home: Path) -> None:
        from broker.stats import StatsClient as BrokerStatsClient
        from tessera.v1 import directory_pb2_grpc as directory_grpc

        self._base = BrokerStatsClient(home)
        self.address = self._base.address
        self._stub = self._base.stub
        self._directory = directory_grpc.DirectoryStub(self._base.channel)
        self._info: Any = None

    def __enter__(self) -> StatsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._base.close()

    def _call(self, method: Any, request: Any) -> Any:
        return self._base.call(method, request)

    def info(self) -> Any:
        """The broker's region and signing key (over the TLS channel pinned by the credential)."""
        from tessera.v1 import directory_pb2 as directory_pb

        if self._info is None:
            self._info = self._call(
                self._directory.GetBrokerInfo, directory_pb.GetBrokerInfoRequest()
            )
        return self._info

    def broker_key(self) -> bytes:
        """The broker's signing key, as the broker states it over the pinned TLS channel."""
        return bytes(self.info().signing_key)

    def _open_blob(self, blob: Any, label: bytes, message: Any) -> Any:
        """Verify a broker-signed blob against the broker's key and parse its body."""
        return open_signed(blob, self.broker_key(), label, message)

    def open_round(
        self,
        table: dp.TableSpec,
        region: str,
        period: str,
        participants: list[str],
        threshold: int,
        epsilon: float,
        local_noise: bool,
        bound: int | None = None,
    ) -> dict[str, Any]:
        """Open a round over ``table``; ``bound`` replaces its contribution bound (0: the
        broker sizes it), None keeps it."""
        from broker import serde
        from tessera.v1 import stats_pb2 as stats_pb

        spec = serde.spec_to_proto(table)
        if bound is not None:
            spec.contribution_bound = bound
        request = stats_pb.OpenRoundRequest(
            table=spec,
            region=region or self.info().region,
            period=period,
            participants=sorted(participants, key=str.encode),
            threshold=threshold,
            mode=serde.round_mode_pb(local_noise),
            epsilon=epsilon,
            idempotency_key=str(uuid.uuid4()),
        )
        reply = self._call(self._stub.OpenRound, request)
        round_ = self._open_blob(reply.round, labels.LABEL_ROUND, stats_pb.Round())
        return _round_dict(round_, "open", [], "")

    def round_status(self, round_id: str) -> dict[str, Any]:
        from tessera.v1 import stats_pb2 as stats_pb

        reply = self._call(self._stub.GetRound, stats_pb.GetRoundRequest(round_id=round_id))
        return self.status_dict(reply.round)

    def status_dict(self, status: Any) -> dict[str, Any]:
        """A RoundStatus for the CLI, its signed Round verified: the round, who submitted, who
        declined (agency, reason, when) and, once abandoned, why it was cancelled."""
        from tessera.timestamps import to_datetime
        from tessera.v1 import stats_pb2 as stats_pb

        round_ = self._open_blob(status.round, labels.LABEL_ROUND, stats_pb.Round())
        declines = [
            {
                "agency_id": d.agency_id,
                "reason": d.reason,
                "declined_at": to_datetime(d.declined_at).isoformat(),
            }
            for d in status.declines
        ]
        return _round_dict(
            round_,
            _STATES.get(status.state, "?"),
            list(status.submitted),
            status.release_id,
            declines=declines,
            cancel_reason=status.cancel_reason,
        )

    def restart(self, round_id: str, attempt: int, drop: list[str], reason: str) -> dict[str, Any]:
        """Abandon ``attempt`` (it must still be the current one) and open the next without
        ``drop``; the new attempt, verified."""
        from tessera.v1 import stats_pb2 as stats_pb

        request = stats_pb.RestartRoundRequest(
            round_id=round_id, attempt=attempt, drop_participants=drop, reason=reason
        )
        return self.status_dict(self._call(self._stub.RestartRound, request).round)

    def cancel(self, round_id: str, reason: str) -> dict[str, Any]:
        """Give up an open round; it as it now stands (abandoned), verified."""
        from tessera.v1 import stats_pb2 as stats_pb

        request = stats_pb.CancelRoundRequest(round_id=round_id, reason=reason)
        return self.status_dict(self._call(self._stub.CancelRound, request).round)

    def rounds(self, state: int, period: str) -> list[dict[str, Any]]:
        """Every round in ``state`` (0: any) and ``period`` ("": any), newest first, verified."""
        from tessera.v1 import stats_pb2 as stats_pb

        out: list[dict[str, Any]] = []
        request = stats_pb.ListRoundsRequest(state=state, period=period)  # type: ignore[arg-type]
        while True:
            reply = self._call(self._stub.ListRounds, request)
            out.extend(self.status_dict(status) for status in reply.rounds)
            if not reply.next_page_token:
                return out
            request.page_token = reply.next_page_token

    def releases(self, period: str) -> list[Any]:
        """Broker-signed releases for the period, newest first, verified and parsed."""
        from tessera.v1 import stats_pb2 as stats_pb

        return [
            self._open_blob(blob, labels.LABEL_RELEASE, stats_pb.Release())
            for blob in self.signed_releases(period)
        ]

    def signed_releases(self, period: str, limit: int | None = None) -> list[Any]:
        """The broker's signed release blobs for the period ("": every period), newest first,
        at most ``limit`` of them, NOT verified: each must go through :func:`open_signed`."""
        from tessera.v1 import stats_pb2 as stats_pb

        out: list[Any] = []
        request = stats_pb.ListReleasesRequest(period=period)
        while limit is None or len(out) < limit:
            reply = self._call(self._stub.ListReleases, request)
            out.extend(reply.releases)
            if not reply.next_page_token:
                break
            request.page_token = reply.next_page_token
        return out if limit is None else out[:limit]


def open_signed(blob: Any, key: bytes, label: bytes, message: Any) -> Any:
    """Check that ``blob`` is signed by ``key`` under ``label`` and parse its body into
    ``message``: Refused if another key signed it, BadSignature if the signature does not
    verify. No I/O; every round and release shown is opened here."""
    from tessera import crypto
    from tessera.errors import Refused

    if bytes(blob.signer) != key:
        raise Refused("the broker returned a blob not signed by its own key")
    crypto.verify(key, label, bytes(blob.body), bytes(blob.signature))
    message.ParseFromString(bytes(blob.body))
    return message


def _round_dict(
    round_: Any,
    state: str,
    submitted: list[str],
    release_id: str,
    *,
    declines: list[dict[str, Any]] | None = None,
    cancel_reason: str = "",
) -> dict[str, Any]:
    return {
        "round_id": round_.round_id,
        "attempt": round_.attempt,
        "state": state,
        "table": round_.table.name,
        "region": round_.region,
        "period": round_.period,
        "participants": list(round_.participants),
        "submitted": submitted,
        "threshold": round_.threshold,
        "mode": mode_name(round_.mode),
        "epsilon": round_.epsilon,
        "contribution_bound": round_.table.contribution_bound,
        "bound_basis": round_.bound_basis,
        "release_id": release_id,
    } | ({} if declines is None else {"declines": declines, "cancel_reason": cancel_reason})
