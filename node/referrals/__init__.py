"""The referral lifecycle of a node, as an application layer (DESIGN.md section 6).

- :mod:`node.referrals.model`: the vocabulary (states, statuses, decline reasons, outbox kinds),
  the transition rule and the domain records. Pure and light: the CLI imports it at start-up.
- :mod:`node.referrals.unit`: the unit of work the stores share (one transaction, one audit log).
- :mod:`node.referrals.consents`, :mod:`~node.referrals.outgoing` (with the outbox),
  :mod:`~node.referrals.incoming`: the stores; :mod:`node.referrals.stores` binds them together.
- :mod:`node.referrals.flows`: the use cases (grant, send, receive, answer, revoke, apply a
  status, purge), which the servicer and the relay worker adapt in a few lines each.

This package never touches protobuf or gRPC; conversions live in ``node.serde``.
"""
