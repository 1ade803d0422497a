"""Prometheus metrics shared by node and broker servers (DESIGN.md section 8).

Labels carry method names and status codes only: never a survivor field, agency secret or key.
The endpoint is off unless ``metrics_port`` is set in tessera.toml; it binds loopback only, so
a scraper on another host needs a tunnel or a reverse proxy the operator controls.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from tessera.errors import ConfigError

RPC_REQUESTS = Counter("tessera_rpc_requests_total", "gRPC calls handled", ["method", "code"])
RPC_LATENCY = Histogram("tessera_rpc_latency_seconds", "gRPC handling time", ["method"])
AUTH_FAILURES = Counter(
    "tessera_auth_failures_total", "requests refused by authentication", ["reason"]
)
ENVELOPES_WAITING = Gauge(
    "tessera_envelopes_waiting", "envelopes stored at the broker and not yet acknowledged"
)
NODE_CASES = Gauge("tessera_node_cases", "case records held by this node (all states)")
DATABASE_UP = Gauge(
    "tessera_database_up", "1 while the server's database answers, 0 while it does not"
)

log = logging.getLogger(__name__)


@dataclass
class MetricsServer:
    """A running /metrics endpoint; :meth:`stop` shuts it down and frees the port."""

    address: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop answering scrapes and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(port: int, addr: str = "127.0.0.1") -> MetricsServer:
    """Expose /metrics over HTTP on ``addr:port`` (0 picks a free port) in a daemon thread."""
    try:
        server, thread = start_http_server(port, addr=addr)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}",
            hint="choose a free port with `metrics_port` in tessera.toml, or 0 to turn it off",
        ) from exc
    bound = int(server.server_port)
    return MetricsServer(f"http://{addr}:{bound}/metrics", bound, server, thread)
