"""Conversions between the node's protobuf messages and its domain objects: the one place of the
node (besides the servicers and the client, which call it) that touches ``_pb2`` types (STYLE.md
habit 1). ``serde.X`` is every conversion; they live in ``wire`` (shared: enums, timestamps,
cases, staff, audit, imports), ``referrals`` (consents, referrals, agencies) and ``views`` (the
node's answers as the client reads them)."""

from node.serde.referrals import *  # noqa: F403
from node.serde.views import *  # noqa: F403
from node.serde.wire import *  # noqa: F403
