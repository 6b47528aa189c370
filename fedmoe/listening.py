"""Where a server may listen: the rules the coordinator's and ``fedmoe serve``'s settings
share (default host, loopback, TLS files, authentication beyond loopback)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Protocol


def default_host(auth_enabled: bool) -> str:
    """All interfaces when a token is configured (the seed's quick commands then work
    across machines unchanged), else loopback only."""
    return "0.0.0.0" if auth_enabled else "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Listener(Protocol):
    """The settings of a server that listens (the coordinator's, ``fedmoe serve``'s)."""

    host: str
    insecure: bool
    ssl_certfile: Path | None
    ssl_keyfile: Path | None

    @property
    def auth_enabled(self) -> bool:
        """Whether clients must send a bearer token."""
        ...


def check_listening(settings: Listener, exposed: str) -> None:
    """Refuse half a TLS configuration, and listening beyond loopback without
    authentication unless ``insecure``; ``exposed`` says what anyone could then do."""
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        raise ValueError("ssl_certfile and ssl_keyfile must be given together")
    if not is_loopback(settings.host) and not settings.auth_enabled and not settings.insecure:
        raise ValueError(
            f"refusing to listen on {settings.host} without authentication: anyone who can "
            f"reach it could {exposed}. Set FEDMOE_AUTH_TOKEN (or --auth-token / "
            "--tokens-file), or pass --insecure if the network is trusted."
        )
