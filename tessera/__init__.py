"""Tessera: federated, privacy-preserving referrals and statistics for anti-trafficking agencies.

Shared code for the node, the broker and the CLI lives in this package: the crypto core
(:mod:`tessera.crypto`), typed errors (:mod:`tessera.errors`), configuration, storage plumbing,
logging and the gRPC helpers. Generated wire code lives in :mod:`tessera.v1`.
"""

__version__ = "0.1.0"
