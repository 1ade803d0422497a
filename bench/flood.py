"""A flood of large unsigned requests against one broker process (issue 16: memory before auth).

One real broker (``tessera --home H broker serve``, SQLite) on loopback. Twelve clients at once each
send an unsigned ``Relay.SendBatch`` of 60 MB (garbage bytes), three rounds; the broker's resident
memory (VmRSS from /proc/<pid>/status) is sampled every 20 ms throughout. Baseline: the same
broker's memory at rest just before, in the same run. Before requests were capped
(``max_request_bytes``) and authenticated before parsing, this took a broker from 0.2 to 1.8 GB.
Bounded: 3 rounds, 12 requests each, 30 s deadlines; loopback only.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from bench.common import Figure
from bench.relay import broker_process, make_broker_home
from tessera import credential
from tessera.config import Limits
from tessera.tls import SERVER_NAME

SENDERS = 12
ROUNDS = 3
REQUEST_BYTES = 60 * 1024 * 1024
METHOD = "/tessera.v1.Relay/SendBatch"


def _rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _send(address: str, cert: bytes, body: bytes) -> str:
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    options = [
        ("grpc.ssl_target_name_override", SERVER_NAME),
        ("grpc.default_authority", SERVER_NAME),
        ("grpc.max_send_message_length", len(body) + 1024),
    ]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        call = channel.unary_unary(
            METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            call(body, timeout=30)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return "OK"


def run() -> list[Figure]:
    """Peak broker memory under the flood against its memory at rest."""
    with tempfile.TemporaryDirectory(prefix="tessera-flood-") as folder:
        home = make_broker_home(Path(folder) / "broker")
        broker = broker_process(home, "broker")
        try:
            address = broker.start()
            cert = credential.read(home).node_certificate
            time.sleep(1.0)
            rest = _rss(broker.pid)
            peak = rest
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, _rss(broker.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            body = b"\xff" * REQUEST_BYTES
            codes: dict[str, int] = {}
            with concurrent.futures.ThreadPoolExecutor(SENDERS) as pool:
                for _ in range(ROUNDS):
                    for code in pool.map(lambda _i: _send(address, cert, body), range(SENDERS)):
                        codes[code] = codes.get(code, 0) + 1
            time.sleep(0.5)
            after = _rss(broker.pid)
            stop.set()
            sampler.join()
        finally:
            broker.stop()
    print(
        f"  flood: {SENDERS} x {ROUNDS} unsigned {REQUEST_BYTES >> 20} MB requests, answers "
        f"{codes}; broker memory at rest {rest >> 20} MiB, peak {peak >> 20} MiB, after "
        f"{after >> 20} MiB (request limit {Limits().max_request_bytes >> 20} MiB)",
        flush=True,
    )
    return [
        Figure(
            "flood",
            "peak broker memory",
            peak / 2**20,
            "at rest",
            rest / 2**20,
            "MiB",
            higher_is_better=False,
            note="flood: lower is better; the ratio is rest / peak (1.00 = no growth).",
        )
    ]


if __name__ == "__main__":
    from bench.common import print_table

    figures = run()
    print_table(figures)
    if len(sys.argv) > 1:  # `make adversarial`: the peak for its summary line
        Path(sys.argv[1]).write_text(json.dumps({"peak_mib": round(figures[0].value)}))
    sys.exit(0)
