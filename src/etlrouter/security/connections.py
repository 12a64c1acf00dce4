"""A cap on established connections per peer, for every TLS listener (gRPC and HTTPS)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


class PeerLimit:
    """Closes a connection beyond `cap` established ones from the same peer identity (its certificate's
    URI SAN; its address when it presented none). With TLS, `connection_made` runs after the handshake, so
    what is counted is authenticated connections, and no protocol state is built for the others."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.counts: dict[str, int] = {}

    def watch(self, protocol: asyncio.BaseProtocol) -> None:
        made, lost = protocol.connection_made, protocol.connection_lost
        peer: list[str | None] = [None]

        def connection_made(transport: Any) -> None:
            cert = transport.get_extra_info("peercert") or {}
            uris = [value for key, value in cert.get("subjectAltName", ()) if key == "URI"]
            who = uris[0] if uris else str((transport.get_extra_info("peername") or ("?",))[0])
            self.counts[who] = self.counts.get(who, 0) + 1
            peer[0] = who
            made(transport)
            if self.counts[who] > self.cap:
                log.warning(
                    "connection refused: too many from one peer",
                    extra={"fields": {"peer": who, "limit": self.cap}},
                )
                transport.abort()

        def connection_lost(exc: Any) -> None:
            who, peer[0] = peer[0], None
            if who is not None:
                self.counts[who] -= 1
                if self.counts[who] <= 0:
                    del self.counts[who]
            lost(exc)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
