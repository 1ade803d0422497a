"""The ``tessera`` command line: thin commands that parse, call a client, and render.

Modules here import only Typer and the standard library at import time, so ``tessera --help``
answers fast; anything heavy (gRPC, SQLModel, PyNaCl, OpenDP) is imported inside a command.
"""
