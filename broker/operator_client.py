"""The operator's client for the broker: signed calls over TLS from the operator's credential."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from tessera import enrolment, rpc
from tessera.config import Limits
from tessera.timestamps import to_timestamp
from tessera.v1 import directory_pb2 as directory_pb
from tessera.v1 import directory_pb2_grpc as directory_grpc


class OperatorClient(rpc.CredentialClient):
    """A broker operator's connection to their broker (credential in ``home``)."""

    def __init__(self, home: Path) -> None:
        super().__init__(home, Limits().max_message_bytes)
        self._stub = directory_grpc.DirectoryStub(self.channel)

    def enrolment_code(self, agency_id: str, days: int) -> str:
        """Issue a one-time token and wrap it, with the broker's address and certificate
        fingerprint, into a code for the agency's administrator."""
        expires = to_timestamp(dt.datetime.now(dt.UTC) + dt.timedelta(days=days))
        reply = self.call(
            self._stub.IssueEnrolmentToken,
            directory_pb.IssueEnrolmentTokenRequest(agency_id=agency_id, expires_at=expires),
        )
        return enrolment.EnrolmentCode(
            broker_address=self.address,
            certificate_sha256=enrolment.certificate_sha256(self.certificate),
            token=reply.token,
            agency_id=reply.agency_id,
            region=reply.region,
        ).encode()

    def revoke(self, agency_id: str, reason: str) -> None:
        """Withdraw an agency from the directory."""
        self.call(self._stub.Revoke, directory_pb.RevokeRequest(agency_id=agency_id, reason=reason))
