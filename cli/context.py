"""What every command gets from the root: the home directory and the environment.

``--home DIR`` (or ``TESSERA_HOME``) selects the node's or broker's directory, as ``GNUPGHOME``
does for gpg. Secrets never come from the command line: a passphrase comes from
``TESSERA_PASSPHRASE`` when set, else from a prompt on a terminal. That one variable is the
passphrase *of the home*: in a node's home it opens the node and the administrator's credential
there (both locked by it); in a staff member's home it opens their credential. A *new* passphrase
(``node rotate-kek``, ``node staff add``, ``node credential protect``) comes from
``TESSERA_NEW_PASSPHRASE`` or a prompt asked twice.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tessera.errors import ConfigError

if TYPE_CHECKING:
    from node.client import NodeClient


@dataclass(frozen=True)
class CliContext:
    """Resolved once by the root callback and handed to every command through Typer's context."""

    home_option: Path | None
    environ: Mapping[str, str]

    @property
    def home(self) -> Path:
        """The selected home directory (``--home``, ``TESSERA_HOME`` or ``~/.tessera``)."""
        from tessera.config import resolve_home

        return resolve_home(self.home_option, self.environ)

    def passphrase(self, *, confirm: bool = False, purpose: str = "node passphrase") -> str:
        """``TESSERA_PASSPHRASE`` if set; else a hidden prompt; never a command-line argument."""
        value = self.environ.get("TESSERA_PASSPHRASE")
        if value:
            return value
        if not sys.stdin.isatty():
            raise ConfigError(
                f"a {purpose} is needed and there is no terminal to ask on",
                hint="set TESSERA_PASSPHRASE for non-interactive use",
            )
        first = getpass.getpass(f"{purpose}: ")
        if confirm and getpass.getpass(f"repeat {purpose}: ") != first:
            raise ConfigError("the two passphrases differ", hint="run the command again")
        if not first:
            raise ConfigError("an empty passphrase is not allowed", hint="choose a passphrase")
        return first

    def new_passphrase(self, purpose: str) -> str:
        """``TESSERA_NEW_PASSPHRASE`` if set; else a hidden prompt, asked twice."""
        value = self.environ.get("TESSERA_NEW_PASSPHRASE")
        if value:
            return value
        if not sys.stdin.isatty():
            raise ConfigError(
                f"a {purpose} is needed and there is no terminal to ask on",
                hint="set TESSERA_NEW_PASSPHRASE for non-interactive use",
            )
        return CliContext(None, {}).passphrase(confirm=True, purpose=purpose)

    def credential_passphrase(self) -> str:
        """The passphrase of the staff credential in the home (asked only if it has one)."""
        return self.passphrase(purpose=f"passphrase of the credential in {self.home}")

    def node_client(self) -> NodeClient:
        """A client signing with the credential in the home; warns if that credential holds
        its secret key in clear (written before credentials were locked)."""
        from node.client import NodeClient

        client = NodeClient(self.home, unlock=self.credential_passphrase)
        if not client.credential.protected:
            sys.stderr.write(
                f"warning: the staff credential in {self.home} holds its secret key in clear; "
                "lock it with `tessera node credential protect`\n"
            )
        return client


def get(ctx: typer.Context) -> CliContext:
    """The :class:`CliContext` the root callback stored (or a default one, for sub-app tests)."""
    root = ctx.find_root()
    obj = root.obj
    if isinstance(obj, CliContext):
        return obj
    return CliContext(home_option=None, environ=dict(os.environ))
