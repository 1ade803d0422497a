"""The replay guard: which signed requests were already seen (DESIGN.md section 5).

Not cryptography: :func:`tessera.crypto.verify_request` checks a request's signature first, so
only authentic requests reach this cache, then asks it whether the request is fresh and new.
"""

from __future__ import annotations

import heapq
import threading
from typing import TYPE_CHECKING

from tessera.errors import Exhausted, InvalidInput, ReplayedRequest, StaleRequest

if TYPE_CHECKING:
    from tessera.crypto import RequestSignature


class ReplayGuard:
    """Remembers (signer, nonce) pairs while their timestamps are inside the window.

    Memory is bounded: expired entries are evicted, and past ``max_entries`` live entries new
    requests are refused (Exhausted) rather than forgetting nonces, which would allow replays.
    Thread-safe. One guard per process: replicas behind a load balancer need a shared store.
    """

    def __init__(self, window_seconds: float = 300.0, max_entries: int = 200_000) -> None:
        if window_seconds <= 0 or max_entries <= 0:
            raise InvalidInput("replay window and capacity must be positive")
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self._seen: set[tuple[bytes, bytes]] = set()
        self._expiry: list[tuple[float, bytes, bytes]] = []  # min-heap by expiry time
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def check(self, sig: RequestSignature, now: float) -> None:
        """StaleRequest outside the window, ReplayedRequest if seen; otherwise remember it."""
        stamped = sig.timestamp_ms / 1000
        if abs(now - stamped) > self.window_seconds:
            raise StaleRequest(
                "request timestamp is outside the replay window",
                hint="check the clocks of both machines (NTP)",
            )
        entry = (sig.signer, sig.nonce)
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                _, signer, nonce = heapq.heappop(self._expiry)
                self._seen.discard((signer, nonce))
            if entry in self._seen:
                raise ReplayedRequest("request was already received (replayed nonce)")
            if len(self._seen) >= self.max_entries:
                raise Exhausted("too many recent requests to track; try again shortly")
            self._seen.add(entry)
            # A replay stays acceptable-looking until stamped + window, so remember it that long.
            heapq.heappush(self._expiry, (stamped + self.window_seconds, *entry))
