"""Keyed blind indexes of a survivor's identifiers (issue 4: search by an identifier without
storing it in clear): which fields feed which index, and the digest of one value.

The node's index key never leaves the keyring; a digest tells equal values apart from unequal
ones and nothing else. Import matching (``node.store.imports``) compares the same digests.
"""

from __future__ import annotations

from collections.abc import Mapping

from tessera import crypto

__all__ = ["IDENTIFIER_KINDS", "INDEXED", "blind_index", "index_entries", "search_kind"]

# Which fields feed which blind index (issue 4: search by a survivor identifier).
INDEXED: Mapping[str, tuple[str, ...]] = {
    "name": ("prs_FirstName", "prs_SecondName"),
    "email": ("prs_Email",),
    "phone": ("prs_MobilePhone",),
    "home_phone": ("prs_HomePhone",),
}
# What a caseworker may search by.
IDENTIFIER_KINDS = ("name", "email", "phone")


def search_kind(kind: str) -> str:
    """The kind a value of index ``kind`` is digested as: a home phone is searched as a phone,
    so the same number gets the same digest."""
    return "phone" if kind == "home_phone" else kind


def blind_index(index_key: crypto.DataKey, kind: str, value: str) -> str:
    """The digest of ``value`` searched as ``kind`` under the node's index key."""
    # Whitespace is collapsed here (the crypto core normalises case and Unicode), so
    # " Ana  Ruiz" typed in a search finds "Ana Ruiz" as recorded.
    return crypto.blind_index(index_key, f"{kind}:{' '.join(value.split())}")


def index_entries(index_key: crypto.DataKey, fields: Mapping[str, str]) -> list[tuple[str, str]]:
    """The (index kind, digest) rows a case with ``fields`` is indexed under, in INDEXED order;
    a digest shared by two kinds (one number as mobile and home phone) is computed once."""
    digests: dict[tuple[str, str], str] = {}
    entries: list[tuple[str, str]] = []
    for kind, names in INDEXED.items():
        value = " ".join(fields.get(n, "") for n in names)
        if value.strip():
            key = (search_kind(kind), " ".join(value.split()))
            if key not in digests:
                digests[key] = blind_index(index_key, *key)
            entries.append((kind, digests[key]))
    return entries
