"""Need records at rest (DESIGN.md section 5; issue 14 item 5): sealed like the case record.

A need row holds in clear only its row id, its case id and a ``tag``; its category, status and
dates are one AEAD ciphertext under the survivor's own data key, so crypto-shredding a survivor
(deleting the case row that holds the wrapped data key) destroys their needs with them.

The tag is a keyed hash of the category under a key derived from the *case's* data key
(``labels.LABEL_NEED_INDEX``): it keeps "one row per category per case" a unique constraint and
lets a status change find its row, yet two cases with the same need get unrelated tags, so the
table shows no histogram of needs and no link between cases. A node-wide keyed index of the code
would not do: with eighteen categories and six statuses, frequency analysis names every value
(docs/storage.md). Filters on needs therefore decrypt after a coarse query (``node.store.cases``).

The associated data binds each ciphertext to its table, its case and its tag, so a ciphertext moved
to another case, or to another need of the same case, fails to open (TamperedCiphertext).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from node.domain import Need
from node.store.tables import as_utc
from tessera import crypto, labels
from tessera.errors import TamperedCiphertext
from tessera.needs import NeedCategory, NeedStatus


@dataclass(frozen=True)
class SealedNeed:
    """What a need row stores: the per-case tag and the ciphertext."""

    tag: str
    ciphertext: bytes


def need_tag(data_key: crypto.DataKey, category: NeedCategory | str) -> str:
    """The row tag of ``category`` in the case whose data key is ``data_key``."""
    key = crypto.derive_key(data_key, labels.LABEL_NEED_INDEX)
    return crypto.blind_index(key, f"need:{NeedCategory(category).value}")


def need_associated_data(case_id: str, tag: str) -> bytes:
    """Associated data of a need ciphertext: table, case and need (DESIGN.md section 5)."""
    return f"tessera/v1|need|{case_id}|{tag}".encode()


def seal_need(data_key: crypto.DataKey, case_id: str, need: Need) -> SealedNeed:
    """Encrypt one need of ``case_id`` under the survivor's data key."""
    tag = need_tag(data_key, need.category)
    payload = json.dumps(
        {
            "category": need.category.value,
            "status": need.status.value,
            "identified_on": need.identified_on.isoformat(),
            "updated_at": as_utc(need.updated_at).isoformat(),
        },
        separators=(",", ":"),
    )
    ciphertext = crypto.encrypt(data_key, payload.encode(), need_associated_data(case_id, tag))
    return SealedNeed(tag, ciphertext)


def open_need(data_key: crypto.DataKey, case_id: str, tag: str, ciphertext: bytes) -> Need:
    """Decrypt a need row; TamperedCiphertext if it was altered or moved."""
    plain = crypto.decrypt(data_key, ciphertext, need_associated_data(case_id, tag))
    try:
        payload = json.loads(plain)
        need = Need(
            category=NeedCategory(payload["category"]),
            status=NeedStatus(payload["status"]),
            identified_on=dt.date.fromisoformat(payload["identified_on"]),
            updated_at=as_utc(dt.datetime.fromisoformat(payload["updated_at"])),
        )
    except (ValueError, KeyError, TypeError):
        raise TamperedCiphertext(f"a need record of case {case_id} is malformed") from None
    if need_tag(data_key, need.category) != tag:  # authenticated already; checked all the same
        raise TamperedCiphertext(f"a need record of case {case_id} carries another need's tag")
    return need


def seal_clear_rows(
    rows: Iterable[Mapping[str, Any]], data_key_of: Callable[[str], crypto.DataKey]
) -> list[dict[str, Any]]:
    """Need rows as stored before they were sealed (schema 0004: category, status,
    identified_on, updated_at in clear), sealed into today's columns; ``data_key_of(case_id)``
    unwraps a survivor's key. Used by a restore of a backup taken before the upgrade."""
    sealed_rows = []
    for row in rows:
        need = Need(
            NeedCategory(row["category"]),
            NeedStatus(row["status"]),
            row["identified_on"],
            as_utc(row["updated_at"]),
        )
        sealed = seal_need(data_key_of(row["case_id"]), row["case_id"], need)
        sealed_rows.append(
            {
                "id": row["id"],
                "case_id": row["case_id"],
                "tag": sealed.tag,
                "ciphertext": sealed.ciphertext,
            }
        )
    return sealed_rows
