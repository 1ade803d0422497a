"""tessera.v1.Stats on the broker: rounds, shares, releases (DESIGN.md section 7).

The arithmetic and the privacy accounting come from :mod:`tessera.dp`; this module validates
requests, signs rounds and releases with the broker's key, and keeps them in
:class:`broker.store.stats.StatsStore`. The broker learns only sums: it never unmasks a share,
drops every share's cells once the attempt is summed, and discards an abandoned attempt's shares
unread. :class:`StatsClient` is the signed client coordinators and operators use.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import Engine

from broker import serde
from broker.serde import MAX_CELLS, round_noise_of, spec_from_proto, spec_to_proto
from broker.service import DirectoryView, run_blocking, utc_now
from broker.store.stats import (
    STATE_OPEN,
    StatsStore,
    StoredRelease,
    StoredRound,
    check_reason,
)
from tessera import crypto, dp, labels, rpc
from tessera.config import Limits, Settings
from tessera.errors import InvalidInput, NotFound, PermissionDenied, Refused
from tessera.timestamps import to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import stats_pb2 as stats_pb
from tessera.v1 import stats_pb2_grpc as stats_grpc

Context = grpc.aio.ServicerContext[Any, Any]

ALPHA = 0.05
DEFAULT_ATTEMPT_TIMEOUT = dt.timedelta(days=7)
MAX_ATTEMPT_TIMEOUT = dt.timedelta(days=90)
DEFAULT_PAGE = 100
_PERIOD = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")
_KEY_CHARS = 128


# --- rounds -------------------------------------------------------------------------------------


def round_digest(body: bytes) -> bytes:
    """digest(LABEL_ROUND, body of a signed Round): what a share names to be counted."""
    return crypto.digest(labels.LABEL_ROUND, body)


def check_period(period: str) -> str:
    """A period "YYYY-MM"."""
    if not _PERIOD.match(period):
        raise InvalidInput(f"the period must be YYYY-MM, not {period!r}")
    return period


# --- the release --------------------------------------------------------------------------------


def build_release(
    identity: crypto.Identity, round_body: bytes, vectors: Sequence[Sequence[int]], now: dt.datetime
) -> tuple[str, bytes, bytes]:
    """Sum the shares of one attempt and sign the Release: (release_id, body, signature).

    Private rounds: the total noise is the sum of n shares of threshold t. Local-noise rounds:
    every node added the full noise, so the total is n shares of threshold 1. Either way each
    part's interval is :func:`tessera.dp.sum_accuracy` for the actual n at that part's scale
    (:func:`tessera.dp.round_noise`), and ε is the sum of OpenDP's maps for the table's and the
    histogram's discrete Laplace. The dropped share and the suggested bound are post-processing
    of the histogram (:func:`tessera.dp.bound_report`), its bins read at a Bonferroni-corrected
    level so an empty bin rarely counts.
    """
    body = stats_pb.Round.FromString(round_body)
    spec = spec_from_proto(body.table)
    noise = round_noise_of(body, spec)
    n = len(vectors)
    threshold = 1 if serde.local_noise(body.mode) else int(body.threshold)
    totals = dp.unmask_sum(vectors)
    cells = dp.release_cells(totals[: spec.size], spec, n, threshold, noise.table_scale, ALPHA)
    epsilon, table_epsilon = dp.round_epsilon(noise, spec)
    release = stats_pb.Release(
        release_id=str(uuid.uuid4()),
        round_id=body.round_id,
        attempt=body.attempt,
        round_digest=round_digest(round_body),
        table=body.table,
        region=body.region,
        period=body.period,
        mode=body.mode,
        cells=serde.released_cells(cells),
        epsilon=epsilon,
        table_epsilon=table_epsilon,
        alpha=ALPHA,
        participants=n,
        mechanism=dp.describe_mechanism(n, threshold, noise.table_scale),
        # The total noise has sqrt(n / t) times the standard deviation of the discrete Laplace
        # of scale s (n = t: exactly that distribution).
        noise_scale=noise.table_scale * math.sqrt(n / threshold),
        accuracy=dp.sum_accuracy(n, threshold, noise.table_scale, ALPHA),
        released_at=to_timestamp(now),
    )
    if noise.histogram_bins:
        histogram = totals[spec.size :]
        scale = noise.histogram_scale
        accuracy = dp.sum_accuracy(n, threshold, scale, ALPHA)
        significance = dp.sum_accuracy(n, threshold, scale, ALPHA / noise.histogram_bins)
        dropped, suggested = dp.bound_report(histogram, significance, spec.contribution_bound)
        release.contributions.extend(
            serde.released_cells(
                [([str(m)], v, v - accuracy, v + accuracy) for m, v in enumerate(histogram, 1)]
            )
        )
        release.contributions_accuracy = accuracy
        release.dropped_fraction = dropped
        release.suggested_bound = suggested
    signed = release.SerializeToString()
    return release.release_id, signed, identity.sign(labels.LABEL_RELEASE, signed)


# --- the servicer -------------------------------------------------------------------------------


class StatsServicer(stats_grpc.StatsServicer):
    """tessera.v1.Stats: rounds opened by coordinators, shares from agencies, signed releases."""

    def __init__(
        self, settings: Settings, engine: Engine, identity: crypto.Identity, view: DirectoryView
    ) -> None:
        self._settings = settings
        self._store = StatsStore(engine)
        self._identity = identity
        self._view = view

    @property
    def store(self) -> StatsStore:
        """The rounds and releases store."""
        return self._store

    def _blob(self, body: bytes, signature: bytes) -> common_pb.SignedBlob:
        return serde.signed_blob(body, signature, self._identity.public.signing_key)

    def _status(self, stored: StoredRound) -> stats_pb.RoundStatus:
        return serde.round_status_pb(stored, self._identity.public.signing_key)

    def _sign_round(self, body: stats_pb.Round) -> tuple[bytes, bytes]:
        raw = body.SerializeToString()
        return raw, self._identity.sign(labels.LABEL_ROUND, raw)

    def _participants(self, asked: Sequence[str]) -> list[str]:
        """Enrolled, unrevoked agencies of this region, in ascending byte order."""
        region = self._settings.region
        records = self._view.records
        if not asked:
            chosen = [a for a, r in records.items() if r.region == region and not r.revoked]
        else:
            if len(set(asked)) != len(asked):
                raise InvalidInput("a participant is listed twice")
            for agency_id in asked:
                record = records.get(agency_id)
                if record is None or record.revoked or record.region != region:
                    raise InvalidInput(
                        f"{agency_id!r} is not an enrolled, unrevoked agency of region {region!r}"
                    )
            chosen = list(asked)
        return sorted(chosen, key=str.encode)

    async def OpenRound(  # noqa: N802 - the proto's method name
        self, request: stats_pb.OpenRoundRequest, context: Context
    ) -> stats_pb.OpenRoundResponse:
        caller = rpc.current_caller()
        key = request.idempotency_key or None
        if key is not None and len(key) > _KEY_CHARS:
            raise InvalidInput(f"an idempotency key is at most {_KEY_CHARS} characters")
        if key is not None:
            existing = await run_blocking(self._store.round_by_key, key)
            if existing is not None:
                return await self._opened(existing.round_id)
        spec, bound_basis = await self._table(request)
        if request.region != self._settings.region:
            raise InvalidInput(f"this broker serves region {self._settings.region!r}")
        period = check_period(request.period)
        if not serde.known_mode(request.mode):
            raise InvalidInput("the mode must be PRIVATE or LOCAL_NOISE")
        if not math.isfinite(request.epsilon) or request.epsilon <= 0:
            raise InvalidInput("epsilon must be a positive finite number")
        timeout = (
            request.attempt_timeout.ToTimedelta()
            if request.HasField("attempt_timeout")
            else DEFAULT_ATTEMPT_TIMEOUT
        )
        if not dt.timedelta(seconds=1) <= timeout <= MAX_ATTEMPT_TIMEOUT:
            raise InvalidInput("the attempt timeout must be between 1 second and 90 days")
        await run_blocking(self._view.refresh)
        participants = self._participants(list(request.participants))
        if len(participants) < 2:
            raise InvalidInput("a round needs at least 2 participants")
        threshold = int(request.threshold) or dp.default_threshold(len(participants))
        if not 2 <= threshold <= len(participants):
            raise InvalidInput(
                f"the threshold must be at least 2 and at most the {len(participants)} participants"
            )
        histogram = stats_pb.ContributionHistogram(
            bins=dp.histogram_bins(spec), epsilon=request.epsilon * dp.HISTOGRAM_SHARE
        )
        noise = dp.round_noise(spec, request.epsilon, histogram.bins, histogram.epsilon)
        if noise.cells > MAX_CELLS:
            raise InvalidInput(f"a round has at most {MAX_CELLS} cells; this one has {noise.cells}")
        # The accuracy must be computable for these scales before anyone spends budget on it.
        local = serde.local_noise(request.mode)
        for scale in (noise.table_scale, noise.histogram_scale):
            dp.sum_accuracy(len(participants), 1 if local else threshold, scale, ALPHA)
        now = utc_now()
        round_id = str(uuid.uuid4())
        body = stats_pb.Round(
            round_id=round_id,
            attempt=1,
            table=spec_to_proto(spec),
            region=request.region,
            period=period,
            participants=participants,
            threshold=threshold,
            mode=request.mode,
            epsilon=request.epsilon,
            opened_at=to_timestamp(now),
            deadline=to_timestamp(now + timeout),
            opened_by=caller.signer,
            histogram=histogram,
            bound_basis=bound_basis,
        )
        raw, signature = self._sign_round(body)
        stored, _created = await run_blocking(
            lambda: self._store.open_round(
                round_id=round_id,
                idempotency_key=key,
                period=period,
                table_name=spec.name,
                attempt_timeout_seconds=int(timeout.total_seconds()),
                opened_at=now,
                body=raw,
                signature=signature,
                deadline=now + timeout,
                participants=participants,
            )
        )
        return await self._opened(stored.round_id)

    async def _table(self, request: stats_pb.OpenRoundRequest) -> tuple[dp.TableSpec, str]:
        """The round's table and where its bound came from: as requested, else sized from the
        newest release of the same table (its suggested bound), else :data:`dp.DEFAULT_BOUND`."""
        asked = request.table if request.HasField("table") else None
        if asked is not None and asked.contribution_bound:
            return spec_from_proto(asked), "requested"
        name = asked.name if asked is not None else dp.default_needs_table().name
        page, _ = await run_blocking(
            lambda: self._store.list_releases(period="", table=name, limit=1, before=None)
        )
        bound, basis = dp.DEFAULT_BOUND, "default"
        if page:
            newest = stats_pb.Release.FromString(page[0].body)
            if newest.suggested_bound:
                bound, basis = int(newest.suggested_bound), f"release:{newest.release_id}"
        if asked is None:
            return dp.default_needs_table(bound), basis
        sized = stats_pb.TableSpec()
        sized.CopyFrom(asked)
        sized.contribution_bound = bound
        return spec_from_proto(sized), basis

    async def _opened(self, round_id: str) -> stats_pb.OpenRoundResponse:
        """OpenRound's answer: the round's first attempt as signed, also for a repeated open
        whose round was restarted since."""
        first = await run_blocking(self._store.attempt_body, round_id, 1)
        if first is None:  # pragma: no cover - stored with the round
            raise NotFound(f"round {round_id} has no first attempt")
        return stats_pb.OpenRoundResponse(round=self._blob(*first))

    async def GetRound(  # noqa: N802 - the proto's method name
        self, request: stats_pb.GetRoundRequest, context: Context
    ) -> stats_pb.GetRoundResponse:
        stored = await run_blocking(self._store.round, request.round_id)
        if stored is None:
            raise NotFound(f"no round {request.round_id!r}")
        return stats_pb.GetRoundResponse(round=self._status(stored))

    async def ListRounds(  # noqa: N802 - the proto's method name
        self, request: stats_pb.ListRoundsRequest, context: Context
    ) -> stats_pb.ListRoundsResponse:
        page, following = await run_blocking(
            lambda: self._store.list_rounds(
                state=int(request.state),
                participant=request.participant,
                period=request.period,
                limit=request.page_size or DEFAULT_PAGE,
                before=_token(request.page_token),
            )
        )
        return stats_pb.ListRoundsResponse(
            rounds=[self._status(s) for s in page],
            next_page_token=_next_token(following),
        )

    async def SubmitShare(  # noqa: N802 - the proto's method name
        self, request: stats_pb.SubmitShareRequest, context: Context
    ) -> stats_pb.SubmitShareResponse:
        caller = rpc.current_caller()
        if request.agency_id != caller.principal:
            raise PermissionDenied("an agency submits only its own share")
        stored = await run_blocking(self._store.round, request.round_id)
        if stored is None:
            raise NotFound(f"no round {request.round_id!r}")
        if request.attempt != stored.attempt:
            raise Refused(
                f"attempt {request.attempt} is not the current attempt ({stored.attempt}) of "
                f"round {request.round_id}",
                hint="fetch the round again; a share is never moved to another attempt",
            )
        body = stats_pb.Round.FromString(stored.body)
        if request.agency_id not in body.participants:
            raise PermissionDenied(
                f"agency {request.agency_id} is not a participant of attempt {stored.attempt}"
            )
        if request.round_digest != round_digest(stored.body):
            raise InvalidInput(
                "round_digest does not match the signed round of this attempt",
                hint="compute digest(LABEL_ROUND, body) of the round you verified",
            )
        size = round_noise_of(body, spec_from_proto(body.table)).cells
        if len(request.masked_cells) != size:
            raise InvalidInput(
                f"the round's vector has {size} cells; the share has {len(request.masked_cells)}"
            )
        now = utc_now()
        if stored.state == STATE_OPEN and now > stored.deadline:
            raise Refused(
                f"attempt {stored.attempt} of round {request.round_id} passed its deadline",
                hint="ask the coordinator to restart the round",
            )
        result = await run_blocking(
            lambda: self._store.submit_share(
                round_id=request.round_id,
                attempt=request.attempt,
                agency_id=request.agency_id,
                cells=list(request.masked_cells),
                now=now,
                make_release=lambda r, vectors: build_release(self._identity, r.body, vectors, now),
            )
        )
        return stats_pb.SubmitShareResponse(
            submitted=result.submitted,
            expected=result.expected,
            release_id=result.release_id or "",
        )

    async def RestartRound(  # noqa: N802 - the proto's method name
        self, request: stats_pb.RestartRoundRequest, context: Context
    ) -> stats_pb.RestartRoundResponse:
        stored = await run_blocking(self._store.round, request.round_id)
        if stored is None:
            raise NotFound(f"no round {request.round_id!r}")
        if stored.state != STATE_OPEN:
            raise Refused(f"round {request.round_id} is no longer open")
        if request.attempt != stored.attempt:
            raise Refused(
                f"attempt {request.attempt} is not the current attempt ({stored.attempt})",
                hint="someone restarted it already; fetch the round again",
            )
        body = stats_pb.Round.FromString(stored.body)
        dropped = set(request.drop_participants)
        unknown = dropped - set(body.participants)
        if unknown:
            raise InvalidInput(f"not participants of this attempt: {sorted(unknown)}")
        remaining = [a for a in body.participants if a not in dropped]
        if len(remaining) < max(2, body.threshold):
            raise Refused(
                f"only {len(remaining)} participants would remain; the threshold is "
                f"{body.threshold}",
                hint="open a new round with a lower threshold instead",
            )
        now = utc_now()
        deadline = now + dt.timedelta(seconds=stored.attempt_timeout_seconds)
        new = stats_pb.Round()
        new.CopyFrom(body)
        new.attempt = stored.attempt + 1
        del new.participants[:]
        new.participants.extend(remaining)
        new.opened_at.CopyFrom(to_timestamp(now))
        new.deadline.CopyFrom(to_timestamp(deadline))
        raw, signature = self._sign_round(new)
        restarted = await run_blocking(
            lambda: self._store.restart_round(
                round_id=request.round_id,
                attempt=request.attempt,
                reason=request.reason,
                now=now,
                body=raw,
                signature=signature,
                deadline=deadline,
                participants=remaining,
            )
        )
        return stats_pb.RestartRoundResponse(round=self._status(restarted))

    async def GetRelease(  # noqa: N802 - the proto's method name
        self, request: stats_pb.GetReleaseRequest, context: Context
    ) -> stats_pb.GetReleaseResponse:
        which = request.WhichOneof("key")
        if which is None:
            raise InvalidInput("name a release_id or a round_id")
        stored = await run_blocking(
            lambda: self._store.release(
                release_id=request.release_id if which == "release_id" else "",
                round_id=request.round_id if which == "round_id" else "",
            )
        )
        if stored is None:
            raise NotFound("no such release")
        return stats_pb.GetReleaseResponse(release=self._release_blob(stored))

    async def ListReleases(  # noqa: N802 - the proto's method name
        self, request: stats_pb.ListReleasesRequest, context: Context
    ) -> stats_pb.ListReleasesResponse:
        page, following = await run_blocking(
            lambda: self._store.list_releases(
                period=request.period,
                table=request.table,
                limit=request.page_size or DEFAULT_PAGE,
                before=_token(request.page_token),
            )
        )
        return stats_pb.ListReleasesResponse(
            releases=[self._release_blob(r) for r in page],
            next_page_token=_next_token(following),
        )

    def _release_blob(self, stored: StoredRelease) -> common_pb.SignedBlob:
        return self._blob(stored.body, stored.signature)

    async def DeclineRound(  # noqa: N802 - the proto's method name
        self, request: stats_pb.DeclineRoundRequest, context: Context
    ) -> stats_pb.DeclineRoundResponse:
        """A participant will not submit to the current attempt; the store checks (again, under
        the round's lock) that it is a participant of that attempt, open, and not submitted."""
        caller = rpc.current_caller()
        if request.agency_id != caller.principal:
            raise PermissionDenied("an agency declines only for itself")
        reason = check_reason(request.reason)
        declined = await run_blocking(
            lambda: self._store.decline(
                round_id=request.round_id,
                attempt=request.attempt,
                agency_id=request.agency_id,
                reason=reason,
                now=utc_now(),
            )
        )
        return stats_pb.DeclineRoundResponse(round=self._status(declined))

    async def CancelRound(  # noqa: N802 - the proto's method name
        self, request: stats_pb.CancelRoundRequest, context: Context
    ) -> stats_pb.CancelRoundResponse:
        """Give up an open round: no release; its shares are deleted unread. Idempotent for an
        abandoned round; a released one is refused."""
        reason = check_reason(request.reason)
        cancelled = await run_blocking(
            lambda: self._store.cancel(round_id=request.round_id, reason=reason, now=utc_now())
        )
        return stats_pb.CancelRoundResponse(round=self._status(cancelled))


def _next_token(following: int | None) -> str:
    """The page token that continues a listing after ``following`` ("" at the end)."""
    return str(following) if following is not None else ""


def _token(token: str) -> int | None:
    if not token:
        return None
    # ASCII digits only, and few of them (found by fuzzing, issue 16): int() refused a token of
    # other Unicode digits, and one past SQLite's 64-bit integers failed in the query.
    if not (token.isascii() and token.isdigit()) or len(token) > 18:
        raise InvalidInput("not a page token of this broker")
    return int(token)


# --- the client for coordinators and operators --------------------------------------------------


class StatsClient(rpc.CredentialClient):
    """A coordinator's or operator's signed connection to the Stats service (credential in
    ``home``, as for :class:`broker.operator_client.OperatorClient`)."""

    def __init__(self, home: Path) -> None:
        super().__init__(home, Limits().max_message_bytes)
        self.stub = stats_grpc.StatsStub(self.channel)

    def open_round(
        self,
        region: str,
        period: str,
        threshold: int,
        epsilon: float,
        *,
        mode: int = stats_pb.ROUND_MODE_PRIVATE,
        participants: Sequence[str] = (),
        table: dp.TableSpec | None = None,
        attempt_timeout: dt.timedelta | None = None,
        idempotency_key: str = "",
    ) -> common_pb.SignedBlob:
        """Open a round; its broker-signed Round (attempt 1)."""
        request = stats_pb.OpenRoundRequest(
            region=region,
            period=period,
            participants=list(participants),
            threshold=threshold,
            mode=mode,  # type: ignore[arg-type]
            epsilon=epsilon,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
        )
        if table is not None:
            request.table.CopyFrom(spec_to_proto(table))
        if attempt_timeout is not None:
            timeout = Duration()
            timeout.FromTimedelta(attempt_timeout)
            request.attempt_timeout.CopyFrom(timeout)
        reply: stats_pb.OpenRoundResponse = self.call(self.stub.OpenRound, request)
        return reply.round

    def round(self, round_id: str) -> stats_pb.RoundStatus:
        """One round and its progress."""
        reply: stats_pb.GetRoundResponse = self.call(
            self.stub.GetRound, stats_pb.GetRoundRequest(round_id=round_id)
        )
        return reply.round

    def restart(
        self, round_id: str, attempt: int, drop: Sequence[str] = (), reason: str = ""
    ) -> stats_pb.RoundStatus:
        """Abandon ``attempt`` and open the next one without the ``drop`` participants."""
        reply: stats_pb.RestartRoundResponse = self.call(
            self.stub.RestartRound,
            stats_pb.RestartRoundRequest(
                round_id=round_id, attempt=attempt, drop_participants=list(drop), reason=reason
            ),
        )
        return reply.round

    def release(self, *, release_id: str = "", round_id: str = "") -> common_pb.SignedBlob:
        """One broker-signed release."""
        request = (
            stats_pb.GetReleaseRequest(release_id=release_id)
            if release_id
            else stats_pb.GetReleaseRequest(round_id=round_id)
        )
        reply: stats_pb.GetReleaseResponse = self.call(self.stub.GetRelease, request)
        return reply.release

    def cancel(self, round_id: str, reason: str) -> stats_pb.RoundStatus:
        """Give up an open round (no release; its shares are discarded unread)."""
        reply: stats_pb.CancelRoundResponse = self.call(
            self.stub.CancelRound, stats_pb.CancelRoundRequest(round_id=round_id, reason=reason)
        )
        return reply.round

    def decline(
        self, round_id: str, attempt: int, agency_id: str, reason: str
    ) -> stats_pb.RoundStatus:
        """Decline ``attempt`` as ``agency_id``. Only that agency's own key may (a node sends it on
        its own broker channel); the broker refuses a coordinator's or operator's
        credential (PERMISSION_DENIED)."""
        reply: stats_pb.DeclineRoundResponse = self.call(
            self.stub.DeclineRound,
            stats_pb.DeclineRoundRequest(
                round_id=round_id, attempt=attempt, agency_id=agency_id, reason=reason
            ),
        )
        return reply.round

    def rounds(
        self, *, state: int = 0, participant: str = "", period: str = ""
    ) -> list[stats_pb.RoundStatus]:
        """Every round matching the filters (0 / "" mean any), newest first, all pages."""
        out: list[stats_pb.RoundStatus] = []
        request = stats_pb.ListRoundsRequest(
            state=state,  # type: ignore[arg-type]
            participant=participant,
            period=period,
        )
        while True:
            reply: stats_pb.ListRoundsResponse = self.call(self.stub.ListRounds, request)
            out.extend(reply.rounds)
            if not reply.next_page_token:
                return out
            request.page_token = reply.next_page_token
