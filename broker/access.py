"""Who may call what on the broker (issue 5; DESIGN.md sections 4-6).

Callers sign every request (tessera.rpc). A signer is an enrolled, unrevoked agency (its node), or
a person in ``operators.json`` (operator or coordinator). Unlisted methods are refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from broker.identity import BrokerRole, Operator
from tessera.errors import PermissionDenied, Unauthenticated
from tessera.rpc import Authenticator, Caller

AGENCY = "agency"
# Methods open without a signature: broker discovery, and enrolment (its one-time token is the
# credential).
PUBLIC = frozenset({"/tessera.v1.Directory/GetBrokerInfo", "/tessera.v1.Directory/Enrol"})

_READ_DIRECTORY = frozenset({AGENCY, BrokerRole.OPERATOR.value, BrokerRole.COORDINATOR.value})
# Statistics rounds are opened and restarted by a coordinator or an operator (DESIGN.md §7).
_COORDINATE = frozenset({BrokerRole.OPERATOR.value, BrokerRole.COORDINATOR.value})
_ROLES: dict[str, frozenset[str]] = {
    "/tessera.v1.Directory/IssueEnrolmentToken": frozenset({BrokerRole.OPERATOR.value}),
    "/tessera.v1.Directory/RotateKeys": frozenset({AGENCY}),
    "/tessera.v1.Directory/Revoke": frozenset({AGENCY, BrokerRole.OPERATOR.value}),
    "/tessera.v1.Directory/GetHead": _READ_DIRECTORY,
    "/tessera.v1.Directory/GetEntries": _READ_DIRECTORY,
    "/tessera.v1.Directory/GetConsistency": _READ_DIRECTORY,
    "/tessera.v1.Directory/GetAgency": _READ_DIRECTORY,
    "/tessera.v1.Relay/Send": frozenset({AGENCY}),
    "/tessera.v1.Relay/SendBatch": frozenset({AGENCY}),
    "/tessera.v1.Relay/Receive": frozenset({AGENCY}),
    "/tessera.v1.Relay/ReceiveBatches": frozenset({AGENCY}),
    "/tessera.v1.Relay/Acknowledge": frozenset({AGENCY}),
    "/tessera.v1.Relay/PurgeConsent": frozenset({AGENCY}),
    "/tessera.v1.Stats/OpenRound": _COORDINATE,
    "/tessera.v1.Stats/RestartRound": _COORDINATE,
    "/tessera.v1.Stats/SubmitShare": frozenset({AGENCY}),
    "/tessera.v1.Stats/DeclineRound": frozenset({AGENCY}),
    "/tessera.v1.Stats/CancelRound": _COORDINATE,
    "/tessera.v1.Stats/GetRound": _READ_DIRECTORY,
    "/tessera.v1.Stats/ListRounds": _READ_DIRECTORY,
    "/tessera.v1.Stats/GetRelease": _READ_DIRECTORY,
    "/tessera.v1.Stats/ListReleases": _READ_DIRECTORY,
    # Each agency's own escrow of tombstones and audit checkpoints (issue 14): agencies only.
    "/tessera.v1.Escrow/DepositTombstones": frozenset({AGENCY}),
    "/tessera.v1.Escrow/ListTombstones": frozenset({AGENCY}),
    "/tessera.v1.Escrow/Checkpoint": frozenset({AGENCY}),
    "/tessera.v1.Escrow/LatestCheckpoint": frozenset({AGENCY}),
}


def allowed_roles(method: str) -> frozenset[str]:
    """The roles (``agency``, ``operator``, ``coordinator``) that may call ``method`` (a full
    gRPC method name); empty means nobody (public methods need no role: see ``PUBLIC``)."""
    return _ROLES.get(method, frozenset())


def make_authenticator(
    agency_by_key: Callable[[bytes], tuple[str, bool] | None],
    operators: Callable[[], list[Operator]],
    refresh: Callable[[], Awaitable[None]],
) -> Authenticator:
    """Signer key → Caller.

    ``agency_by_key(key)`` gives (agency_id, revoked) or None from the broker's verified view of
    the directory, in memory. A key that is neither an agency's nor an operator's costs one
    ``await refresh()`` of that view (the agency may have enrolled a moment ago through another
    broker process) and is looked up again.
    """

    def find_operator(signer: bytes) -> Operator | None:
        return next((o for o in operators() if o.signing_key == signer), None)

    async def authenticate(signer: bytes, method: str) -> Caller:
        allowed = allowed_roles(method)
        # Agencies make almost every call: their keys are looked up first. An operator's key is
        # never an agency's (both are fresh Ed25519 keys).
        agency = agency_by_key(signer)
        operator = None if agency is not None else find_operator(signer)
        if agency is None and operator is None:
            await refresh()
            agency = agency_by_key(signer)
        if operator is not None:
            caller = Caller(
                signer=signer,
                principal=f"{operator.role.value}:{operator.name}",
                role=operator.role.value,
            )
        else:
            if agency is None:
                raise Unauthenticated(
                    "this key belongs to no enrolled agency or operator of this broker",
                    hint="enrol the node with `tessera node enrol`",
                )
            agency_id, revoked = agency
            if revoked:
                raise Unauthenticated(
                    f"agency {agency_id} was revoked from the directory",
                    hint="ask the broker operator to enrol the node again",
                )
            caller = Caller(signer=signer, principal=agency_id, role=AGENCY)
        if caller.role not in allowed:
            raise PermissionDenied(f"{caller.role} may not call {method.rsplit('/', 1)[-1]}")
        return caller

    return authenticate
