"""The public domain-separation labels (DESIGN.md section 5; docs/crypto.md has the table).

A label names what a signature, envelope, digest or derived key is *for*; tessera.crypto takes
one with every call and refuses any that does not start with ``b"tessera/"``. The labels
tessera.crypto uses inside itself stay there.
"""

from __future__ import annotations

# Public labels name what a signature, envelope, digest or derived key is *for*. Callers may
# extend them (e.g. LABEL_BLIND_INDEX + b"/prs_id"); every label must start with b"tessera/".

LABEL_ENVELOPE = b"tessera/v1/envelope"  # referral envelopes between nodes (section 5)
LABEL_STATUS = b"tessera/v1/status"  # status / revocation envelopes flowing back (section 6)
LABEL_REQUEST = b"tessera/v1/request"  # signed gRPC requests; used only by sign_request
LABEL_DIRECTORY_ENTRY = b"tessera/v1/directory-entry"  # broker-signed agency keys (section 5)
LABEL_DIRECTORY_HEAD = b"tessera/v1/directory-head"  # broker-signed head of the directory log
LABEL_KEY_ROTATION = b"tessera/v1/key-rotation"  # new keys, signed by the old key (section 5)
LABEL_CONSENT_RECEIPT = b"tessera/v1/consent-receipt"  # signed consent receipt (section 6)
LABEL_CONSENT_COMMITMENT = b"tessera/v1/consent-commitment"  # digest held by the broker
LABEL_RECEIPT = b"tessera/v1/relay-receipt"  # relay delivery / acknowledgement receipts
LABEL_ROUND = b"tessera/v1/round"  # broker-signed aggregation round announcements (section 7)
LABEL_RELEASE = b"tessera/v1/release"  # broker-signed statistics releases (section 7)
LABEL_AUDIT = b"tessera/v1/audit"  # hash chain of the disclosure log (section 6)
LABEL_BLIND_INDEX = b"tessera/v1/blind-index"  # derive_key label for the blind-index key
LABEL_TOMBSTONE = b"tessera/v1/tombstone"  # a node's erasures, sealed to itself (issue 14)
LABEL_ESCROW_HEAD = b"tessera/v1/escrow-head"  # broker-signed head of an agency's escrow
LABEL_ESCROW_CHAIN = b"tessera/v1/escrow-chain"  # digest chain over an agency's tombstones
LABEL_CHECKPOINT_POSITION = b"tessera/v1/checkpoint-position"  # audit head, sealed to itself
LABEL_AUDIT_CHECKPOINT = b"tessera/v1/audit-checkpoint"  # broker-signed audit checkpoint
LABEL_RECORD_SEAL = b"tessera/v1/record-seal"  # MAC pinning a record's current version
LABEL_NEED_INDEX = b"tessera/v1/need-index"  # derive_key label: a case's own need-row key
