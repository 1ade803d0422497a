"""The passphrase strength policy (issue 14 item 5; docs/operations.md, "Passphrases").

A passphrase protects keys an attacker may copy and attack offline: a node's keyring and its
backups, a staff credential. Argon2id makes each guess slow; this policy makes sure there are
many to make. Every new passphrase, for a node (``node init``, ``node rotate-kek``) or a staff
credential, is rated by zxcvbn (Dropbox's estimator: dictionaries, names, keyboard patterns,
dates, repeats, l33t) and refused below :data:`MIN_SCORE`, with the estimator's own feedback.
Existing passphrases are never re-rated: opening a node or credential works as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from zxcvbn import zxcvbn

from tessera.errors import WeakPassphrase

__all__ = ["MAX_RATED_CHARACTERS", "MIN_SCORE", "SCORE_WORDS", "require_strong"]

#: zxcvbn's top score: at least 10**10 guesses, "strong protection from an offline slow-hash
#: attack", which is the attack on a stolen keyring, backup or credential file.
MIN_SCORE: Final = 4
#: The estimator's cost grows fast with length; only this prefix is rated. A prefix is never
#: stronger than the whole, so a prefix that passes stands for the whole passphrase.
MAX_RATED_CHARACTERS: Final = 100
SCORE_WORDS: Final = ("very weak", "weak", "fair", "good", "strong")


def require_strong(
    passphrase: str, *, context: Iterable[str] = (), what: str = "passphrase"
) -> None:
    """Refuse ``passphrase`` (WeakPassphrase) unless zxcvbn rates it at least MIN_SCORE.

    ``context`` holds words an attacker would try first (the agency's name, the person's name,
    the region): the estimator counts them as known.
    """
    if not passphrase:
        # zxcvbn has nothing to rate (it fails on an empty string): refuse it plainly.
        raise WeakPassphrase(
            f"the new {what} is empty",
            hint="choose a long one, say four or more unrelated words, or a password manager's",
        )
    rated = passphrase[:MAX_RATED_CHARACTERS]
    words = [w for item in context for w in (item, *item.split()) if w.strip()]
    result = zxcvbn(rated, user_inputs=[*words, "tessera"], max_length=MAX_RATED_CHARACTERS)
    score = int(result["score"])
    if score >= MIN_SCORE:
        return
    feedback = result.get("feedback") or {}
    advice = [str(feedback.get("warning") or ""), *map(str, feedback.get("suggestions") or [])]
    said = " ".join(a.rstrip(".") + "." for a in advice if a)
    raise WeakPassphrase(
        f"the new {what} is too weak: rated {SCORE_WORDS[score]} ({score} of 4, "
        f"{MIN_SCORE} needed)" + (f". {said}" if said else ""),
        hint="choose a longer one, say four or more unrelated words, or a password manager's",
    )
