"""The node's consent, referral and directory RPCs: adapters of node.referrals.flows
(DESIGN.md section 6). Each validates the request, runs one flow in a worker thread and converts
the result (node.serde); typed errors map to gRPC status in the interceptor (tessera.rpc).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

from node import directory_sync, htcds, serde
from node.edge import DEFAULT_PAGE as _DEFAULT_PAGE
from node.edge import MAX_PAGE as _MAX_PAGE
from node.edge import Context
from node.edge import actor as _actor
from node.edge import agency_id as _agency_id
from node.edge import case_id as _case_id
from node.edge import field_names as _field_names
from node.edge import page_offset as _page_offset
from node.edge import run as _run
from node.keyring import Keyring
from node.referrals.flows import Courier, GrantRequest, Referrals, SendRequest
from node.referrals.model import ConsentMethod, ReferralState
from node.store.cases import NodeStore
from tessera.config import Settings
from tessera.errors import InvalidInput, Refused
from tessera.timestamps import to_datetime
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import node_pb2_grpc as node_grpc

__all__ = ["ReferralService"]


class ReferralService(node_grpc.NodeServicer):
    """The consent, referral and agency methods of tessera.v1.Node (``NodeServicer`` adds the
    rest)."""

    _settings: Settings
    _store: NodeStore
    _keyring: Keyring
    referrals: Referrals
    relay: Courier

    # --- consent and referrals (DESIGN.md section 6; node.referrals.flows) -------------------

    async def GrantConsent(  # noqa: N802 - the proto's method name
        self, request: node_pb.GrantConsentRequest, context: Context
    ) -> node_pb.GrantConsentResponse:
        grant = GrantRequest(
            case_id=_case_id(request.case_id),
            recipient_id=_agency_id(request.receiving_agency_id),
            purpose=serde.need_category(request.purpose),
            categories=_data_categories(request.data_categories),
            method=_consent_method(request.method),
            witnessed_by=request.witnessed_by.strip(),
            expires_at=_expiry(request),
            idempotency_key=request.idempotency_key[:128] or str(uuid.uuid4()),
        )
        view = await _run(self.referrals.grant_consent, _actor(), grant)
        return node_pb.GrantConsentResponse(consent=serde.consent_view_pb(view))

    async def ListConsents(  # noqa: N802 - the proto's method name
        self, request: node_pb.ListConsentsRequest, context: Context
    ) -> node_pb.ListConsentsResponse:
        case_id = _case_id(request.case_id) if request.case_id else None
        views = await _run(self.referrals.consents, case_id, serde.consent_state(request.state))
        return node_pb.ListConsentsResponse(consents=[serde.consent_view_pb(v) for v in views])

    async def RevokeConsent(  # noqa: N802 - the proto's method name
        self, request: node_pb.RevokeConsentRequest, context: Context
    ) -> node_pb.RevokeConsentResponse:
        consent_id = request.consent_id.strip()
        if not consent_id:
            raise InvalidInput("a consent id is required", hint="`tessera consent list CASE`")
        revoked = await _run(self.referrals.revoke, _actor(), consent_id)
        purged = await self.relay.purge_now(revoked.purge_item)  # else the outbox retries it
        self.relay.wake()
        return node_pb.RevokeConsentResponse(
            consent=serde.consent_view_pb(revoked.consent),
            envelopes_purged=purged,
            revoked_referral_ids=list(revoked.revoked_referral_ids),
        )

    async def SendReferral(  # noqa: N802 - the proto's method name
        self, request: node_pb.SendReferralRequest, context: Context
    ) -> node_pb.SendReferralResponse:
        consent_id = request.consent_id.strip()
        if not consent_id:
            raise InvalidInput(
                "a referral is sent under a consent", hint="`tessera consent list CASE`"
            )
        send = SendRequest(
            case_id=_case_id(request.case_id),
            consent_id=consent_id,
            recipient_id=_agency_id(request.recipient_agency_id),
            need=serde.need_category(request.need),
            fields=tuple(_field_names(request.fields)),
            note=request.note,
            sender_contact=request.sender_contact,
            idempotency_key=request.idempotency_key[:128] or str(uuid.uuid4()),
        )
        referral = await _run(self.referrals.send, _actor(), send)
        self.relay.wake()
        return node_pb.SendReferralResponse(referral=serde.outgoing_pb(referral))

    async def ListReferrals(  # noqa: N802 - the proto's method name
        self, request: node_pb.ListReferralsRequest, context: Context
    ) -> node_pb.ListReferralsResponse:
        size = min(request.page_size or _DEFAULT_PAGE, _MAX_PAGE)
        offset = _page_offset(request.page_token)
        states = [serde.referral_state(request.state)] if request.state else None
        case_id = _case_id(request.case_id) if request.case_id else None
        stores = self.referrals.stores
        items: list[node_pb.ReferralRecord] = []
        if request.direction != node_pb.REFERRAL_DIRECTION_INCOMING:
            sent = await _run(
                lambda: stores.outgoing.sent(case_id, states=states, limit=size, offset=offset)
            )
            items.extend(serde.outgoing_pb(r) for r in sent)
        if request.direction != node_pb.REFERRAL_DIRECTION_OUTGOING and case_id is None:
            got = await _run(lambda: stores.incoming.inbox(states, limit=size, offset=offset))
            names = await _run(self.referrals.agency_names)
            items.extend(serde.incoming_pb(r, names) for r in got)
        items.sort(key=lambda r: to_datetime(r.updated_at), reverse=True)
        token = str(offset + size) if len(items) >= size else ""
        return node_pb.ListReferralsResponse(referrals=items, next_page_token=token)

    async def Inbox(  # noqa: N802 - the proto's method name
        self, request: node_pb.InboxRequest, context: Context
    ) -> node_pb.InboxResponse:
        size = min(request.page_size or _DEFAULT_PAGE, _MAX_PAGE)
        offset = _page_offset(request.page_token)
        states = None if request.include_answered else [ReferralState.DELIVERED]
        inbox = self.referrals.stores.incoming.inbox
        got = await _run(lambda: inbox(states, limit=size, offset=offset))
        names = await _run(self.referrals.agency_names)
        token = str(offset + size) if len(got) == size else ""
        return node_pb.InboxResponse(
            referrals=[serde.incoming_pb(r, names) for r in got], next_page_token=token
        )

    async def ShowReferral(  # noqa: N802 - the proto's method name
        self, request: node_pb.ShowReferralRequest, context: Context
    ) -> node_pb.ShowReferralResponse:
        referral_id = request.referral_id.strip()
        if not referral_id:
            raise InvalidInput("a referral id is required", hint="`tessera referral list`")
        shown = await _run(self.referrals.show, _actor(), referral_id)
        names = await _run(self.referrals.agency_names)
        return serde.shown_pb(shown, names)

    async def AnswerReferral(  # noqa: N802 - the proto's method name
        self, request: node_pb.AnswerReferralRequest, context: Context
    ) -> node_pb.AnswerReferralResponse:
        referral_id = request.referral_id.strip()
        if not referral_id:
            raise InvalidInput("a referral id is required", hint="`tessera referral inbox`")
        status = serde.referral_answer(request.answer)
        reason = serde.decline_reason(request.decline_reason)
        answer = self.referrals.answer
        answered = await _run(answer, _actor(), referral_id, status, reason, request.decline_text)
        self.relay.wake()
        names = await _run(self.referrals.agency_names)
        return node_pb.AnswerReferralResponse(referral=serde.incoming_pb(answered, names))

    async def ListAgencies(  # noqa: N802 - the proto's method name
        self, request: node_pb.ListAgenciesRequest, context: Context
    ) -> node_pb.ListAgenciesResponse:
        cache = await _run(self._synced_directory)
        wanted = serde.need_category(request.service).value if request.service else None
        agencies = [
            serde.agency_pb(record, record.agency_id in cache.verified)
            for agency_id, record in sorted(cache.records.items())
            if (request.include_revoked or not record.revoked)
            and (wanted is None or wanted in record.services)
        ]
        return node_pb.ListAgenciesResponse(agencies=agencies)

    async def VerifyAgency(  # noqa: N802 - the proto's method name
        self, request: node_pb.VerifyAgencyRequest, context: Context
    ) -> node_pb.VerifyAgencyResponse:
        cache = await _run(self._synced_directory)
        record = cache.records.get(request.agency_id)
        if record is None:
            raise InvalidInput(
                f"no agency {request.agency_id!r} in the directory",
                hint="`tessera agency list` shows the agencies there are",
            )

        def plain(text: str) -> str:
            return "".join(ch for ch in text.upper() if ch.isalnum())

        if plain(request.key_fingerprint) != plain(record.identity.fingerprint()):
            raise Refused(
                f"the fingerprint read out does not match the one pinned for {record.name}",
                hint="do not trust this agency's key; call them back on a number you know",
            )
        await _run(directory_sync.mark_verified, self._settings.home, record.agency_id)
        await _run(
            self._store.audit, _actor(), "agency.verified", None, {"agency": record.agency_id}
        )
        return node_pb.VerifyAgencyResponse(agency=serde.agency_pb(record, True))

    def _synced_directory(self) -> directory_sync.DirectoryCache:
        link = directory_sync.load_link(self._settings.home)
        return directory_sync.sync(self._settings.home, self._keyring.identity, link)


def _consent_method(value: int) -> ConsentMethod:
    method = serde.consent_method(value)
    if method is None:
        raise InvalidInput(
            "how consent was given is required", hint="verbal, written or electronic"
        )
    return method


def _data_categories(values: Iterable[str]) -> frozenset[str]:
    categories = frozenset(values)
    unknown = sorted(c for c in categories if c not in htcds.DATA_CATEGORIES)
    if not categories or unknown:
        raise InvalidInput(
            f"unknown data categories: {', '.join(unknown)}"
            if unknown
            else "name at least one data category to share",
            hint=f"one or more of: {', '.join(htcds.DATA_CATEGORIES)}",
        )
    return categories


def _expiry(request: node_pb.GrantConsentRequest) -> dt.datetime:
    if not request.HasField("expires_at"):
        raise InvalidInput("a consent needs an expiry date", hint="--expires YYYY-MM-DD")
    return to_datetime(request.expires_at)
