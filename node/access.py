"""Who may call what on a node (issue 4 item 6). docs/access.md shows the same matrix.

Every CLI call is a signed request (tessera.rpc); this module turns the signer into a staff member
and decides, from the method alone, whether their role allows it. Unlisted methods are refused:
access fails closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from node.domain import StaffMember, StaffRole
from tessera.errors import PermissionDenied, Unauthenticated
from tessera.rpc import Authenticator, Caller

SERVICE = "/tessera.v1.Node/"

_ADMIN_ONLY = frozenset(
    {
        "EraseCase",
        "ImportCases",
        "ExportCases",
        "VerifyAudit",
        "ShowAudit",
        "AddStaff",
        "RemoveStaff",
        "ListStaff",
        "RotateKeyEncryptionKey",
        "Backup",
        "VerifyAgency",
    }
)
_CASEWORKER = frozenset(
    {
        "GetStatus",
        "CreateCase",
        "GetCase",
        "UpdateCase",
        "ListCases",
        "FindCases",
        "CloseCase",
        "SetNeed",
        "ListDisclosures",
        "GrantConsent",
        "ListConsents",
        "RevokeConsent",
        "SendReferral",
        "ListReferrals",
        "Inbox",
        "ShowReferral",
        "AnswerReferral",
        "ListAgencies",
        "BudgetStatus",
    }
)


def allowed_roles(method: str) -> frozenset[StaffRole]:
    """The roles that may call ``method`` (a full gRPC method name); empty means nobody."""
    name = method.removeprefix(SERVICE) if method.startswith(SERVICE) else ""
    if name in _ADMIN_ONLY:
        return frozenset({StaffRole.ADMIN})
    if name in _CASEWORKER:
        return frozenset({StaffRole.ADMIN, StaffRole.CASEWORKER})
    return frozenset()


def principal(member: StaffMember) -> str:
    """How a staff member is named in the audit log."""
    return f"staff:{member.name}"


def make_authenticator(
    lookup: Callable[[bytes], StaffMember | None],
    on_refused: Callable[[str, str, str], None],
) -> Authenticator:
    """An authenticator for tessera.rpc: signer key → Caller, or a refusal that is audited.

    ``on_refused(actor, method, reason)`` records every refusal in the audit log. Both query the
    node's database, so they run in a worker thread.
    """

    def check(signer: bytes, method: str) -> Caller:
        member = lookup(signer)
        if member is None:
            on_refused(f"key:{signer.hex()[:16]}", method, "unknown key")
            raise Unauthenticated(
                "this key is not a staff credential of this node",
                hint="ask the node's administrator to run `tessera node staff add`",
            )
        if not member.active:
            on_refused(principal(member), method, "credential removed")
            raise Unauthenticated(
                f"the credential of {member.name} was removed",
                hint="ask the node's administrator for a new credential",
            )
        if member.role not in allowed_roles(method):
            on_refused(principal(member), method, f"role {member.role.value}")
            raise PermissionDenied(
                f"{member.role.value}s may not call {method.removeprefix(SERVICE)}",
                hint="ask an administrator of this node",
            )
        return Caller(signer=signer, principal=principal(member), role=member.role.value)

    async def authenticate(signer: bytes, method: str) -> Caller:
        return await asyncio.to_thread(check, signer, method)

    return authenticate
