"""Prometheus metrics shared by node and broker servers (DESIGN.md section 8).

Labels carry method names and status codes only: never a survivor field, agency secret or key.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter("tessera_rpc_requests_total", "gRPC calls handled", ["method", "code"])
RPC_LATENCY = Histogram("tessera_rpc_latency_seconds", "gRPC handling time", ["method"])
AUTH_FAILURES = Counter(
    "tessera_auth_failures_total", "requests refused by authentication", ["reason"]
)
ENVELOPES_WAITING = Gauge(
    "tessera_envelopes_waiting", "envelopes stored at the broker and not yet acknowledged"
)


def serve_metrics(port: int, addr: str = "127.0.0.1") -> int:
    """Expose /metrics over HTTP on ``addr:port`` (0 picks a free port); returns the port."""
    server, _thread = start_http_server(port, addr=addr)
    return int(server.server_port)
