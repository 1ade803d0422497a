"""The regional directory: who is enrolled, with which keys, in an append-only signed log.

This package is the directory core shared by the broker (which builds statements' log entries,
the hash chain and signed heads) and by every node (which verifies them and pins keys). It
implements DESIGN.md section 5 ("Keys, identity, encryption": enrolment with a one-time token,
an append-only log whose head the broker signs, keys pinned at first sight, silently changed keys
refused, key rotation signed by the old key) exactly as the header comment of
``proto/tessera/v1/directory.proto`` specifies it on the wire:

- an agency *statement* is a ``DirectoryEntry`` carried as a ``SignedBlob`` under label
  ``tessera/v1/key-rotation``, signed by the new key (ENROL), the previous key (ROTATE, plus a
  possession signature by the new key over the same body bytes) or the broker (REVOKE);
- the broker wraps it in a ``LogEntry`` (sequence from 1, ``previous_chain``) that it signs under
  ``tessera/v1/directory-entry``;
- the hash chain is ``leaf(n) = digest("tessera/v1/directory-entry", b_n)``,
  ``chain(0) = 32 zero bytes``, ``chain(n) = digest("tessera/v1/directory-head",
  chain(n-1) || leaf(n))`` where ``b_n`` is the exact body of the broker-signed LogEntry ``n``;
- the broker signs a ``LogHead`` (region, size, chain(size)) under ``tessera/v1/directory-head``.

Everything here is pure: functions take protobuf ``SignedBlob`` messages (whose ``body`` bytes are
never re-serialised, common.proto convention 2), bytes and domain objects, and return frozen
domain objects or raise typed errors. There is no I/O, no clock (callers pass ``now``) and no
storage; the broker's and node's servicers do that around these functions. Keys are touched only
through :mod:`tessera.crypto`. docs/directory.md is the reviewer's summary.

Verification order follows the signing rule of docs/wire.md: a signature is checked against the
key that *should* have signed (the pinned broker key; for a statement, the signer is checked
against what its kind requires) and only verified bytes are parsed further.

The package, by concept (import from ``tessera.directory``; the modules are its layout):

- :mod:`~tessera.directory.fields`: constants, wire limits, field checks, the signed-blob helper;
- :mod:`~tessera.directory.model`: the domain objects and the integrity errors;
- :mod:`~tessera.directory.statements`: making and parsing agency statements;
- :mod:`~tessera.directory.rules`: who may sign what, the record's state machine, the broker's
  statement check and a node's pins;
- :mod:`~tessera.directory.log`: the hash chain, log entries and heads, and their verification.
"""

from __future__ import annotations

from tessera.directory.fields import (
    CHAIN_BYTES,
    DEFAULT_LIMITS,
    GENESIS_CHAIN,
    POSSESSION_LABEL,
    DirectoryLimits,
    check_agency_id,
    check_text,
    short_key,
    sign_blob,
)
from tessera.directory.log import (
    append,
    leaf_hash,
    next_chain,
    sign_head,
    verify_consistency,
    verify_entry,
    verify_extension,
    verify_head,
)
from tessera.directory.model import (
    AgencyRecord,
    AgencyStatement,
    BadDirectoryData,
    DirectoryError,
    DirectoryInconsistent,
    EntryKind,
    KeyChanged,
    VerifiedEntry,
    VerifiedHead,
)
from tessera.directory.rules import apply_to_pins, check_statement
from tessera.directory.statements import enrol_statement, revoke_statement, rotate_statement

__all__ = [
    "CHAIN_BYTES",
    "DEFAULT_LIMITS",
    "GENESIS_CHAIN",
    "POSSESSION_LABEL",
    "AgencyRecord",
    "AgencyStatement",
    "BadDirectoryData",
    "DirectoryError",
    "DirectoryInconsistent",
    "DirectoryLimits",
    "EntryKind",
    "KeyChanged",
    "VerifiedEntry",
    "VerifiedHead",
    "append",
    "apply_to_pins",
    "check_agency_id",
    "check_statement",
    "check_text",
    "enrol_statement",
    "leaf_hash",
    "next_chain",
    "revoke_statement",
    "rotate_statement",
    "short_key",
    "sign_blob",
    "sign_head",
    "verify_consistency",
    "verify_entry",
    "verify_extension",
    "verify_head",
]
